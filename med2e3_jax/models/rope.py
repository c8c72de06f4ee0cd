"""Rotary position embeddings (rotate-half convention) with the scalings of the supported LLMs.

Three variants, chosen by `cfg.rope_scaling.type` as in transformers:
  - plain RoPE (`rope_scaling=None`): inv_freq_i = 1 / theta^(2i / rotary_dim);
  - LongRoPE (`'longrope'`, Phi-3 128k): inv_freq_i = 1 / (ext_i * theta^(2i / rotary_dim)) with ext the
    `short_factor` while the sequence fits the pre-training length and the `long_factor` beyond it, and
    cos / sin multiplied by an attention factor;
  - Llama 3.1 (`'llama3'`): low frequencies divided by `factor`, a smooth ramp between.

The frequencies are constants, computed once in numpy float32 exactly as transformers computes them in
torch float32, so that they are identical under `jit` (XLA would otherwise fold `theta ** x` with a
different rounding than its run-time kernel).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def head_dim(cfg) -> int:
    """The per-head size: `cfg.head_dim`, or hidden_size // num_heads when it is None."""
    return cfg.get("head_dim") or cfg.hidden_size // cfg.num_heads


def _theta_powers(theta: float, rotary_dim: int) -> np.ndarray:
    """theta ** (2i / rotary_dim) for i < rotary_dim // 2, in float32 (the wavelengths / 2 pi)."""
    return np.float32(theta) ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim))


def _factors(name: str, values, rotary_dim: int) -> np.ndarray:
    factors = np.asarray(list(values), dtype=np.float32)
    if factors.shape != (rotary_dim // 2,):
        raise ValueError(
            f"rope_scaling.{name} has {factors.size} entries; rotary_dim {rotary_dim} needs {rotary_dim // 2}"
        )
    return factors


def _llama3_inv_freq(inv_freq: np.ndarray, scaling) -> np.ndarray:
    # Same float32 operations, in the same order, as transformers' `_compute_llama3_parameters`.
    factor = scaling.factor
    low_freq_factor, high_freq_factor = scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > np.float32(low_freq_wavelen), inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(
        high_freq_factor - low_freq_factor
    )
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < np.float32(high_freq_wavelen)) & ~(wavelen > np.float32(low_freq_wavelen))
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
    """The static description of a RoPE: frequencies per regime and the cos / sin multiplier.

    Attributes:
      inv_freq: (rotary_dim // 2,) inverse frequencies; for LongRoPE those of the short regime.
      long_inv_freq: LongRoPE only: the frequencies used when the sequence is longer than `switch_length`.
      switch_length: LongRoPE only: `original_max_position_embeddings`.
      attention_factor: multiplies cos and sin (LongRoPE's sqrt(1 + ln(max/orig) / ln(orig)); else 1).
    """

    inv_freq: tuple[float, ...]
    long_inv_freq: tuple[float, ...] | None = None
    switch_length: int | None = None
    attention_factor: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    @classmethod
    def from_config(cls, cfg) -> RotaryEmbedding:
        """From the `llm` config: `rope_theta`, `rope_scaling`, `partial_rotary_factor` (default 1)."""
        rotary_dim = int(head_dim(cfg) * (cfg.get("partial_rotary_factor") or 1.0))
        theta_powers = _theta_powers(cfg.rope_theta, rotary_dim)
        inv_freq = np.float32(1.0) / theta_powers
        scaling = cfg.get("rope_scaling")
        kind = None if scaling is None else scaling.type
        if kind is None:
            return cls(tuple(inv_freq.tolist()))
        if kind == "llama3":
            return cls(tuple(_llama3_inv_freq(inv_freq, scaling).tolist()))
        if kind != "longrope":
            raise ValueError(f"rope_scaling.type must be None, 'longrope' or 'llama3', got {kind!r}")

        original = scaling.original_max_position_embeddings
        # The attention factor follows transformers' `_compute_longrope_parameters`: an explicit
        # `attention_factor` wins; `factor` defaults to max_position_embeddings / original.
        factor = scaling.get("factor") or cfg.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short = np.float32(1.0) / (_factors("short_factor", scaling.short_factor, rotary_dim) * theta_powers)
        long = np.float32(1.0) / (_factors("long_factor", scaling.long_factor, rotary_dim) * theta_powers)
        return cls(tuple(short.tolist()), tuple(long.tolist()), int(original), float(attention_factor))

    def cos_sin(self, positions, dtype=jnp.float32):
        """cos and sin of the rotation angles.

        Args:
          positions: (batch, seq) int positions of the tokens of this call.
          dtype: of the result (the activations' dtype); the angles are computed in float32.

        Returns:
          cos, sin: (batch, seq, rotary_dim).

        LongRoPE picks its regime from seq_len = max(positions) + 1 over the whole batch of this call, as
        transformers does: the padded length for a prompt, the current length for a decode step (keys
        already in a KV cache keep the rotation they were written with).
        """
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        if self.long_inv_freq is not None:
            seq_len = jnp.max(positions) + 1
            inv_freq = jnp.where(seq_len > self.switch_length, jnp.asarray(self.long_inv_freq, jnp.float32), inv_freq)
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)
        factor = jnp.float32(self.attention_factor)
        return (jnp.cos(angles) * factor).astype(dtype), (jnp.sin(angles) * factor).astype(dtype)


def rotate_half(x):
    """[x1 | x2] -> [-x2 | x1] over the last axis (the halves convention, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotates the first rotary_dim features of every head.

    Args:
      x: (batch, seq, heads, head_dim).
      cos, sin: (batch, seq, rotary_dim) from `RotaryEmbedding.cos_sin`; rotary_dim <= head_dim, the
        remaining features pass through (partial rotary).

    Returns:
      (batch, seq, heads, head_dim).
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([rotated, x_pass], axis=-1) if x_pass.shape[-1] else rotated
