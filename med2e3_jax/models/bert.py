"""BERT: the question encoder of TG-IS (M3D-CLIP's `language_encoder`).

Med-2E3 scores slices against `pooler_output` = tanh(dense(h_CLS)) of M3D-CLIP's BERT, run on the
separately tokenized question. The encoder is frozen in both training stages and run in eval mode, so
there is no dropout.

Post-LayerNorm BERT as in HF `BertModel`: absolute learned positions 0..L-1, token types (0 by default),
padded keys excluded from attention. Names mirror HF where Python allows (`attention.self.query`
becomes `attention.q_proj`, `LayerNorm` becomes `layer_norm`); `checkpoint/bert_port.py` states the correspondence.

Config (`question_encoder`): vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax.models.attention import padding_mask
from med2e3_jax.models.encoder_layers import SelfAttention, encoder_linear, layer_norm
from med2e3_jax.sharding import param_axes

# HF activation names: 'gelu' is the exact (erf) GELU, 'gelu_new' / 'gelu_pytorch_tanh' the tanh approximation.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


class BertEmbeddings(nnx.Module):
    """word + token type + absolute position embeddings, then LayerNorm."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        def embed(num, rows_axis=None):
            return nnx.Embed(num, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             embedding_metadata=param_axes(rows_axis, None))

        self.max_positions = cfg.max_position_embeddings
        # The tables feed the residual stream: the word embeddings split their rows, not `embed`
        # (sharding.py); the small position and token type tables are kept whole.
        self.word_embeddings = embed(cfg.vocab_size, "encoder_vocab")
        self.position_embeddings = embed(cfg.max_position_embeddings)
        self.token_type_embeddings = embed(cfg.type_vocab_size)
        self.layer_norm = layer_norm(
            cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """(batch, length) ids -> (batch, length, embed)."""
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(
                f"question length {length} exceeds BERT's max_position_embeddings {self.max_positions}"
            )
        # HF's summation order, so that float rounding matches.
        embedded = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embedded = embedded + self.position_embeddings(jnp.arange(length))[None]
        return self.layer_norm(embedded)


class BertLayer(nnx.Module):
    """Post-LayerNorm block: norm(x + attention(x)), then norm(x + output(act(intermediate(x))))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {cfg.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[cfg.hidden_act]
        # HF's `attention.self.{query,key,value}` and `attention.output.dense`.
        self.attention = SelfAttention(
            cfg.hidden_size, cfg.num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
            attention_impl=attention_impl,
        )
        self.attention_norm = layer_norm(
            cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.intermediate = encoder_linear(
            cfg.hidden_size, cfg.intermediate_size, ("encoder_embed", "encoder_mlp"), bias_axis="encoder_mlp",
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.output = encoder_linear(
            cfg.intermediate_size, cfg.hidden_size, ("encoder_mlp", "encoder_embed"), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )
        self.output_norm = layer_norm(
            cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = self.attention_norm(hidden + self.attention(hidden, mask))
        return self.output_norm(hidden + self.output(self.activation(self.intermediate(hidden))))


class BertPooler(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dense = encoder_linear(cfg.hidden_size, cfg.hidden_size, ("encoder_embed", None), dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """(batch, length, embed) -> (batch, embed) from the first ([CLS]) token."""
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertEncoder(nnx.Module):
    """Question ids -> (last hidden state, pooler output), as HF `BertModel` in eval mode."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        self.embeddings = BertEmbeddings(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List(
            [
                BertLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
                for _ in range(cfg.num_layers)
            ]
        )
        self.pooler = BertPooler(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes a padded batch of questions.

        Args:
          input_ids: (batch, length) int token ids.
          attention_mask: (batch, length), nonzero / True on real tokens; padded keys are not attended to
            (padded query positions still get a don't-care output, as in HF).
          token_type_ids: (batch, length) int, zeros when None.

        Returns:
          last_hidden_state (batch, length, embed) and pooler_output (batch, embed).
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        mask = padding_mask(attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden, self.pooler(hidden)
