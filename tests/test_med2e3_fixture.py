"""The whole model against the authors' own forward: every tensor of the golden fixture."""

import os

import numpy as np
import pytest
from assets_for_tests import PUBLIC_FIXTURE

from med2e3_jax.parity import run_fixture

FIXTURE = str(PUBLIC_FIXTURE)
REFERENCE = dict(np.load(os.path.join(FIXTURE, "outputs.npz")))


@pytest.fixture(scope="module")
def ours():
    return run_fixture(FIXTURE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_tensor_matches_authors_forward(ours, name):
    ref, got = REFERENCE[name], ours[name]
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, reference {ref.shape}"
    if np.issubdtype(ref.dtype, np.integer):
        np.testing.assert_array_equal(got, ref, err_msg=name)
    elif name == "logits":
        valid = REFERENCE["merged_attention_mask"] > 0  # padded query rows are don't-care
        np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=1e-4, err_msg=name)
    else:
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=name)

