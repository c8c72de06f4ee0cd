"""Training checkpoints: exact resume after SIGKILL, a save killed midway, restore onto another mesh.

One subprocess trains 4 steps of the small model with checkpoints every 2: the save of step 2
completes, the save of step 4 is made to hang after part of it was written, and the process is
SIGKILLed there. Everything else is checked against that directory.
"""

import glob
import os
import signal

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from training_runs import (
    compilation_cache,
    launch,
    loop_config,
    shared_cache_dir,
    synthetic_iterator,
    wait_for,
)

from med2e3_jax import sharding
from med2e3_jax.checkpoint.orbax_params import save_params
from med2e3_jax.train import loop
from med2e3_jax.train import state as state_lib
from med2e3_jax.train.checkpointing import CHECKPOINT_DIR, TrainCheckpointer

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(shared_cache_dir(tmp_path_factory)):
        yield


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The workdir of a run SIGKILLed in the middle of saving step 4, and the temporary directories that
    save left behind (listed before anything opens the checkpoint directory again)."""
    root = tmp_path_factory.mktemp("killed")
    workdir, marker, log = str(root / "run"), str(root / "hanging"), str(root / "log.txt")
    process = launch(["--workdir", workdir, "--steps", str(STEPS), "--checkpoint_every", str(EVERY),
                      "--hang_in_save_of", str(STEPS), "--marker", marker], log_path=log)
    try:
        wait_for(lambda: os.path.exists(marker), timeout=300, process=process, log_path=log)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    leftovers = glob.glob(os.path.join(workdir, CHECKPOINT_DIR, f"{STEPS}.orbax-checkpoint-tmp*"))
    return workdir, leftovers


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = loop.train(loop_config(steps=STEPS, checkpoint_every=EVERY), workdir, make_iterator=synthetic_iterator())
    return workdir, result


def _arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_save_killed_midway_leaves_previous_checkpoint_restorable(killed_run):
    workdir, leftovers = killed_run
    assert leftovers, "the killed save should have left a temporary directory"
    with TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR)) as checkpointer:
        assert checkpointer.all_steps() == [EVERY]
        config = loop.per_process_config(loop_config(), 1)
        mesh = sharding.make_mesh(config.mesh)
        model = loop.build_model(config, mesh)
        optimizer = state_lib.make_optimizer(model, config.train)
        restored = checkpointer.restore(model, optimizer, state_lib.trainable_filter(config.train))
    assert restored.step == EVERY
    assert restored.data_state == {"next_index": EVERY}
    assert int(optimizer.step[...]) == EVERY
    assert restored.config.train.stage == "finetune"


def test_resume_after_sigkill_equals_uninterrupted_run_bit_for_bit(killed_run, uninterrupted):
    killed_workdir, _ = killed_run
    _, reference = uninterrupted
    resumed = loop.train(loop_config(steps=STEPS, checkpoint_every=EVERY), killed_workdir,
                         make_iterator=synthetic_iterator())
    assert resumed.step == STEPS
    for got, want in zip(_arrays(nnx.state(resumed.model)), _arrays(nnx.state(reference.model)), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_arrays(nnx.state(resumed.optimizer)), _arrays(nnx.state(reference.optimizer)),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    assert resumed.metrics["loss"] == reference.metrics["loss"]


def test_checkpoint_from_8_devices_restores_onto_4_device_fsdp_tensor_mesh(uninterrupted, tmp_path):
    workdir, reference = uninterrupted
    # The frozen weights come from a base checkpoint (as with imported weights): the model is then
    # built abstractly on the new mesh and filled from disk, with no init program to compile.
    save_params(reference.model, tmp_path / "base")
    config = loop.per_process_config(loop_config(base_checkpoint=str(tmp_path / "base")), 1)
    config.mesh.update(data=1, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:4])
    model = loop.build_model(config, mesh)
    optimizer = state_lib.make_optimizer(model, config.train)
    sharding.shard_model(optimizer, mesh)
    with TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR)) as checkpointer:
        assert checkpointer.restore(model, optimizer, state_lib.trainable_filter(config.train)).step == STEPS
    for got, want in zip(_arrays(nnx.state(model)), _arrays(nnx.state(reference.model)), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_arrays(nnx.state(optimizer)), _arrays(nnx.state(reference.optimizer)), strict=True):
        np.testing.assert_array_equal(got, want)
    kernel = model.llm.layers[0].mlp.gate_up_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated


def test_checkpoint_holds_trainable_params_only(uninterrupted):
    workdir, _ = uninterrupted
    with TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR)) as checkpointer:
        saved = checkpointer.manager.item_metadata(STEPS)["params"]
    # M3D-CLIP's ViT and BERT are frozen in finetuning: they come from the init, never from a checkpoint.
    assert sorted(saved) == sorted(loop_config().train.trainable)
    assert "vision3d" not in saved and "question_encoder" not in saved


@pytest.mark.parametrize("data_state", [{"next_index": 3, "epoch": {"seed": [1, 2]}}, b'{"last_seen": {"0": 5}}'],
                         ids=["DatasetIterator", "DataLoaderIterator"])
def test_data_iterator_state_comes_back_as_it_was_saved(tmp_path, data_state):
    # Grain's `DatasetIterator.get_state()` is a dict, its `DataLoaderIterator`'s JSON bytes.
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with TrainCheckpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, model=model, optimizer=optimizer, trainable=nnx.Param, rng_key=jax.random.key(0),
                          data_state=data_state, config=ml_collections.ConfigDict({"seed": 0}))
        restored = checkpointer.restore(model, optimizer, nnx.Param)
    assert restored.data_state == data_state and type(restored.data_state) is type(data_state)
