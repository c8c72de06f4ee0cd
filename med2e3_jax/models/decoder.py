"""The decoder-only LLM: Llama, Phi-3 and Qwen2 (pre-norm, RMSNorm, RoPE, grouped-query attention, SiLU MLP).

The three families differ only in config values, routed through one code path:
  - Phi-3: fused `qkv_proj` = [q | k | v] and `gate_up_proj` = [gate | up], LongRoPE;
  - Qwen2: biases on q / k / v (not on o);
  - Llama: separate projections, no biases, optionally Llama-3.1 RoPE scaling.

Attribute names mirror transformers' `*ForCausalLM` (`embed_tokens`, `layers.{i}.self_attn.q_proj`, …),
so that `checkpoint/llm_port.py` reads as a list of renames.

Config (`llm` sub-config): family, vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
num_kv_heads, head_dim (None: hidden_size // num_heads), rms_norm_eps, rope_theta, rope_scaling (None or
`type` 'longrope' / 'llama3', see `rope.py`), partial_rotary_factor (optional, default 1),
max_position_embeddings, sliding_window (optional, default None), tie_word_embeddings, qkv_bias, fused_qkv,
fused_gate_up; `checkpoint/llm_port.llm_config_from_hf` builds it from a transformers config.

A KV cache holds, per layer, the keys (already rotated) and values of every position written so far at
the slot = the token's position, per batch row. One call handles a whole prompt (prefill) or one new token
per row (decode), and rows may sit at different positions (prompts of different lengths in one batch).
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
from flax import nnx, struct

from med2e3_jax.models.attention import DECODER_AXES, causal_mask, dot_product_attention
from med2e3_jax.models.remat import remat_layer
from med2e3_jax.models.rope import RotaryEmbedding, apply_rotary, head_dim
from med2e3_jax.sharding import param_axes

FAMILIES = ("llama", "phi3", "qwen2")


@struct.dataclass
class KVCache:
    """Keys and values of every layer, written at slot = position.

    Attributes:
      keys, values: one (batch, max_len, kv_heads, head_dim) array per layer (a tuple, so that each
        layer's write is an in-place update of its own buffer); keys carry their rotary embedding.
      key_positions: (batch, max_len) int32, the position of the token in each slot.
      key_valid: (batch, max_len) bool, False for slots never written.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_positions: jax.Array
    key_valid: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


class DecoderOutput(typing.NamedTuple):
    """logits: (batch, seq, vocab) float32; hidden_states: (batch, seq, embed) after the final norm."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: KVCache | None


def _linear(cfg, in_features, out_features, *, axes, use_bias, rngs, dtype, param_dtype):
    """nnx.Linear whose kernel's dimensions carry the logical `axes` (in, out), and its bias the out one."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=nnx.initializers.normal(cfg.get("initializer_range", 0.02)),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata=param_axes(*axes),
        bias_metadata=param_axes(axes[1]),
    )


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, as transformers computes it: statistics in float32, the scale in the input dtype."""

    def __init__(self, features: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), **param_axes(None))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        input_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(input_dtype)
        return self.weight.get_value().astype(self.dtype) * normed


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings; reads and writes the layer's KV cache."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        self.attention_impl = attention_impl
        self.fused_qkv = cfg.fused_qkv
        linear = lambda i, o, axes, bias: _linear(  # noqa: E731
            cfg, i, o, axes=axes, use_bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = linear(cfg.hidden_size, q_size + 2 * kv_size, ("embed", "heads"), cfg.qkv_bias)
        else:
            self.q_proj = linear(cfg.hidden_size, q_size, ("embed", "heads"), cfg.qkv_bias)
            self.k_proj = linear(cfg.hidden_size, kv_size, ("embed", "kv_heads"), cfg.qkv_bias)
            self.v_proj = linear(cfg.hidden_size, kv_size, ("embed", "kv_heads"), cfg.qkv_bias)
        self.o_proj = linear(q_size, cfg.hidden_size, ("heads", "embed"), False)

    def __call__(self, x, *, cos, sin, mask, layer_cache=None, write_slots=None):
        """
        Args:
          x: (batch, seq, embed).
          cos, sin: (batch, seq, rotary_dim).
          mask: (batch, 1, seq, keys) bool; keys = seq without a cache, max_len with one.
          layer_cache: None, or (keys, values) of this layer, each (batch, max_len, kv_heads, head_dim).
          write_slots: (batch, seq) cache slot of each token (max_len for tokens not to be written).

        Returns:
          (batch, seq, embed), and the updated (keys, values) or None.
        """
        batch, seq, _ = x.shape
        if self.fused_qkv:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            query, key, value = jnp.split(self.qkv_proj(x), [q_size, q_size + kv_size], axis=-1)
        else:
            query, key, value = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        query = apply_rotary(query.reshape(batch, seq, self.num_heads, self.head_dim), cos, sin)
        key = apply_rotary(key.reshape(batch, seq, self.num_kv_heads, self.head_dim), cos, sin)
        value = value.reshape(batch, seq, self.num_kv_heads, self.head_dim)

        if layer_cache is not None:
            rows = jnp.arange(batch)[:, None]
            cached_keys, cached_values = layer_cache
            # Out-of-range slots (padding tokens, see `Decoder.__call__`) are dropped, not clamped.
            key = cached_keys.at[rows, write_slots].set(key.astype(cached_keys.dtype), mode="drop")
            value = cached_values.at[rows, write_slots].set(value.astype(cached_values.dtype), mode="drop")
            layer_cache = (key, value)
        out = dot_product_attention(
            query, key.astype(query.dtype), value.astype(query.dtype),
            mask=mask, scale=self.head_dim**-0.5, implementation=self.attention_impl, axes=DECODER_AXES,
        )
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim)), layer_cache


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); Phi-3 stores gate and up as one `gate_up_proj` = [gate | up]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        linear = lambda i, o, axes: _linear(  # noqa: E731
            cfg, i, o, axes=axes, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.fused_gate_up = cfg.fused_gate_up
        if cfg.fused_gate_up:
            self.gate_up_proj = linear(cfg.hidden_size, 2 * cfg.intermediate_size, ("embed", "mlp"))
        else:
            self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
            self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

    def __call__(self, x):
        if self.fused_gate_up:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(up * jax.nn.silu(gate))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(
            cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, *, cos, sin, mask, layer_cache=None, write_slots=None):
        attended, layer_cache = self.self_attn(
            self.input_layernorm(x), cos=cos, sin=sin, mask=mask, layer_cache=layer_cache, write_slots=write_slots
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


def _call_layer(layer, x, cos, sin, mask, layer_cache, write_slots):
    return layer(x, cos=cos, sin=sin, mask=mask, layer_cache=layer_cache, write_slots=write_slots)


class Decoder(nnx.Module):
    """A `*ForCausalLM`: token embedding, `num_layers` decoder layers, final RMSNorm, LM head."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla",
                 remat_policy="none"):
        if cfg.family not in FAMILIES:
            raise ValueError(f"llm.family must be one of {FAMILIES}, got {cfg.family!r}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"llm.num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads ({cfg.num_kv_heads})")
        self.num_layers, self.num_kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, head_dim(cfg)
        self.sliding_window = cfg.get("sliding_window")
        self.tie_word_embeddings = cfg.tie_word_embeddings
        self.dtype = dtype
        self.remat_policy = remat_policy  # see models/remat.py
        self.rope = RotaryEmbedding.from_config(cfg)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nnx.initializers.normal(cfg.get("initializer_range", 0.02)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            # Rows, not `embed`: the table feeds the residual stream (sharding.py).
            embedding_metadata=param_axes("vocab", None),
        )
        self.layers = nnx.List(
            DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(
                cfg, cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs, dtype=dtype,
                param_dtype=param_dtype,
            )

    def embed(self, input_ids):
        """(batch, seq) token ids -> (batch, seq, embed)."""
        return self.embed_tokens(input_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` positions (every slot invalid)."""
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        dtype = dtype or self.dtype
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(self.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(self.num_layers)),
            key_positions=jnp.zeros((batch, max_len), jnp.int32),
            key_valid=jnp.zeros((batch, max_len), bool),
        )

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions, attention_mask, cache=None) -> DecoderOutput:
        """Causal LM forward over a prompt, or one decode step when given a cache.

        Args:
          input_ids: (batch, seq) token ids; or else
          inputs_embeds: (batch, seq, embed).
          positions: (batch, seq) int position of each token (RoPE, causality and the cache slot).
          attention_mask: (batch, seq) 1 on real tokens, 0 on padding.
          cache: None (attend over this call's tokens), or a `KVCache`: this call's keys and values are
            written at slot = position (padding tokens are not written), then every query attends over
            the valid cache slots at positions <= its own.

        Returns:
          DecoderOutput(logits (batch, seq, vocab) float32, hidden_states (batch, seq, embed), cache).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        if positions.shape != x.shape[:2] or attention_mask.shape != x.shape[:2]:
            raise ValueError(
                f"positions {positions.shape} and attention_mask {attention_mask.shape} must both be "
                f"(batch, seq) = {x.shape[:2]}"
            )
        positions = positions.astype(jnp.int32)
        valid = attention_mask > 0
        cos, sin = self.rope.cos_sin(positions, x.dtype)

        if cache is None:
            key_positions, key_valid, write_slots = positions, valid, None
        else:
            rows = jnp.arange(positions.shape[0])[:, None]
            write_slots = jnp.where(valid, positions, cache.max_len)
            key_positions = cache.key_positions.at[rows, write_slots].set(positions, mode="drop")
            key_valid = cache.key_valid.at[rows, write_slots].set(True, mode="drop")
        mask = causal_mask(positions, key_positions, key_valid)
        if self.sliding_window is not None:
            # transformers' sliding window: key j is visible from query i iff j > i - window.
            mask &= (key_positions[:, None, :] > positions[:, :, None] - self.sliding_window)[:, None]

        new_keys, new_values = [], []
        call_layer = remat_layer(_call_layer, self.remat_policy)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_cache = call_layer(layer, x, cos, sin, mask, layer_cache, write_slots)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
        if cache is not None:
            cache = KVCache(tuple(new_keys), tuple(new_values), key_positions, key_valid)

        hidden_states = self.norm(x)
        return DecoderOutput(self.logits(hidden_states), hidden_states, cache)

    def head_kernel(self):
        """The LM head as one (embed, vocab) matrix in the compute dtype, so that `logits(h)` is
        `h @ head_kernel()`: the tied embedding table transposed, or `lm_head`'s kernel."""
        kernel = self.embed_tokens.embedding[...].T if self.tie_word_embeddings else self.lm_head.kernel[...]
        return kernel.astype(self.dtype)

    def logits(self, hidden_states):
        """(..., embed) final-norm hidden states -> (..., vocab) float32 logits (the LM head).

        Training applies it to the supervised positions only (`train/step.py`)."""
        if self.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden_states)
        else:
            logits = self.lm_head(hidden_states)
        return logits.astype(jnp.float32)
