"""The finetune_lora stage through the trainer: adapters and connectors train, the base stays bit-identical,
the checkpoint holds only what trains, resume is exact, 8 devices equal 1, the export is merged."""

import jax
import numpy as np
import pytest
from flax import nnx
from commands_for_tests import run_command
from training_runs import compilation_cache, loop_config, shared_cache_dir, synthetic_iterator

from med2e3_jax import sharding
from med2e3_jax.checkpoint.orbax_params import restore_params, save_params
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.random_batches import random_batch
from med2e3_jax.train import loop
from med2e3_jax.train import state as state_lib
from med2e3_jax.train.checkpointing import CHECKPOINT_DIR, TrainCheckpointer
from med2e3_jax.train.step import MODEL_INPUTS, train_step

TRAINED = ("vision2d_connector", "vision3d_connector", "tgis")


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(shared_cache_dir(tmp_path_factory)):
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base checkpoint: the small model with seeded weights, as `med2e3-convert` would write it."""
    config = loop_config("finetune_lora")
    path = tmp_path_factory.mktemp("base") / "params"
    save_params(Med2E3(config.model, rngs=nnx.Rngs(7)), path)
    return path


def _config(base, **train):
    config = loop_config("finetune_lora", base_checkpoint=str(base), **train)
    config.train.lora.update(rank=4, alpha=8.0)
    return config


def _flat(model, kind=nnx.Param):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def test_a_lora_stage_without_a_base_says_so_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="set config.train.base_checkpoint"):
        loop.train(loop_config("finetune_lora"), tmp_path, make_iterator=synthetic_iterator())


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    config = _config(base, steps=4, checkpoint_every=4)
    return config, workdir, loop.train(config, workdir, make_iterator=synthetic_iterator())


def test_only_the_adapters_and_the_connectors_change_and_the_export_is_merged(base, lora_run):
    config, tmp_path, result = lora_run
    start = _flat(restore_params(base))
    after = _flat(result.model)
    adapters = _flat(result.model, nnx.LoRAParam)
    assert adapters and all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    for name, value in start.items():
        if name.split("/")[0] in TRAINED:
            continue
        np.testing.assert_array_equal(after[name], value, err_msg=f"{name} is frozen in finetune_lora")
    assert any(not np.array_equal(after[n], v) for n, v in start.items() if n.split("/")[0] in TRAINED)

    # The optimizer and the checkpoint hold what trains, nothing of the base.
    opt_leaves = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(result.optimizer))}
    assert not any("/llm/" in f"/{p}" and "lora" not in p and "/mu/" in f"/{p}/" for p in opt_leaves)
    with TrainCheckpointer(tmp_path / CHECKPOINT_DIR) as checkpointer:
        saved = jax.tree_util.tree_flatten_with_path(checkpointer.manager.restore(4).params)[0]
    saved_names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in saved}
    assert saved_names and all(n.split("/")[0] in TRAINED or "lora" in n for n in saved_names), sorted(saved_names)[:8]

    # WORKDIR/model is the merged model: a plain Med2E3 with the logits of base + adapters.
    exported = restore_params(tmp_path / loop.MODEL_DIR)
    assert not nnx.state(exported, nnx.LoRAParam)
    batch = random_batch(config, 2, seed=11)
    inputs = tuple(batch[k] for k in MODEL_INPUTS)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(exported(*inputs).logits), np.asarray(result.model(*inputs).logits),
                                   rtol=1e-5, atol=1e-5)


def test_convert_merges_a_run_and_round_trips_its_adapters_through_peft_format(base, lora_run, tmp_path):
    _, workdir, _ = lora_run
    done = run_command("convert", f"--lora_run={workdir}", f"--out={tmp_path / 'merged'}",
                       f"--peft_out={tmp_path / 'adapter'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = _flat(restore_params(tmp_path / "merged"))
    exported = _flat(restore_params(workdir / loop.MODEL_DIR))
    for name, value in exported.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # The adapters alone, merged into the base again: the LLM as in the run (the connectors stay the base's).
    done = run_command("convert", f"--peft={tmp_path / 'adapter'}", f"--orbax={base}", f"--out={tmp_path / 'again'}",
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    again = _flat(restore_params(tmp_path / "again"))
    for name, value in merged.items():
        if name.startswith("llm/"):
            np.testing.assert_allclose(again[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_resume_is_exact(base, tmp_path):
    straight = loop.train(_config(base, steps=4, checkpoint_every=2, export_model=False), tmp_path / "a",
                          make_iterator=synthetic_iterator())
    loop.train(_config(base, steps=2, checkpoint_every=2, export_model=False), tmp_path / "b",
               make_iterator=synthetic_iterator())
    resumed = loop.train(_config(base, steps=4, checkpoint_every=2, export_model=False), tmp_path / "b",
                         make_iterator=synthetic_iterator())
    assert resumed.step == 4
    for kind in (nnx.LoRAParam, nnx.Param):
        for name, value in _flat(straight.model, kind).items():
            np.testing.assert_array_equal(_flat(resumed.model, kind)[name], value, err_msg=name)


def _lora_steps(base, mesh, steps=2):
    """`steps` updates of the LoRA stage's model, built by the trainer on `mesh`, on the same batches."""
    config = _config(base, warmup_ratio=0.0)
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        model = loop.build_model(config, mesh)
        optimizer = state_lib.make_optimizer(model, config.train)
        sharding.shard_model(optimizer, mesh)
        losses = []
        for step in range(steps):
            batch = sharding.global_batch({k: v for k, v in random_batch(config, 8, seed=step).items()
                                           if k in MODEL_INPUTS}, mesh)
            losses.append(float(train_step(model, optimizer, batch, jax.random.key(3))["loss"]))
    return model, np.array(losses)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (scripts/test.sh sets 8 CPU devices)")
def test_lora_on_eight_devices_with_fsdp_equals_one_device(base):
    single = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    one, one_losses = _lora_steps(base, single)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    eight, losses = _lora_steps(base, mesh)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-6)
    qkv = eight.llm.layers[0].self_attn.qkv_proj
    kernel_spec, a_spec = qkv.kernel.get_value().sharding.spec, qkv.kernel_lora_a.get_value().sharding.spec
    assert a_spec[0] == kernel_spec[0] and kernel_spec[0] is not None  # the adapter splits with its kernel's input
    reference = _flat(one, nnx.LoRAParam)
    for name, value in _flat(eight, nnx.LoRAParam).items():
        # Adam's first steps move a weight by about lr whatever its gradient; see test_sharding.py.
        np.testing.assert_allclose(value, reference[name], atol=5e-5, err_msg=name)


def test_qlora_with_an_nf4_base_lowers_the_loss_in_a_few_steps(base):
    config = _config(base, warmup_ratio=0.0, learning_rate=3e-3)
    config.train.lora.base_qtype = "nf4"
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        model = loop.build_model(config, mesh)
        qvalue = model.llm.layers[0].self_attn.qkv_proj.kernel.array.qvalue.get_value()
        assert qvalue.dtype == jax.numpy.uint4  # the base is stored in 4 bits
        optimizer = state_lib.make_optimizer(model, config.train)
        batch = sharding.global_batch({k: v for k, v in random_batch(config, 8, seed=0).items()
                                       if k in MODEL_INPUTS}, mesh)
        losses = [float(train_step(model, optimizer, batch, jax.random.key(3))["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses
