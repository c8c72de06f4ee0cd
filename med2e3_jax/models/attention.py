"""Scaled dot-product attention shared by every encoder and the decoder.

The implementation is a config value (`xla` everywhere, `cudnn` on NVIDIA GPUs), so that the modules
never branch on the backend themselves.
"""

import jax

IMPLEMENTATIONS = ("xla", "cudnn")


def dot_product_attention(query, key, value, *, mask=None, scale=None, implementation="xla"):
    """Softmax attention with grouped-query support.

    Args:
      query: (batch, q_len, heads, head_dim).
      key, value: (batch, kv_len, kv_heads, head_dim); `heads` must be a multiple of `kv_heads`.
      mask: bool, broadcastable to (batch, heads, q_len, kv_len); True where a query may attend.
      scale: multiplier of the logits; head_dim ** -0.5 when None.
      implementation: one of IMPLEMENTATIONS.

    Returns:
      (batch, q_len, heads, head_dim) in the dtype of `query`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"query heads ({query.shape[2]}) must be a multiple of key/value heads ({key.shape[2]})")
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, implementation=implementation
    )


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

