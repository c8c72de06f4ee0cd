"""The static-shape prompt merge and the loss, against the authors' semantics."""

import numpy as np
import pytest

from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID, expand_image_placeholder
from med2e3_jax.models.merge import merge_vision_tokens

P = IMAGE3D_TOKEN_ID
I = IGNORE_INDEX


def test_placeholder_expands_in_place_and_pads_right():
    ids = np.array([[1, 5, P, 6, 7, 9], [1, P, 8, 9, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = np.array([[I, I, I, I, 7, 9], [I, I, 8, 9, 0, 0]])  # padding labels are dropped with the mask
    out = expand_image_placeholder(ids, mask, labels, num_vision_tokens=3, max_length=100, pad_id=0)
    np.testing.assert_array_equal(out.input_ids, [[1, 5, P, P, P, 6, 7, 9], [1, P, P, P, 8, 9, 0, 0]])
    np.testing.assert_array_equal(out.labels, [[I, I, I, I, I, I, 7, 9], [I, I, I, I, 8, 9, I, I]])
    np.testing.assert_array_equal(out.attention_mask, [[1] * 8, [1] * 6 + [0] * 2])
    np.testing.assert_array_equal(out.vision_start, [2, 1])


def test_truncation_keeps_the_head_and_pad_to_fixes_the_length():
    ids = np.array([[1, P, 6, 7, 8]])
    out = expand_image_placeholder(ids, np.ones_like(ids), None, num_vision_tokens=4, max_length=6, pad_id=0, pad_to=9)
    np.testing.assert_array_equal(out.input_ids, [[1, P, P, P, P, 6, 0, 0, 0]])
    np.testing.assert_array_equal(out.attention_mask, [[1, 1, 1, 1, 1, 1, 0, 0, 0]])
    assert (out.labels == I).all()


@pytest.mark.parametrize("row", [[1, 5, 6], [1, P, P]])
def test_a_row_without_exactly_one_placeholder_is_named(row):
    ids = np.array([[1, P, 5], row])
    with pytest.raises(ValueError, match="row 1 has"):
        expand_image_placeholder(ids, np.ones_like(ids), None, num_vision_tokens=2, max_length=10, pad_id=0)


def test_pad_to_shorter_than_the_prompt_is_refused():
    ids = np.array([[1, P, 5]])
    with pytest.raises(ValueError, match="pad_to=3"):
        expand_image_placeholder(ids, np.ones_like(ids), None, num_vision_tokens=2, max_length=10, pad_id=0, pad_to=3)


def test_vision_tokens_land_on_their_positions_in_order_and_padding_is_zero():
    ids = np.array([[4, P, P, 5, 0]])
    mask = np.array([[1, 1, 1, 1, 0]])
    token_embeds = np.arange(5, dtype=np.float32)[None, :, None] + 1.0  # position p embeds to p + 1
    vision = np.array([[[-1.0], [-2.0]]])
    merged = np.asarray(merge_vision_tokens(token_embeds, ids, mask, vision))
    np.testing.assert_array_equal(merged[0, :, 0], [1.0, -1.0, -2.0, 4.0, 0.0])
