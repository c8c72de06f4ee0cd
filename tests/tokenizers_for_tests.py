"""Expected encodings for the template tests, written out piece by piece (never by the template code
under test), for the tiny tokenizers of `data_pipelines.tiny_tokenizers`."""

from __future__ import annotations

import numpy as np

from data_pipelines.image_placeholder import IGNORE_INDEX


def ids_of(tokenizer, pieces):
    """Token ids of hand-written pieces; ints (the vision marker) pass through."""
    out = []
    for piece in pieces:
        out.extend([piece] if isinstance(piece, int) else tokenizer.convert_tokens_to_ids([piece]))
    assert tokenizer.unk_token_id not in out or "<unk>" in pieces, "a hand-written piece is not in the vocabulary"
    return out


def expected(tokenizer, segments, length):
    """(ids, labels, mask) from [(pieces, supervised), ...], right-padded to `length`."""
    ids, labels = [], []
    for pieces, supervised in segments:
        piece_ids = ids_of(tokenizer, pieces)
        ids += piece_ids
        labels += piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids)
    n = len(ids)
    pad = tokenizer.pad_token_id
    return (
        np.array(ids + [pad] * (length - n), np.int32),
        np.array(labels + [IGNORE_INDEX] * (length - n), np.int32),
        np.array([1] * n + [0] * (length - n), np.int32),
    )
