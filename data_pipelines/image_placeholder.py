"""The `<image3d>` placeholder in token ids, and its expansion to one position per vision token.

These are the conventions of a batch: the data pipeline writes them on the host and the model reads
them inside `jit` (`med2e3_jax/models/merge.py`, the loss). They live here, below both, so that the
data code needs nothing from the model package and the model package imports them from the data side.

The authors split each prompt at `<image3d>`, insert the vision tokens, truncate to `llm_max_length`
and right-pad, per sample, in Python. Here the placeholder is expanded at tokenization time
(`expand_image_placeholder`), so that the merge under `jit` works on fixed shapes; together they
reproduce the authors' merged embeddings, labels and mask exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE3D_TOKEN = "<image3d>"  # in the annotations' human turns
IMAGE3D_TOKEN_ID = -201  # the `<image3d>` placeholder in the authors' input_ids
IGNORE_INDEX = -100  # the label of a position the loss skips


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
            raise ValueError(
                f"prompt row {b} has {where.size} {IMAGE3D_TOKEN} placeholders ({IMAGE3D_TOKEN_ID}); expected 1"
            )
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
