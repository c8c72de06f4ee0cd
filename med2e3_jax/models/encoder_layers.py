"""Pieces shared by the bidirectional encoders (SigLIP, BERT, M3D's ViT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax.models.attention import ENCODER_AXES, dot_product_attention
from med2e3_jax.sharding import param_axes


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """`nnx.LayerNorm` with the two-pass variance torch uses (the fast E[x²]-E[x]² loses digits)."""
    return nnx.LayerNorm(
        features, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=param_axes(None), bias_metadata=param_axes(None),
    )


def encoder_linear(in_features: int, out_features: int, axes, *, rngs: nnx.Rngs, use_bias: bool = True,
                   dtype=jnp.float32, param_dtype=jnp.float32, bias_axis: str | None = None):
    """nnx.Linear whose kernel's dimensions carry the logical `axes` (in, out) and its bias `bias_axis`."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_metadata=param_axes(*axes), bias_metadata=param_axes(bias_axis),
    )


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections, scale head_dim**-0.5."""

    def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl="xla"):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_impl = attention_impl

        def linear(axes, bias_axis):
            return encoder_linear(hidden_size, hidden_size, axes, bias_axis=bias_axis, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

        heads_in = ("encoder_embed", "encoder_heads")
        self.q_proj, self.k_proj, self.v_proj = (linear(heads_in, "encoder_heads") for _ in range(3))
        self.out_proj = linear(("encoder_heads", "encoder_embed"), None)

    def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(batch, tokens, embed), optional bool mask (batch, 1, 1, tokens) -> (batch, tokens, embed)."""
        batch, tokens, embed = hidden.shape

        def heads(x):
            return x.reshape(batch, tokens, self.num_heads, self.head_dim)

        attended = dot_product_attention(
            heads(self.q_proj(hidden)), heads(self.k_proj(hidden)), heads(self.v_proj(hidden)),
            mask=mask, scale=self.head_dim**-0.5, implementation=self.attention_impl, axes=ENCODER_AXES,
        )
        return self.out_proj(attended.reshape(batch, tokens, embed))
