"""Layouts as config: the rules of `config.sharding.logical_axis_rules` place parameters, optimizer state,
activations and checkpoints, and one rule changes on the command line without a code change.

Needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh sets it).
"""

import os
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(__file__))
from batches_for_tests import small_config  # noqa: E402

from configs import med2e3_m3d, medium, plans, tiny  # noqa: E402
from med2e3_jax import sharding  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402
from med2e3_jax.random_batches import random_batch  # noqa: E402
from med2e3_jax.train import state as state_lib  # noqa: E402
from med2e3_jax.train.checkpointing import TrainCheckpointer  # noqa: E402
from med2e3_jax.train.step import train_step  # noqa: E402
from med2e3_jax.train_config import apply_overrides  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
TP_PLAN = "finetune_8xh100_tp"


def _command_line_config(*overrides):
    """The config `scripts/train.py` would get from `--config configs/tiny.py:finetune` plus `overrides`."""
    argv = ["train.py", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}:finetune", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _specs(config, mesh, *paths):
    """PartitionSpecs the config's rules give the named parameters (and the Adam moments of the first)."""
    def create():
        model = Med2E3(config.model, rngs=nnx.Rngs(0))
        return model, state_lib.make_optimizer(model, config.train)

    model, optimizer = nnx.eval_shape(create)
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        params = dict(nnx.to_flat_state(sharding.param_shardings(nnx.state(model), mesh)))
        moments = sharding.param_shardings(nnx.state(optimizer), mesh)
    specs = [params[tuple(int(p) if p.isdigit() else p for p in path.split("."))].get_value().spec for path in paths]
    moment_specs = {s.spec for path, s in jax.tree_util.tree_flatten_with_path(moments)[0]
                    if paths[0] in sharding._path_str(path) and s.spec is not None}
    return specs, moment_specs


def _plan_layout(name):
    """A plan's sharding rules and (data, fsdp, tensor) mesh, the mesh scaled down to 8 devices."""
    plan = plans.PLANS[name]
    rules = {k: v for k, v in plan.items() if k.startswith("sharding.")}
    sizes = [plan[f"mesh.{axis}"] for axis in sharding.AXES]
    while np.prod(sizes) > 8:  # 16-device plans: the FSDP axis halved
        sizes[1] //= 2
    return rules, tuple(sizes)


def test_every_config_starts_from_the_default_rules_and_the_tp_plan_changes_only_the_encoders():
    for config in (tiny.get_config("finetune"), medium.get_config(), med2e3_m3d.get_config("pretrain"),
                   plans.get_config("finetune_8xh100")):
        assert sharding.rules_of(config) == sharding.default_rules()
    default, tp = dict(sharding.default_rules()), dict(sharding.rules_of(plans.get_config(TP_PLAN)))
    changed = {name for name in default if default[name] != tp[name]}
    assert changed == {"encoder_batch", "encoder_embed", "encoder_heads", "encoder_mlp"}
    assert tp["encoder_batch"] == ("data", "fsdp", "tensor") and tp["encoder_heads"] == ()


@needs_8_devices
def test_one_rule_changed_on_the_command_line_changes_the_parameter_shardings():
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    paths = ("llm.layers.0.self_attn.qkv_proj.kernel", "llm.embed_tokens.embedding",
             "vision2d.encoder.layers.0.self_attn.q_proj.kernel", "llm.layers.0.mlp.down_proj.kernel")
    default, default_moments = _specs(_command_line_config(), mesh, *paths)
    assert default == [P("fsdp", "tensor"), P(("tensor", "fsdp")), P("fsdp", "tensor"), P("tensor", "fsdp")]
    assert default_moments == {P("fsdp", "tensor")}
    # Three spellings: empty (replicated), one mesh axis, comma-joined mesh axes.
    config = _command_line_config("--config.sharding.logical_axis_rules.heads=",
                                  "--config.sharding.logical_axis_rules.vocab=tensor",
                                  "--config.sharding.logical_axis_rules.encoder_embed=fsdp,tensor")
    assert config.sharding.logical_axis_rules.vocab == ("tensor",)
    changed, changed_moments = _specs(config, mesh, *paths)
    assert changed == [P("fsdp"), P("tensor"), P(("fsdp", "tensor")), P("tensor", "fsdp")]
    assert changed_moments == {P("fsdp")}  # Adam's moments follow their parameter


def test_a_rule_naming_a_mesh_axis_the_mesh_lacks_names_the_rule():
    config = _command_line_config("--config.sharding.logical_axis_rules.heads=model")
    with pytest.raises(ValueError, match=r"sharding.logical_axis_rules.heads: expected distinct mesh axes"):
        sharding.rules_of(config)


