"""TG-IS scoring and its ablations, through the one module."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from med2e3_jax.models.tgis import TGIS, slice_keys

BATCH, SLICES, GROUPS, GROUP_TOKENS, TOKENS, EMBED, QDIM = 2, 8, 2, 3, 4, 5, 6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    volume = rng.normal(size=(BATCH, GROUPS * GROUP_TOKENS, EMBED)).astype(np.float32)
    slices = rng.normal(size=(BATCH, SLICES, TOKENS, EMBED)).astype(np.float32)
    question = rng.normal(size=(BATCH, QDIM)).astype(np.float32)
    return volume, slices, question


def _tgis(weighting, dropout=0.1):
    cfg = ml_collections.ConfigDict(dict(slice_weighting=weighting, temperature=5.0, dropout=dropout))
    return TGIS(cfg, QDIM, EMBED, GROUPS, rngs=nnx.Rngs(0))


def test_slice_key_is_one_mean_over_group_and_slice_tokens():
    volume, slices, _ = _inputs()
    expected = np.empty((BATCH, SLICES, EMBED), np.float32)
    per_group = SLICES // GROUPS
    for b in range(BATCH):
        for j in range(SLICES):
            group = volume[b, (j // per_group) * GROUP_TOKENS:(j // per_group + 1) * GROUP_TOKENS]
            expected[b, j] = np.concatenate([group, slices[b, j]], axis=0).mean(axis=0)
    np.testing.assert_allclose(slice_keys(volume, slices, GROUPS), expected, rtol=1e-6, atol=1e-6)


def test_tgis_scores_are_softmax_of_key_dot_question_over_temperature():
    volume, slices, question = _inputs()
    module = _tgis("tgis")
    out = module(volume, slices, question)
    z_t = question @ np.asarray(module.text_mlp.kernel[...]) + np.asarray(module.text_mlp.bias[...])
    logits = np.einsum("bsd,bd->bs", slice_keys(volume, slices, GROUPS), z_t) / 5.0
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    np.testing.assert_allclose(out.scores, scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.aggregated, np.einsum("bs,bsld->bld", scores, slices), rtol=1e-5, atol=1e-6)


def test_dropout_on_scores_acts_only_in_training_and_follows_the_key():
    volume, slices, question = _inputs()
    module = _tgis("tgis", dropout=0.5)
    eval_out = module(volume, slices, question)
    train_a = module(volume, slices, question, deterministic=False, rngs=nnx.Rngs(dropout=1))
    train_b = module(volume, slices, question, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(train_a.aggregated, train_b.aggregated)
    assert not np.allclose(train_a.aggregated, eval_out.aggregated)
    np.testing.assert_array_equal(train_a.scores, eval_out.scores)  # scores are reported before dropout


@pytest.mark.parametrize("weighting", ["mean", "uniform"])
def test_mean_and_uniform_weight_every_slice_equally(weighting):
    volume, slices, question = _inputs()
    out = _tgis(weighting)(volume, slices, question)
    np.testing.assert_allclose(out.aggregated, slices.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.scores, np.full((BATCH, SLICES), 1 / SLICES), rtol=1e-7)


def test_max_takes_the_elementwise_max_and_scores_count_the_winners():
    volume, slices, question = _inputs()
    out = _tgis("max")(volume, slices, question)
    np.testing.assert_array_equal(out.aggregated, slices.max(axis=1))
    winners = slices.argmax(axis=1)  # (batch, tokens, embed)
    expected = np.stack([np.bincount(w.ravel(), minlength=SLICES) for w in winners]) / (TOKENS * EMBED)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-6)


def test_only_tgis_has_a_question_projection():
    assert "text_mlp" in nnx.state(_tgis("tgis"), nnx.Param)
    for weighting in ("mean", "max", "uniform"):
        assert not jax.tree.leaves(nnx.state(_tgis(weighting), nnx.Param))


def test_tgis_without_question_feature_fails_clearly():
    volume, slices, _ = _inputs()
    with pytest.raises(ValueError, match="question feature"):
        _tgis("tgis")(jnp.asarray(volume), jnp.asarray(slices))
