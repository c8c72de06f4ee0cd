"""Sharded training equals unsharded training; the rules place parameters, optimizer state and batches.

Needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh sets it).
"""

import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from batches_for_tests import small_config  # noqa: E402

from med2e3_jax import sharding  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402
from med2e3_jax.random_batches import random_batch  # noqa: E402
from med2e3_jax.train.state import make_optimizer  # noqa: E402
from med2e3_jax.train.step import train_step  # noqa: E402

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
STEPS = 2


def _mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def _train(mesh):
    """STEPS updates from the same init and batches on `mesh`: (losses, params as numpy)."""
    config = small_config("finetune", warmup_ratio=0.0)  # the first update already moves the weights
    model = Med2E3(config.model, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, config.train)
    sharding.shard_model(model, mesh)
    sharding.shard_model(optimizer, mesh)
    losses = []
    for step in range(STEPS):
        batch = sharding.global_batch(random_batch(config, 8, seed=step), mesh)
        metrics = train_step(model, optimizer, batch, jax.random.key(7), micro_batches=2)
        losses.append(float(metrics["loss"]))
    return model, optimizer, np.array(losses), jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def unsharded():
    return _train(sharding.make_mesh(_mesh_cfg(1, 1, 1), devices=jax.devices()[:1]))


@needs_8_devices
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_matches_one_device(unsharded, shape):
    mesh = sharding.make_mesh(_mesh_cfg(*shape))
    model, optimizer, losses, params = _train(mesh)
    # The step hands back every array placed as the rules say, so the next step does not recompile.
    for node in (model, optimizer):
        placed = [leaf.sharding for leaf in jax.tree.leaves(nnx.state(node))]
        assert placed == jax.tree.leaves(sharding.param_shardings(nnx.state(node), mesh))
    _, _, ref_losses, ref_params = unsharded
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    ref_flat = dict(nnx.to_flat_state(ref_params))
    errors = {path: np.abs(value[...] - ref_flat[path][...]) for path, value in nnx.to_flat_state(params)}
    # Adam moves every weight by about lr * sign(gradient) in its first steps, whatever the gradient's
    # size; where a gradient is at the rounding level of its (differently ordered) reduction, the two
    # runs may move it differently by a fraction of lr (1e-3 here). All else agrees to float32 rounding.
    worst = max(errors, key=lambda path: errors[path].max())
    assert errors[worst].max() < 5e-5, (worst, errors[worst].max())
    everything = np.concatenate([e.ravel() for e in errors.values()])
    assert np.mean(everything > 2e-6) < 1e-3


@needs_8_devices
def test_fsdp_and_tensor_axes_split_parameters_and_their_optimizer_state():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    config = small_config("finetune")
    model = Med2E3(config.model, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, config.train)
    sharding.shard_model(model, mesh)
    sharding.shard_model(optimizer, mesh)
    qkv = model.llm.layers[0].self_attn.qkv_proj.kernel
    assert qkv[...].sharding.spec == P("fsdp", "tensor")
    assert model.llm.lm_head.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.llm.layers[0].mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert model.vision3d.blocks[0].norm1.scale[...].sharding.spec == P()  # replicated
    # Adam's moments follow their parameter; frozen parameters have none.
    mu = [s for s in jax.tree.leaves(optimizer.opt_state) if getattr(s, "shape", None) == qkv.shape]
    assert mu and all(m.sharding.spec == P("fsdp", "tensor") for m in mu)


@needs_8_devices
def test_global_batch_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    local = random_batch(small_config(), 8)
    batch = sharding.global_batch(local, mesh)
    assert batch["volume"].sharding.spec == P(("data", "fsdp"))
    assert batch["volume"].addressable_shards[0].data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])
    with pytest.raises(ValueError, match="do not divide by the 4 batch shards"):
        sharding.global_batch({"input_ids": local["input_ids"][:6]}, mesh)


def test_a_dimension_that_does_not_divide_is_replicated():
    mesh = sharding.make_mesh(_mesh_cfg(1, 1, 1), devices=jax.devices()[:1])
    assert sharding.logical_to_spec(("vocab", "embed"), (7, 64), mesh) == P()
    if jax.device_count() >= 8:
        mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
        assert sharding.logical_to_spec(("vocab", "embed"), (7, 64), mesh) == P(None, "fsdp")
        assert sharding.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp")


def test_mesh_sizes_resolve_minus_one_and_name_what_does_not_fit():
    devices = jax.devices()
    mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1))
    assert mesh.axis_names == sharding.AXES and mesh.shape["data"] == len(devices)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 3 devices"):
        sharding.make_mesh(_mesh_cfg(3, 1, 1), devices=devices[:1])
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(_mesh_cfg(-1, -1, 1))


def test_every_parameter_of_the_model_declares_its_logical_axes():
    """A parameter without a declaration would silently stay replicated under FSDP: every parameter
    declares one logical axis per dimension where the model creates it, and every matrix (ndim >= 2)
    carries an axis the default rules split over fsdp (`embed`, or `vocab` for embedding rows), except
    the position / patch embeddings and the CLS token, kept whole on purpose (sharding.py)."""
    fsdp_axes = {name for name, mesh_axes in sharding.default_rules() if "fsdp" in mesh_axes}
    replicated_on_purpose = ("position_embedding", "token_type_embeddings", "patch_embedding", "cls_token")
    config = small_config()
    abstract = nnx.eval_shape(lambda: Med2E3(config.model, rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(map(str, path))
        axes = sharding.declared_axes(variable)
        assert axes is not None and len(axes) == len(variable.shape), f"{name} {variable.shape} declares {axes}"
        if len(variable.shape) >= 2 and not any(part in name for part in replicated_on_purpose):
            assert fsdp_axes & set(axes), f"{name} {variable.shape} declares {axes}, none of which FSDP splits"
