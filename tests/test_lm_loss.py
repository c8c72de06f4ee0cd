"""The LM loss over hidden states: torch's cross-entropy for every head layout, and one gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.image_placeholder import IGNORE_INDEX
from med2e3_jax.models.lm_loss import (
    HeadLayout,
    head_layout,
    mean_token_loss,
    summed_token_loss,
)

torch = pytest.importorskip("torch")

LAYOUTS = [HeadLayout(), HeadLayout(slots=28), HeadLayout(slots=32), HeadLayout(slots=8), HeadLayout(slots=8, chunk=8),
           HeadLayout(slots=4, chunk=3, groups=2), HeadLayout(slots=20, chunk=7, groups=4), HeadLayout(chunk=16, groups=4),
           HeadLayout(chunk=5)]


@pytest.fixture(scope="module")
def problem():
    """Head (8, 50), hidden (4, 40, 8), labels with 0, 5, 20 and 3 targets in rows 0..3 (28 in all)."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 50)).astype(np.float32)
    hidden = rng.normal(size=(4, 40, 8)).astype(np.float32)
    labels = np.full((4, 40), IGNORE_INDEX)
    labels[1, 10:15] = rng.integers(0, 50, 5)
    labels[2, 20:] = rng.integers(0, 50, 20)
    labels[3, 30:33] = rng.integers(0, 50, 3)
    return kernel, hidden, labels


def _torch_loss(kernel, hidden, labels):
    logits = torch.from_numpy(hidden[:, :-1] @ kernel).reshape(-1, kernel.shape[1])
    return torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(labels[:, 1:]).reshape(-1),
                                             ignore_index=IGNORE_INDEX).item()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_loss_equals_torch_cross_entropy_for_every_head_layout(problem, layout):
    kernel, hidden, labels = problem
    total, count = jax.jit(lambda k, h: summed_token_loss(k, h, jnp.asarray(labels), layout))(kernel, hidden)
    assert int(count) == 28
    np.testing.assert_allclose(float(total) / 28, _torch_loss(kernel, hidden, labels), rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_gradient_equals_the_unchunked_heads(problem, layout):
    kernel, hidden, labels = problem

    def gradient(lay):
        return jax.jit(jax.grad(lambda k, h: summed_token_loss(k, h, jnp.asarray(labels), lay)[0], argnums=(0, 1)))(
            kernel, hidden)

    for name, got, want in zip(("kernel", "hidden"), gradient(layout), gradient(HeadLayout())):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_unchunked_gradient_equals_torch_autograd(problem):
    kernel, hidden, labels = problem
    got = jax.grad(lambda k, h: mean_token_loss(k, h, jnp.asarray(labels))[0], argnums=(0, 1))(kernel, hidden)
    k, h = torch.from_numpy(kernel).double().requires_grad_(), torch.from_numpy(hidden).double().requires_grad_()
    logits = (h[:, :-1] @ k).reshape(-1, kernel.shape[1])
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[:, 1:]).reshape(-1),
                                      ignore_index=IGNORE_INDEX).backward()
    np.testing.assert_allclose(got[0], k.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[1], h.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_a_batch_without_targets_has_zero_loss_and_zero_gradient(problem):
    kernel, hidden, _ = problem
    labels = jnp.full((4, 40), IGNORE_INDEX)
    loss, count = mean_token_loss(kernel, hidden, labels)
    assert int(count) == 0 and float(loss) == 0.0
    grads = jax.grad(lambda k: summed_token_loss(k, hidden, labels, HeadLayout(slots=8, chunk=4))[0])(kernel)
    assert not np.any(np.asarray(grads))


def test_head_layout_refuses_groups_that_do_not_divide_the_rows_and_negative_sizes():
    with pytest.raises(ValueError, match="6 rows do not split into 4 LM-head groups"):
        head_layout((6, 40), groups=4)
    with pytest.raises(ValueError, match="chunk=-2"):
        head_layout((6, 40), chunk=-2)
