"""Putting the vision tokens into the prompt, with static shapes.

The authors split each prompt at `<image3d>`, insert the vision tokens, truncate to `llm_max_length`
and right-pad, per sample, in Python. Here the placeholder is expanded on the host, at tokenization
time, to one marker position per vision token (`expand_image_placeholder`); inside `jit` the merge is
then a gather and a select over fixed shapes (`merge_vision_tokens`). Both reproduce the authors'
merged embeddings, labels and mask exactly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from med2e3_jax.config import IGNORE_INDEX, IMAGE3D_TOKEN_ID


@dataclasses.dataclass
class ExpandedPrompts:
    input_ids: np.ndarray  # (batch, length) int32; IMAGE3D_TOKEN_ID at each vision position, pad_id after the end
    labels: np.ndarray  # (batch, length) int32; IGNORE_INDEX on vision, prompt and padding
    attention_mask: np.ndarray  # (batch, length) int32 0/1
    vision_start: np.ndarray  # (batch,) int32: where the vision tokens begin (length of the text before them)


def expand_image_placeholder(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    labels: np.ndarray | None,
    *,
    num_vision_tokens: int,
    max_length: int,
    pad_id: int,
    pad_to: int | None = None,
) -> ExpandedPrompts:
    """The authors' `prepare_inputs_for_multimodal` merge, on token ids.

    Args:
      input_ids: (batch, text_length) with exactly one IMAGE3D_TOKEN_ID per row.
      attention_mask: (batch, text_length), nonzero on real tokens (padding is dropped, as the authors'
        boolean indexing does).
      labels: (batch, text_length) or None (then every position is IGNORE_INDEX).
      num_vision_tokens: positions the vision tokens take (512 for the released model).
      max_length: `llm_max_length`; longer rows keep their head.
      pad_id: id written at padded positions (they are masked; the embeddings there are zeroed).
      pad_to: static length to pad to (>= the longest row); by default the longest row, as the authors.
    """
    input_ids = np.asarray(input_ids)
    keep = np.asarray(attention_mask).astype(bool)
    labels = np.full_like(input_ids, IGNORE_INDEX) if labels is None else np.asarray(labels)
    rows, row_labels, starts = [], [], []
    for b in range(input_ids.shape[0]):
        ids, lab = input_ids[b][keep[b]], labels[b][keep[b]]
        where = np.flatnonzero(ids == IMAGE3D_TOKEN_ID)
        if where.size != 1:
            raise ValueError(f"prompt row {b} has {where.size} <image3d> placeholders ({IMAGE3D_TOKEN_ID}); expected 1")
        start = int(where[0])
        ids = np.concatenate([ids[:start], np.full(num_vision_tokens, IMAGE3D_TOKEN_ID), ids[start + 1:]])
        lab = np.concatenate([lab[:start], np.full(num_vision_tokens, IGNORE_INDEX), lab[start + 1:]])
        rows.append(ids[:max_length])
        row_labels.append(lab[:max_length])
        starts.append(start)
    length = max(len(r) for r in rows)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest merged prompt ({length} positions)")
        length = pad_to
    out_ids = np.full((len(rows), length), pad_id, np.int32)
    out_labels = np.full((len(rows), length), IGNORE_INDEX, np.int32)
    out_mask = np.zeros((len(rows), length), np.int32)
    for b, (ids, lab) in enumerate(zip(rows, row_labels)):
        out_ids[b, : len(ids)] = ids
        out_labels[b, : len(lab)] = lab
        out_mask[b, : len(ids)] = 1
    return ExpandedPrompts(out_ids, out_labels, out_mask, np.asarray(starts, np.int32))


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
