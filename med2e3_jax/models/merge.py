"""Putting the vision tokens into the prompt, with static shapes.

The placeholder was expanded on the host, at tokenization time, to one marker position per vision
token (`data_pipelines/image_placeholder.py`); inside `jit` the merge is then a gather and a select
over fixed shapes (`merge_vision_tokens`), which reproduces the authors' merged embeddings exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from data_pipelines.image_placeholder import IMAGE3D_TOKEN_ID


def merge_vision_tokens(token_embeds, input_ids, attention_mask, vision_tokens):
    """The merged LLM input: vision tokens at the marker positions, text embeddings elsewhere, 0 on padding.

    Args:
      token_embeds: (batch, length, embed), embeddings of the ids (markers embedded as anything).
      input_ids: (batch, length) with IMAGE3D_TOKEN_ID at each vision position, in order.
      attention_mask: (batch, length) 0/1.
      vision_tokens: (batch, num_vision_tokens, embed).
    """
    is_vision = input_ids == IMAGE3D_TOKEN_ID
    index = jnp.clip(jnp.cumsum(is_vision, axis=1) - 1, 0, vision_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(vision_tokens, index[..., None], axis=1).astype(token_embeds.dtype)
    embeds = jnp.where(is_vision[..., None], gathered, token_embeds)
    return jnp.where(attention_mask[..., None] > 0, embeds, jnp.zeros_like(embeds))


def text_token_ids(input_ids):
    """The ids with vision markers replaced by 0, so that the embedding lookup stays in range."""
    return jnp.where(input_ids == IMAGE3D_TOKEN_ID, 0, input_ids)
