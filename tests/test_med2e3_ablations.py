"""The TG-IS ablations are config values through the one model, not copies."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from data_pipelines.image_placeholder import IMAGE3D_TOKEN_ID, expand_image_placeholder  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402


def _run(**tgis):
    cfg = tiny.tiny_model()
    cfg.llm.vocab_size = 64
    cfg.tgis.update(tgis)
    model = Med2E3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    volume = rng.uniform(size=(2, 1, *cfg.vision3d.img_size)).astype(np.float32)
    ids = np.array([[1, IMAGE3D_TOKEN_ID, 5, 6], [1, 7, IMAGE3D_TOKEN_ID, 8]])
    prompts = expand_image_placeholder(ids, np.ones_like(ids), np.where(ids > 4, ids, -100),
                                       num_vision_tokens=config_lib.num_vision_tokens(cfg), max_length=128, pad_id=0)
    questions = np.array([[101, 7, 102], [101, 9, 102]])
    out = nnx.jit(lambda m, *a: m(*a))(model, volume, prompts.input_ids, prompts.attention_mask, prompts.labels,
                                       questions, np.ones_like(questions))
    return model, prompts, out


@pytest.mark.parametrize("vision_tokens,count", [("3d+2d", 16 + 16), ("3d", 16), ("2d", 16)])
def test_vision_tokens_choose_what_goes_into_the_prompt(vision_tokens, count):
    model, prompts, out = _run(vision_tokens=vision_tokens)
    assert (prompts.input_ids == IMAGE3D_TOKEN_ID).sum(axis=1).tolist() == [count, count]
    assert out.logits.shape == (2, 3 + count, 64) and np.isfinite(float(out.loss))
    has_slices = vision_tokens != "3d"
    assert hasattr(model, "vision2d") == has_slices and hasattr(model, "question_encoder") == has_slices


@pytest.mark.parametrize("weighting", ["tgis", "mean", "max", "uniform"])
def test_every_slice_weighting_runs_through_the_same_model(weighting):
    model, _, out = _run(slice_weighting=weighting)
    scores = np.asarray(out.slice_scores)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert hasattr(model, "question_encoder") == (weighting == "tgis")
    if weighting in ("mean", "uniform"):
        np.testing.assert_allclose(scores, 1 / 32)


def test_unknown_ablation_names_the_config_key():
    cfg = tiny.tiny_model()
    cfg.tgis.slice_weighting = "attention"
    with pytest.raises(ValueError, match="tgis.slice_weighting"):
        Med2E3(cfg, rngs=nnx.Rngs(0))


def test_loss_reaches_text_mlp_through_the_slice_scores():
    # The loss reaches text_mlp (and so BERT) only through the TG-IS scores.
    model, prompts, _ = _run()
    volume = np.random.default_rng(1).uniform(size=(2, 1, 32, 64, 64)).astype(np.float32)
    questions = np.array([[101, 7, 102], [101, 9, 102]])

    def loss(m):
        return m(volume, prompts.input_ids, prompts.attention_mask, prompts.labels, questions,
                 np.ones_like(questions)).loss

    grads = nnx.grad(loss)(model)
    assert float(jax.numpy.abs(grads.tgis.text_mlp.kernel[...]).max()) > 0
