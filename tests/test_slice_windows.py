"""Multi-window slice channels: SigLIP's three channels as three HU windows of the slice."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from data_pipelines.image_placeholder import IMAGE3D_TOKEN_ID, expand_image_placeholder  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3, slices_as_images  # noqa: E402


def test_windows_of_a_known_slice_equal_the_hand_computed_ones():
    cfg = ml_collections.ConfigDict(dict(slice_windows=config_lib.CT_SLICE_WINDOWS, volume_window=(-1000.0, 1000.0)))
    # One 1 x 3 slice: -1000 HU, 0 HU, +1000 HU after the volume's window (0, 0.5, 1).
    volume = jnp.asarray([0.0, 0.5, 1.0], jnp.float32).reshape(1, 1, 1, 1, 3)
    images = np.asarray(slices_as_images(volume, cfg))
    assert images.shape == (1, 1, 3, 3)
    # lung (-1350, 150): (HU + 1350) / 1500; soft tissue (-160, 240): (HU + 160) / 400;
    # bone (-450, 1050): (HU + 450) / 1500.
    expected = [[350 / 1500, 0.0, 0.0], [1350 / 1500, 160 / 400, 450 / 1500], [1.0, 1.0, 1450 / 1500]]
    np.testing.assert_allclose(images[0, 0], expected, rtol=1e-6)


def test_without_windows_the_slice_stays_one_grey_channel():
    volume = jnp.linspace(0, 1, 2 * 3 * 4 * 4).reshape(2, 1, 3, 4, 4)
    grey = ml_collections.ConfigDict(dict(slice_windows=(), volume_window=(-1000.0, 1000.0)))
    images = slices_as_images(volume, grey)
    np.testing.assert_array_equal(np.asarray(images), np.asarray(volume).reshape(6, 4, 4, 1))


def test_windows_must_be_one_pair_per_channel():
    cfg = tiny.tiny_model()
    cfg.vision2d.slice_windows = ((-1000.0, 0.0), (0.0, 1000.0))
    with pytest.raises(ValueError, match="vision2d.slice_windows"):
        config_lib.validate_model_config(cfg)


def test_multi_window_model_forward_and_gradient_on_the_tiny_config():
    def loss_and_grad(windows):
        cfg = tiny.tiny_model()
        cfg.llm.vocab_size = 64
        cfg.vision2d.slice_windows = windows
        config_lib.validate_model_config(cfg)
        model = Med2E3(cfg, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(0)
        volume = rng.uniform(size=(2, 1, *cfg.vision3d.img_size)).astype(np.float32)
        ids = np.array([[1, IMAGE3D_TOKEN_ID, 5, 6], [1, 7, IMAGE3D_TOKEN_ID, 8]])
        prompts = expand_image_placeholder(ids, np.ones_like(ids), np.where(ids > 4, ids, -100),
                                           num_vision_tokens=config_lib.num_vision_tokens(cfg), max_length=128,
                                           pad_id=0)
        questions = np.array([[101, 7, 102], [101, 9, 102]])

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            return nnx.merge(graphdef, params, rest)(volume, prompts.input_ids, prompts.attention_mask,
                                                     prompts.labels, questions, np.ones_like(questions)).loss

        value, grads = jax.value_and_grad(loss)(params)
        return value, grads["vision2d"]

    grey_loss, _ = loss_and_grad(())
    loss, grads = loss_and_grad(config_lib.CT_SLICE_WINDOWS)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    assert float(loss) != float(grey_loss)  # the channels reach SigLIP
