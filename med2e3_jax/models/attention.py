"""Scaled dot-product attention shared by every encoder and the decoder.

The implementation is a config value (`model.attention_impl`), so that the modules never branch on the
backend themselves:
  - `xla` (default): `jax.nn.dot_product_attention`'s XLA path; runs everywhere, float32 included.
  - `cudnn`: cuDNN's fused (flash) attention on NVIDIA GPUs, where it accepts the call, and the XLA
    path where it does not, with one logged warning per rejected shape naming the shapes, the dtype
    and cuDNN's reason. cuDNN rejects, when tracing: a machine without cuDNN (CPU, TPU:
    RuntimeError), float32 inputs and a head_dim that is not a multiple of 8 or too large for the
    installed cuDNN (NotImplementedError), and masks it cannot take as a bias (ValueError). It
    also cannot partition attention heads, so under tensor parallelism (`mesh.tensor` > 1) `cudnn`
    uses XLA from the start: that rejection would only come at compile time, too late to fall
    back. The fallback computes the same function, so a `cudnn` config runs unchanged on CPU and
    gives the XLA result there.

Every layer's queries, keys, values and output are pinned to the batch (and head) split of the mesh
they are traced on (`sharding.constrain`), which keeps FSDP from running a layer on the global batch.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from med2e3_jax import sharding
from med2e3_jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

logger = logging.getLogger(__name__)

# What cuDNN raises, at trace time, for a call it does not support (see the module docstring).
_CUDNN_REJECTIONS = (RuntimeError, NotImplementedError, ValueError)
_warned: set[tuple] = set()

_QUERY_AXES = ("batch", None, "heads", None)
_KEY_VALUE_AXES = ("batch", None, "kv_heads", None)


def dot_product_attention(query, key, value, *, mask=None, scale=None, implementation="xla"):
    """Softmax attention with grouped-query support.

    Args:
      query: (batch, q_len, heads, head_dim).
      key, value: (batch, kv_len, kv_heads, head_dim); `heads` must be a multiple of `kv_heads`.
      mask: bool, broadcastable to (batch, heads, q_len, kv_len); True where a query may attend.
      scale: multiplier of the logits; head_dim ** -0.5 when None.
      implementation: one of IMPLEMENTATIONS; `cudnn` falls back to `xla` where cuDNN rejects the call.

    Returns:
      (batch, q_len, heads, head_dim) in the dtype of `query`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"query heads ({query.shape[2]}) must be a multiple of key/value heads ({key.shape[2]})")
    query = sharding.constrain(query, _QUERY_AXES)
    key = sharding.constrain(key, _KEY_VALUE_AXES)
    value = sharding.constrain(value, _KEY_VALUE_AXES)
    out = None
    if implementation == "cudnn":
        out = _cudnn_or_none(query, key, value, mask, scale)
    if out is None:
        out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation="xla")
    return sharding.constrain(out, _QUERY_AXES)


def _cudnn_or_none(query, key, value, mask, scale):
    """cuDNN's attention, or None (after a warning, once per shape and reason) where it rejects the call."""
    if _splits_heads(query):
        reason = "cuDNN attention cannot partition heads over the mesh's tensor axis"
    else:
        if mask is not None:
            # cuDNN takes a mask as a bias of the full (q_len, kv_len); the encoders' padding masks
            # broadcast over the queries.
            mask = jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
        try:
            return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation="cudnn")
        except _CUDNN_REJECTIONS as err:
            reason = f"{type(err).__name__}: {err}"
    what = (tuple(query.shape), tuple(key.shape), str(query.dtype), None if mask is None else tuple(mask.shape))
    if (what, reason) not in _warned:
        _warned.add((what, reason))
        logger.warning(
            "attention_impl='cudnn': cuDNN rejected query %s, key/value %s, dtype %s, mask %s (%s); "
            "using the XLA implementation for this shape", *what, reason,
        )
    return None


def _splits_heads(query) -> bool:
    mesh = getattr(getattr(jax.typeof(query), "sharding", None), "mesh", None)
    return bool(mesh is not None and not mesh.empty and mesh.shape.get("tensor", 1) > 1)


def padding_mask(attention_mask):
    """(batch, kv_len) 0/1 mask of real tokens -> (batch, 1, 1, kv_len) bool, for bidirectional encoders."""
    return (attention_mask > 0)[:, None, None, :]


def causal_mask(query_positions, key_positions, key_valid):
    """Causal + padding mask from explicit positions, which also serves the KV cache.

    Args:
      query_positions: (batch, q_len) int positions of the queries.
      key_positions: (batch, kv_len) int positions of the keys (cache slots hold their own position).
      key_valid: (batch, kv_len) bool, False for padding or unwritten cache slots.

    Returns:
      (batch, 1, q_len, kv_len) bool.
    """
    allowed = key_positions[:, None, :] <= query_positions[:, :, None]
    return (allowed & key_valid[:, None, :])[:, None, :, :]
