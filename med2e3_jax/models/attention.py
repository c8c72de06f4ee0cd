"""Scaled dot-product attention shared by every encoder and the decoder.

The implementation is a config value (`model.attention_impl`), so that the modules never branch on the
backend themselves:
  - `xla` (default): `jax.nn.dot_product_attention`'s XLA path; runs everywhere, float32 included.
  - `cudnn`: cuDNN's fused (flash) attention on NVIDIA GPUs, where it accepts the call, and the XLA
    path where it does not, with one logged warning per rejected shape naming the shapes, the dtype
    and cuDNN's reason. cuDNN rejects, when tracing: a machine without cuDNN (CPU, TPU:
    RuntimeError), float32 inputs and a head_dim that is not a multiple of 8 or too large for the
    installed cuDNN (NotImplementedError), and masks it cannot take as a bias (ValueError). It
    also cannot partition attention heads, so where the current sharding rules split the heads
    (the LLM's under tensor parallelism) `cudnn` uses XLA from the start: that rejection would only
    come at compile time, too late to fall back. The fallback computes the same function, so a `cudnn` config runs unchanged on CPU and
    gives the XLA result there.

Every layer's queries, keys, values and output are pinned to the batch (and head) split of the mesh
they are traced on (`sharding.constrain`), which keeps FSDP from running a layer on the global batch.
The logical names are the caller's (`AttentionAxes`): the LLM's (`DECODER_AXES`) and the encoders'
(`ENCODER_AXES`) have rules of their own, so that a layout can split one and not the other.
"""

from __future__ import annotations

import logging
import typing

import jax
import jax.numpy as jnp

from med2e3_jax import sharding
from med2e3_jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

logger = logging.getLogger(__name__)

# What cuDNN raises, at trace time, for a call it does not support (see the module docstring).
_CUDNN_REJECTIONS = (RuntimeError, NotImplementedError, ValueError)
_warned: set[tuple] = set()



class AttentionAxes(typing.NamedTuple):
    """Logical names of the batch, query-head and key/value-head dimensions of an attention call."""

    batch: str
    heads: str
    kv_heads: str

    def query(self):
        return (self.batch, None, self.heads, None)

    def key_value(self):
        return (self.batch, None, self.kv_heads, None)


DECODER_AXES = AttentionAxes("batch", "heads", "kv_heads")
ENCODER_AXES = AttentionAxes("encoder_batch", "encoder_heads", "encoder_heads")


def dot_product_attention(query, key, value, *, mask=None, scale=None, implementation="xla",
                          axes: AttentionAxes = DECODER_AXES):
    """Softmax attention with grouped-query support.

    Args:
      query: (batch, q_len, heads, head_dim).
      key, value: (batch, kv_len, kv_heads, head_dim); `heads` must be a multiple of `kv_heads`.
      mask: bool, broadcastable to (batch, heads, q_len, kv_len); True where a query may attend.
      scale: multiplier of the logits; head_dim ** -0.5 when None.
      implementation: one of IMPLEMENTATIONS; `cudnn` falls back to `xla` where cuDNN rejects the call.
      axes: the logical names the inputs and output are constrained to (`sharding.constrain`).

    Returns:
      (batch, q_len, heads, head_dim) in the dtype of `query`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"query heads ({query.shape[2]}) must be a multiple of key/value heads ({key.shape[2]})")
    query = sharding.constrain(query, axes.query())
    key = sharding.constrain(key, axes.key_value())
    value = sharding.constrain(value, axes.key_value())
    out = None
    if implementation == "cudnn":
        out = _cudnn_or_none(query, key, value, mask, scale, axes)
    if out is None:
        out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation="xla")
    return sharding.constrain(out, axes.query())


def _cudnn_or_none(query, key, value, mask, scale, axes):
    """cuDNN's attention, or None (after a warning, once per shape and reason) where it rejects the call."""
    split_over = _head_split(query, axes)
    if split_over:
        reason = (f"cuDNN attention cannot partition heads, and the sharding rules split {axes.heads!r} over "
                  f"the mesh's {' x '.join(split_over)} axis")
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


def _head_split(query, axes: AttentionAxes) -> tuple[str, ...]:
    """The mesh axes (of the mesh `query` is traced on) the current rules split its heads over."""
    mesh = getattr(getattr(jax.typeof(query), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or not set(sharding.AXES) <= set(mesh.shape):
        return ()
    names = dict.fromkeys((axes.heads, axes.kv_heads))
    return tuple(dict.fromkeys(a for name in names for a in sharding.mesh_axes(name) if mesh.shape[a] > 1))


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
