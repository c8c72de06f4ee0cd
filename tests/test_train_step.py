"""The training step: what each stage freezes, token-weighted gradient accumulation, the learning-rate
schedule, bf16 compute over float32 weights, and rematerialisation that changes nothing numerically."""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from batches_for_tests import small_config, supervised_tokens  # noqa: E402

from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402
from med2e3_jax.random_batches import random_batch  # noqa: E402
from med2e3_jax.train.state import learning_rate, make_optimizer, warmup_steps  # noqa: E402
from med2e3_jax.models.lm_loss import HeadLayout  # noqa: E402
from med2e3_jax.train.step import _split_micro_batches, eval_step, train_head_layout, train_step  # noqa: E402
from med2e3_jax.train_config import TRAINABLE  # noqa: E402


def _params(model):
    """A host copy (the step donates the model's buffers)."""
    return {path: np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _setup(stage="finetune", *, seed=0, model_updates=None, **train):
    config = small_config(stage, **train)
    config.model.update(model_updates or {})
    model = Med2E3(config.model, rngs=nnx.Rngs(seed))
    return config, model, make_optimizer(model, config.train)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_frozen_parameters_stay_bit_identical_and_get_no_optimizer_state(stage):
    config, model, optimizer = _setup(stage, warmup_ratio=0.0)
    before = _params(model)
    for step in range(2):
        metrics = train_step(model, optimizer, random_batch(config, 4, seed=step), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    after = _params(model)
    trainable = set(TRAINABLE[stage])
    for path, value in after.items():
        if path[0] in trainable:
            assert not np.array_equal(value, before[path]), f"trainable {path} did not move"
        else:
            assert np.array_equal(value, before[path]), f"frozen {path} changed"
    # Adam's moments exist for the trainable parameters only, once each.
    moment_paths = {path for path, _ in nnx.to_flat_state(nnx.state(optimizer)) if "mu" in path}
    moment_params = {path[path.index("mu") + 1:] for path in moment_paths}
    assert moment_params == {path for path in after if path[0] in trainable}


def test_gradient_accumulation_equals_one_batch_k_times_larger():
    micro_batches = 2
    # Micro-batch j takes rows j, k + j, ...: rows 0, 2, 4, 6 have 1-token answers, rows 1, 3, 5, 7
    # 6-token ones, so the micro-batches supervise 8 and 28 tokens and a mean of micro-batch means
    # would weight the tokens unequally.
    answers = [1, 6] * 4
    no_dropout = dict(tgis=dict(dropout=0.0))  # dropout draws differ between micro-batch layouts
    batch = random_batch(small_config(), 8, seed=3, answer_lengths=answers)
    counts = _split_micro_batches(supervised_tokens(batch), micro_batches).sum(axis=1)
    assert counts.tolist() == [8, 28]

    results = []
    for k in (1, micro_batches):
        _, model, optimizer = _setup(model_updates=no_dropout, warmup_ratio=0.0)
        metrics = jax.device_get(train_step(model, optimizer, batch, jax.random.key(0), micro_batches=k))
        results.append((metrics, _params(model)))
    (one, one_params), (accumulated, accumulated_params) = results
    assert int(accumulated["target_tokens"]) == int(one["target_tokens"]) == 36
    np.testing.assert_allclose(accumulated["loss"], one["loss"], rtol=1e-6)
    np.testing.assert_allclose(accumulated["grad_norm"], one["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(accumulated["slice_score_entropy"], one["slice_score_entropy"], rtol=1e-6)
    worst = max(abs(accumulated_params[p] - one_params[p]).max() for p in one_params)
    # Adam's first update is g / (|g| + eps) x lr per weight: +-lr (1e-3) where |g| >> eps, and where a
    # gradient is near eps a fraction of lr that the summation order's rounding can shift: within 1% of
    # one update everywhere (the loss and gradient norm above are what a wrong weighting would move).
    assert worst < 1e-5, worst

    # The test has teeth: the mean of the two micro-batch means is far from the token-weighted loss.
    _, model, _ = _setup(model_updates=no_dropout)
    micro_losses = [float(eval_step(model, jax.tree.map(lambda x: _split_micro_batches(x, 2)[j], batch))["loss"])
                    for j in range(2)]
    token_weighted = (micro_losses[0] * 8 + micro_losses[1] * 28) / 36
    np.testing.assert_allclose(token_weighted, one["loss"], rtol=1e-6)
    assert abs(np.mean(micro_losses) - one["loss"]) > 1e-3


def test_head_layout_comes_from_the_config_and_the_batch_shape_only():
    shape = (8, 40)  # a quarter of 39 positions, rounded up to 8 and at least 16: 16 slots a row
    assert train_head_layout(shape) == HeadLayout(groups=1, slots=8 * 16)
    assert train_head_layout(shape, micro_batches=2) == HeadLayout(groups=1, slots=4 * 16)
    assert train_head_layout(shape, slots_per_row=5, chunk=12) == HeadLayout(groups=1, slots=40, chunk=12)
    assert train_head_layout(shape, slots_per_row=0) == HeadLayout(groups=1)  # every position
    assert train_head_layout(shape, slots_per_row=39) == HeadLayout(groups=1)  # as many slots as positions


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (scripts/test.sh sets 8 CPU devices)")
def test_head_layout_pools_targets_within_batch_shards():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
    assert train_head_layout((8, 40), mesh=mesh, slots_per_row=4) == HeadLayout(groups=4, slots=8)
    assert train_head_layout((8, 40), mesh=mesh, micro_batches=2, slots_per_row=4) == HeadLayout(groups=4, slots=4)
    assert train_head_layout((6, 40), mesh=mesh, slots_per_row=4) == HeadLayout(groups=2, slots=12)  # gcd(6, 4)


def test_eval_step_loss_is_the_model_loss():


    # Through the whole model: the step's loss is the model's own.
    config, model, _ = _setup()
    batch = random_batch(config, 4)
    out = model(batch["volume"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                batch["question_ids"], batch["question_mask"])
    metrics = eval_step(model, batch)
    assert int(metrics["target_tokens"]) == int(out.num_target_tokens) == supervised_tokens(batch).sum()
    np.testing.assert_allclose(float(metrics["loss"]), float(out.loss), rtol=1e-6)


def test_batch_that_does_not_split_into_micro_batches_is_refused():
    config, model, optimizer = _setup()
    with pytest.raises(ValueError, match="does not split into micro_batches=3"):
        train_step(model, optimizer, random_batch(config, 4), jax.random.key(0), micro_batches=3)


def test_learning_rate_warms_up_linearly_then_decays_along_a_cosine_to_zero():
    config = small_config(steps=100, learning_rate=2e-4, warmup_ratio=0.03)
    schedule = learning_rate(config.train)
    assert warmup_steps(config.train) == 3
    expected = {0: 0.0, 1: 2e-4 / 3, 2: 2e-4 * 2 / 3, 3: 2e-4, 3 + 97 // 2: None, 100: 0.0}
    expected[3 + 97 // 2] = 2e-4 * 0.5 * (1 + math.cos(math.pi * (97 // 2) / 97))
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
    values = np.array([float(schedule(s)) for s in range(3, 101)])
    assert np.all(np.diff(values) <= 0)


def test_step_reports_the_learning_rate_it_applied():
    config, model, optimizer = _setup(steps=10, warmup_ratio=0.2)
    schedule = learning_rate(config.train)
    batch = random_batch(config, 2)
    for step in range(3):
        metrics = train_step(model, optimizer, batch, jax.random.key(0))
        np.testing.assert_allclose(float(metrics["learning_rate"]), float(schedule(step)), rtol=1e-6)
    assert int(optimizer.step[...]) == 3


def test_bf16_compute_keeps_float32_master_weights():
    no_dropout = dict(tgis=dict(dropout=0.0))  # so that the step's loss is the plain forward's
    config, model, optimizer = _setup(model_updates=dict(dtype="bfloat16", **no_dropout), warmup_ratio=0.0)
    _, model32, _ = _setup(model_updates=no_dropout)
    batch = random_batch(config, 4)
    before = _params(model)
    losses = []
    for _ in range(2):
        metrics = train_step(model, optimizer, batch, jax.random.key(0))
        assert np.isfinite(float(metrics["grad_norm"]))
        losses.append(float(metrics["loss"]))
    after = _params(model)
    assert all(value.dtype == np.float32 for value in after.values())
    assert all(leaf.dtype in (jnp.float32, jnp.int32, jnp.uint32) for leaf in jax.tree.leaves(nnx.state(optimizer)))
    lm_head = ("llm", "lm_head", "kernel")
    assert not np.array_equal(after[lm_head], before[lm_head])
    # The bf16 forward computes the float32 model's loss to bf16 precision, and training lowers it.
    loss32 = float(eval_step(model32, batch)["loss"])
    assert abs(losses[0] - loss32) < 5e-3 * loss32, (losses[0], loss32)
    assert losses[1] < losses[0]


def _count_remats(jaxpr) -> int:
    """Rematerialised regions (jax.checkpoint) in a jaxpr, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("remat", "remat2", "checkpoint")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += _count_remats(sub)
    return count


@functools.lru_cache
def _loss_grads_and_remats(remat_policy):
    config = small_config()
    config.model.remat_policy = remat_policy
    batch = random_batch(config, 2)
    graphdef, params = nnx.split(Med2E3(config.model, rngs=nnx.Rngs(0)))

    def loss(params):
        out = nnx.merge(graphdef, params)(batch["volume"], batch["input_ids"], batch["attention_mask"],
                                          batch["labels"], batch["question_ids"], batch["question_mask"])
        return out.loss

    grad_fn = jax.value_and_grad(loss)
    layers = config.model.llm.num_layers + config.model.vision2d.num_layers
    return jax.jit(grad_fn)(params), _count_remats(jax.make_jaxpr(grad_fn)(params).jaxpr), layers


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policy_reaches_the_layers_and_changes_no_number(policy):
    (loss, grads), plain, _ = _loss_grads_and_remats("none")
    (remat_loss, remat_grads), rematerialised, layers = _loss_grads_and_remats(policy)
    assert plain == 0 and rematerialised == layers  # every LLM and SigLIP layer
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for (path, g), (_, ref) in zip(nnx.to_flat_state(remat_grads), nnx.to_flat_state(grads)):
        np.testing.assert_allclose(g[...], ref[...], rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_unknown_remat_policy_names_the_config_key():
    config = small_config()
    config.model.remat_policy = "some"
    with pytest.raises(ValueError, match="remat_policy"):
        Med2E3(config.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_both_stages_train_under_remat_as_without_it(stage):
    # Pretrain freezes SigLIP, whose rematerialised layers then hold variables of an outer trace.
    updated = {}
    for policy in ("none", "full"):
        config, model, optimizer = _setup(stage, model_updates={"remat_policy": policy})
        metrics = train_step(model, optimizer, random_batch(config, 8), jax.random.key(0))
        updated[policy] = (float(metrics["loss"]), _params(model))
    assert updated["full"][0] == pytest.approx(updated["none"][0], rel=1e-6)
    for path, value in updated["none"][1].items():
        np.testing.assert_allclose(updated["full"][1][path], value, rtol=1e-5, atol=1e-6, err_msg=str(path))