@needs_8_devices
def test_default_rules_place_the_named_parameters():
    """bonsai's test_sharding_qwen3, for the default layout on a (data 1, fsdp 4, tensor 2) mesh."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    expected = {
        "llm.embed_tokens.embedding": P(("tensor", "fsdp")),  # rows: the table feeds the residual stream
        "llm.layers.0.self_attn.qkv_proj.kernel": P("fsdp", "tensor"),
        "llm.layers.0.self_attn.o_proj.kernel": P("tensor", "fsdp"),
        "llm.layers.0.mlp.gate_up_proj.kernel": P("fsdp", "tensor"),
        "llm.layers.0.mlp.down_proj.kernel": P("tensor", "fsdp"),
        "llm.layers.0.input_layernorm.weight": P(),
        "llm.lm_head.kernel": P("fsdp", "tensor"),
        "vision2d.embeddings.patch_embedding.kernel": P(),
        "vision2d.encoder.layers.0.self_attn.k_proj.kernel": P("fsdp", "tensor"),
        "vision2d.encoder.layers.0.mlp.fc1.kernel": P("fsdp", "tensor"),
        "vision2d_connector.linear_in.kernel": P(None, "fsdp"),  # the LLM's side
        "question_encoder.embeddings.word_embeddings.embedding": P(("tensor", "fsdp")),
    }
    specs, _ = _specs(small_config(), mesh, *expected)
    assert dict(zip(expected, specs)) == expected


def _placed(config, mesh, seed):
    """The seeded model and its optimizer on `mesh`, placed by the current rules."""
    model = Med2E3(config.model, rngs=nnx.Rngs(seed))
    sharding.shard_model(model, mesh)
    optimizer = state_lib.make_optimizer(model, config.train)
    sharding.shard_model(optimizer, mesh)
    return model, optimizer


def _one_step(config, mesh):
    """(loss, params as numpy) after one update of the seeded model on `mesh` under the config's rules."""
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        model, optimizer = _placed(config, mesh, 0)
        batch = sharding.global_batch(random_batch(config, 8), mesh)
        metrics = train_step(model, optimizer, batch, jax.random.key(7))
        placed = [leaf.sharding for leaf in jax.tree.leaves(nnx.state(model))]
        assert placed == jax.tree.leaves(sharding.param_shardings(nnx.state(model), mesh))
    return float(metrics["loss"]), jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def one_device_step():
    config = small_config("finetune", warmup_ratio=0.0)
    return _one_step(config, sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))


@needs_8_devices
# The fsdp-only plans all scale down to (1, 8, 1); (2, 4, 1) and (2, 2, 2) are in test_sharding.py.
@pytest.mark.parametrize("plan", ["finetune_8xh100", TP_PLAN])
def test_each_plan_layout_scaled_to_8_devices_trains_like_one_device(one_device_step, plan):
    rules, sizes = _plan_layout(plan)
    config = small_config("finetune", warmup_ratio=0.0)
    apply_overrides(config, rules, where=plan)
    loss, params = _one_step(config, sharding.make_mesh(dict(zip(sharding.AXES, sizes))))
    ref_loss, ref_params = one_device_step
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    ref_flat = dict(nnx.to_flat_state(ref_params))
    worst = max(float(np.abs(value[...] - ref_flat[path][...]).max()) for path, value in nnx.to_flat_state(params))
    # One Adam step moves each weight by about lr (1e-3) whatever its gradient's size; a gradient at
    # the rounding level of its (differently ordered) reduction may move it by a fraction of that.
    assert worst < 5e-5


@needs_8_devices
def test_checkpoint_saved_under_one_layout_restores_onto_another_mesh_and_rules(tmp_path):
    saved_config = small_config("finetune")
    saved_config.mesh.update(data=1, fsdp=8, tensor=1)
    trainable = state_lib.trainable_filter(saved_config.train)
    with sharding.logical_axis_rules(sharding.rules_of(saved_config)):
        model, optimizer = _placed(saved_config, sharding.make_mesh(saved_config.mesh), 0)
        saved = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        with TrainCheckpointer(tmp_path, async_save=False) as checkpointer:
            checkpointer.save(1, model=model, optimizer=optimizer, trainable=trainable, rng_key=jax.random.key(0),
                              data_state={}, config=saved_config)

    config = small_config("finetune")
    config.mesh.update(data=1, fsdp=4, tensor=2)
    apply_overrides(config, _plan_layout(TP_PLAN)[0], where=TP_PLAN)
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        mesh = sharding.make_mesh(config.mesh)
        model, optimizer = _placed(config, mesh, 1)  # another seed: every restored weight must change
        with TrainCheckpointer(tmp_path) as checkpointer:
            restored = checkpointer.restore(model, optimizer, trainable)
        placed = [leaf.sharding for leaf in jax.tree.leaves(nnx.state((model, optimizer)))]
        assert placed == jax.tree.leaves(sharding.param_shardings(nnx.state((model, optimizer)), mesh))
    # The checkpoint records the rules it was written under.
    assert sharding.rules_of(restored.config) == sharding.rules_of(saved_config) != sharding.rules_of(config)
    saved_flat = dict(nnx.to_flat_state(saved))
    for path, value in nnx.to_flat_state(nnx.state(model, trainable)):
        np.testing.assert_array_equal(np.asarray(value[...]), saved_flat[path][...], err_msg=str(path))
    q_proj = model.vision2d.encoder.layers[0].self_attn.q_proj.kernel[...]
    assert q_proj.sharding.spec == P(("fsdp", "tensor"))  # placed by the new rules
