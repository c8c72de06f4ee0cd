"""Text-guided inter-slice (TG-IS) scoring: which slices matter for this question.

Each slice j gets a key z^j = the mean over the concatenation of the 3D tokens of its depth group and
its own slice tokens; its score is softmax_j(z^j . z_T / temperature), with z_T = text_mlp(question
feature). The slice tokens are then summed with those scores. The ablations of the paper are values of
`tgis.slice_weighting` routed through this one module:

- `tgis`: the text-guided scores above (the paper's method);
- `uniform`: every slice weighted 1/S, through the same dropout and weighted sum (isolates the text);
- `mean`: the plain mean of the slice tokens (scores reported as 1/S, no dropout);
- `max`: the element-wise max over slices (scores report the share of features each slice wins).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax.sharding import param_axes


@flax.struct.dataclass
class SliceWeighting:
    aggregated: jax.Array  # (batch, slice_tokens, embed): the slice tokens summed over slices
    scores: jax.Array  # (batch, slices): weights given to each slice (sum to 1)
    keys: jax.Array | None  # (batch, slices, embed): z^j, for `tgis` and `uniform`
    logits: jax.Array | None  # (batch, slices): pre-softmax scores, `tgis` only
    question: jax.Array | None  # (batch, embed): z_T = text_mlp(question feature), `tgis` only


class TGIS(nnx.Module):
    """Scores slices against the question and aggregates their tokens.

    Attributes:
      text_mlp: Linear(question_dim -> embed), the authors' `vision3d_connector.text_mlp`.
    """

    def __init__(self, cfg, question_dim: int, embed_dim: int, depth_groups: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.depth_groups = depth_groups
        self.weighting = cfg.slice_weighting
        self.temperature = float(cfg.temperature)
        self.dropout = nnx.Dropout(cfg.dropout)
        if self.weighting == "tgis":
            # The LLM's side split, like the connectors'.
            self.text_mlp = nnx.Linear(question_dim, embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                       kernel_metadata=param_axes(None, "embed"), bias_metadata=param_axes(None))

    def __call__(self, volume_tokens, slice_tokens, question_feature=None, *, deterministic=True, rngs=None):
        """Returns a `SliceWeighting`.

        Args:
          volume_tokens: (batch, pooled_tokens, embed), the connector's 3D tokens, depth outermost.
          slice_tokens: (batch, slices, tokens, embed), the connector's per-slice 2D tokens.
          question_feature: (batch, question_dim), the BERT pooler output (`tgis` only).
          deterministic: no dropout on the scores when True.
          rngs: an `nnx.Rngs` with a `dropout` stream, when not deterministic.
        """
        batch, slices = slice_tokens.shape[:2]
        if self.weighting == "max":
            aggregated = slice_tokens.max(axis=1)
            wins = (slice_tokens == aggregated[:, None]).astype(jnp.float32)
            scores = wins.sum(axis=(2, 3)) / wins.sum(axis=(1, 2, 3))[:, None]
            return SliceWeighting(aggregated, scores, None, None, None)
        if self.weighting == "mean":
            scores = jnp.full((batch, slices), 1.0 / slices, jnp.float32)
            return SliceWeighting(slice_tokens.mean(axis=1), scores, None, None, None)

        keys = slice_keys(volume_tokens, slice_tokens, self.depth_groups)
        logits = question = None
        if self.weighting == "tgis":
            if question_feature is None:
                raise ValueError("slice_weighting 'tgis' needs the question feature (BERT pooler output)")
            question = self.text_mlp(question_feature)
            logits = jnp.einsum("bsd,bd->bs", keys, question) / self.temperature
            scores = jax.nn.softmax(logits.astype(jnp.float32), axis=1)
        else:
            scores = jnp.full((batch, slices), 1.0 / slices, jnp.float32)
        weights = self.dropout(scores, deterministic=deterministic, rngs=rngs)
        aggregated = jnp.einsum("bs,bsld->bld", weights.astype(slice_tokens.dtype), slice_tokens)
        return SliceWeighting(aggregated, scores, keys, logits, question)


def slice_keys(volume_tokens, slice_tokens, depth_groups: int):
    """z^j (batch, slices, embed): the mean over [3D tokens of slice j's depth group ; slice j's tokens].

    volume_tokens (batch, depth_groups * group_tokens, embed) is depth-outermost, so group g is a
    contiguous block; slices are split evenly between groups (slices 8g..8g+7 for the released model).
    """
    batch, slices, tokens, embed = slice_tokens.shape
    group_tokens = volume_tokens.shape[1] // depth_groups
    # One sum over both parts rather than a concatenation: the (batch, slices, group_tokens + tokens,
    # embed) array it would build is 4 GB per 32 samples at the released size.
    group_sums = volume_tokens.reshape(batch, depth_groups, group_tokens, embed).sum(axis=2)
    group_sums = jnp.repeat(group_sums, slices // depth_groups, axis=1)
    return (group_sums + slice_tokens.sum(axis=2)) / (group_tokens + tokens)
