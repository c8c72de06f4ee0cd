"""Med-2E3: a CT volume read whole by a 3D ViT and slice by slice by a 2D ViT, the slices weighed by
the question (TG-IS), and both handed to an LLM.

    volume (batch, 1, slices, height, width)
      ├─ vision3d ─ patch features ─ avg-pool ─ vision3d_connector ──────────── z_3D (batch, 256, D)
      └─ each slice ─ vision2d ─ vision2d_connector ─ z_2D^j (batch, slices, 256, D)
    question ─ question_encoder pooler ─ tgis.text_mlp ─ z_T (batch, D)
    tgis(z_3D, z_2D^j, z_T) ─ slice scores s (batch, slices) ─ z_2D = Σ_j s_j z_2D^j
    [z_3D ; z_2D] replaces the <image3d> positions of the prompt ─ llm ─ logits, loss
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax import config as config_lib
from med2e3_jax.models.bert import BertEncoder
from med2e3_jax.models.connectors import MLPConnector, spatial_avg_pool
from med2e3_jax.models.decoder import Decoder
from med2e3_jax.models.lm_loss import mean_token_loss
from med2e3_jax.models.merge import merge_vision_tokens, text_token_ids
from med2e3_jax.models.siglip import SiglipVisionTower
from med2e3_jax.models.tgis import TGIS
from med2e3_jax.models.vit3d import ViT3D


@flax.struct.dataclass
class VisionOutput:
    tokens: jax.Array  # (batch, vision_tokens, embed): what replaces the <image3d> positions
    slice_scores: jax.Array  # (batch, slices)


@flax.struct.dataclass
class Med2E3Output:
    logits: jax.Array  # (batch, length, vocab) float32
    loss: jax.Array | None  # () mean cross-entropy over supervised tokens
    num_target_tokens: jax.Array | None  # () how many tokens the loss averages over
    slice_scores: jax.Array  # (batch, slices)
    inputs_embeds: jax.Array  # (batch, length, embed): the merged LLM input
    hidden_states: jax.Array | None = None  # (batch, length, embed): the LLM's, after its final norm


class Med2E3(nnx.Module):
    """The whole model, built from a `med2e3_jax.config.model_config()`-shaped config.

    Under `nnx.capture(model, nnx.Intermediate)` the forward also records its intermediate tensors,
    named like the golden fixture's outputs.npz (`parity.run_fixture`).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        config_lib.validate_model_config(cfg)
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        attn = dict(kw, attention_impl=cfg.attention_impl)
        remat = dict(remat_policy=cfg.get("remat_policy", "none"))  # LLM and SigLIP layers only
        embed = cfg.llm.hidden_size
        self.uses_slices = cfg.tgis.vision_tokens in ("3d+2d", "2d")
        self.uses_question = self.uses_slices and cfg.tgis.slice_weighting == "tgis"

        self.vision3d = ViT3D(cfg.vision3d, **attn)
        self.vision3d_connector = MLPConnector(cfg.vision3d.hidden_size, embed, **kw)
        if self.uses_slices:
            self.vision2d = SiglipVisionTower(cfg.vision2d, **attn, **remat)
            self.vision2d_connector = MLPConnector(cfg.vision2d.hidden_size, embed, **kw)
            self.tgis = TGIS(
                cfg.tgis, cfg.question_encoder.hidden_size, embed, config_lib.pooled_grid(cfg)[0], **kw
            )
        if self.uses_question:
            self.question_encoder = BertEncoder(cfg.question_encoder, **attn)
        self.llm = Decoder(cfg.llm, **attn, **remat)

    def encode_vision(self, volume, question_ids=None, question_mask=None, *, deterministic=True, rngs=None):
        """The vision tokens of a batch of volumes and the slice scores.

        Args:
          volume: (batch, channels, slices, height, width) in [0, 1].
          question_ids, question_mask: (batch, question_length) BERT ids and mask of the TG-IS question.
        """
        cfg = self.cfg
        volume = volume.astype(jnp.dtype(cfg.dtype))
        encoded = self.vision3d(volume)
        patch_features = encoded.hidden_states[-1][:, 1:]  # last block, before the final norm; no CLS
        self._record(v3d_patch_embed=encoded.patch_embed, v3d_block_outputs=jnp.stack(encoded.hidden_states),
                     v3d_selected=patch_features)
        pooled = spatial_avg_pool(patch_features, self.vision3d.grid, cfg.tgis.pool_stride)
        volume_tokens = self.vision3d_connector(pooled)
        self._record(v3d_pooled=pooled, v3d_tokens=volume_tokens)
        batch, _, slices = volume.shape[:3]
        if not self.uses_slices:
            scores = jnp.full((batch, slices), 1.0 / slices, jnp.float32)
            return VisionOutput(volume_tokens, scores)

        slice_features = self.vision2d(slices_as_images(volume, self.cfg.vision2d))
        slice_tokens = self.vision2d_connector(slice_features)
        slice_tokens = slice_tokens.reshape(batch, slices, *slice_tokens.shape[1:])
        self._record(v2d_selected=slice_features, v2d_slice_tokens=slice_tokens)
        question_feature = None
        if self.uses_question:
            if question_ids is None or question_mask is None:
                raise ValueError("TG-IS needs the question: pass question_ids and question_mask")
            hidden, question_feature = self.question_encoder(question_ids, question_mask)
            self._record(text_cls_hidden=hidden[:, 0], text_pooler=question_feature)
        weighting = self.tgis(volume_tokens, slice_tokens, question_feature, deterministic=deterministic, rngs=rngs)
        self._record(v2d_aggregated=weighting.aggregated, slice_scores=weighting.scores)
        if weighting.keys is not None:
            self._record(score_features=weighting.keys)
        if weighting.logits is not None:
            self._record(score_logits=weighting.logits, text_mlp_out=weighting.question)
        parts = {"3d+2d": (volume_tokens, weighting.aggregated), "2d": (weighting.aggregated,)}
        tokens = jnp.concatenate(parts[cfg.tgis.vision_tokens], axis=1)
        self._record(vision_tokens=tokens)
        return VisionOutput(tokens, weighting.scores)

    def embed_prompt(self, input_ids, attention_mask, vision_tokens):
        """(batch, length, embed) LLM input: see `models/merge.py`."""
        token_embeds = self.llm.embed(text_token_ids(input_ids))
        return merge_vision_tokens(token_embeds, input_ids, attention_mask, vision_tokens)

    def __call__(self, volume, input_ids, attention_mask, labels=None, question_ids=None, question_mask=None,
                 *, deterministic=True, rngs=None):
        """Logits, loss and slice scores for prompts whose `<image3d>` was expanded on the host.

        Args:
          volume: (batch, channels, slices, height, width).
          input_ids: (batch, length) from `expand_image_placeholder` (IMAGE3D_TOKEN_ID at vision positions).
          attention_mask: (batch, length) 0/1.
          labels: (batch, length) with IGNORE_INDEX where unsupervised, or None.
          question_ids, question_mask: (batch, question_length) for TG-IS.
        """
        vision = self.encode_vision(volume, question_ids, question_mask, deterministic=deterministic, rngs=rngs)
        inputs_embeds = self.embed_prompt(input_ids, attention_mask, vision.tokens)
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        out = self.llm(inputs_embeds=inputs_embeds, positions=positions, attention_mask=attention_mask)
        loss = count = None
        if labels is not None:
            loss, count = mean_token_loss(self.llm.head_kernel(), out.hidden_states, labels)
        return Med2E3Output(out.logits, loss, count, vision.slice_scores, inputs_embeds, out.hidden_states)

    def _record(self, **tensors):
        """Sows `tensors` as `nnx.Intermediate`s when the forward runs under `nnx.capture`; outside it
        (training, generation) records nothing: a sow there would store them on the module."""
        if getattr(self, "__captures__", None) is None:
            return
        for name, value in tensors.items():
            self.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, new: new)


def slices_as_images(volume, vision2d_cfg):
    """(batch, 1, slices, height, width) in [0, 1] -> (batch * slices, height, width, channels), batch-major.

    Without `vision2d.slice_windows`: grey images (channels 1), which SigLIP's embedding takes as the single
    CT channel copied to every image channel, as the authors feed SigLIP, without normalisation. With
    them: channel k is the slice in HU (from `vision2d.volume_window`) through window k, scaled to [0, 1].
    """
    batch, _, slices, height, width = volume.shape
    images = jnp.moveaxis(volume, 1, -1).reshape(batch * slices, height, width, volume.shape[1])
    windows = vision2d_cfg.get("slice_windows", ())
    if not windows:
        return images
    floor, ceiling = vision2d_cfg.volume_window
    hu = floor + images.astype(jnp.float32) * (ceiling - floor)
    low, high = (jnp.asarray([w[i] for w in windows], jnp.float32) for i in (0, 1))
    return jnp.clip((hu - low) / (high - low), 0.0, 1.0).astype(volume.dtype)
