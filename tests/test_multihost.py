"""Two processes x 4 CPU devices (gloo collectives on localhost) against one process x 8 devices.

One two-process run serves every test: it is configured for 6 steps, but process 1 alone receives
SIGTERM while fetching the batch of step 4, so both processes must agree to stop after step 3, save,
and exit 0. The single-process reference runs in this (8-device) pytest process.
"""

import json
import os
import socket

import numpy as np
import pytest
from flax import nnx
from training_runs import (
    compilation_cache,
    launch,
    loop_config,
    shared_cache_dir,
    synthetic_iterator,
    tail,
    wait_for,
)

from med2e3_jax import sharding
from med2e3_jax.train import loop
from med2e3_jax.train import state as state_lib
from med2e3_jax.train.checkpointing import CHECKPOINT_DIR, TrainCheckpointer
from med2e3_jax.train.metrics import read_metrics

STEPS, STOP_AT = 6, 3
LOG_EVERY = STOP_AT  # steps 1 and 2 run ahead of the devices: nothing is read back before step 3


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(shared_cache_dir(tmp_path_factory)):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_processes")
    workdir, port = str(root / "run"), _free_port()
    processes, logs, results = [], [], []
    for process_id in range(2):
        log, result = str(root / f"log_{process_id}.txt"), str(root / f"result_{process_id}.json")
        args = ["--workdir", workdir, "--steps", str(STEPS), "--checkpoint_every", "100", "--result", result,
                "--num_processes", "2", "--process_id", str(process_id), "--coordinator", f"localhost:{port}",
                "--log_every", str(LOG_EVERY), "--forbid_device_reads"]
        if process_id == 1:
            args += ["--sigterm_self_at", str(STOP_AT)]
        processes.append(launch(args, devices=4, log_path=log))
        logs.append(log)
        results.append(result)
    try:
        for process, log in zip(processes, logs, strict=True):
            wait_for(lambda p=process: p.poll() is not None, timeout=400, log_path=log)
            assert process.returncode == 0, tail(log)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    summaries = []
    for result in results:
        with open(result) as f:
            summaries.append(json.load(f))
    return workdir, summaries


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_process"))
    result = loop.train(loop_config(steps=STEPS, checkpoint_every=STOP_AT, log_every=LOG_EVERY), workdir,
                        make_iterator=synthetic_iterator())
    return workdir, result


def test_sigterm_on_one_process_stops_both_at_the_same_step(two_process_run):
    workdir, summaries = two_process_run
    assert [(s["step"], s["preempted"]) for s in summaries] == [(STOP_AT, True)] * 2
    with TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR)) as checkpointer:
        assert checkpointer.all_steps() == [STOP_AT]
    iterator_states = os.path.join(workdir, CHECKPOINT_DIR, str(STOP_AT), "data_iterator")
    for process_id in range(2):
        with open(os.path.join(iterator_states, f"process_{process_id}-of-2.json")) as f:
            assert json.load(f) == {"next_index": STOP_AT}


def test_two_processes_train_with_the_losses_of_one(two_process_run, one_process_run):
    # One record each: the means over steps 1-3 (the runs log every third step).
    two, one = read_metrics(two_process_run[0]), read_metrics(one_process_run[0])[:1]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [STOP_AT]
    for name in ("loss", "grad_norm", "slice_score_entropy"):
        np.testing.assert_allclose([r[name] for r in two], [r[name] for r in one], rtol=1e-5, err_msg=name)
    assert [r["target_tokens"] for r in two] == [r["target_tokens"] for r in one]


def test_two_process_checkpoint_restores_in_one_process(two_process_run, one_process_run):
    config = loop.per_process_config(loop_config(), 1)
    mesh = sharding.make_mesh(config.mesh)
    trees = []
    for workdir in (two_process_run[0], one_process_run[0]):
        model = loop.build_model(config, mesh)
        optimizer = state_lib.make_optimizer(model, config.train)
        sharding.shard_model(optimizer, mesh)
        with TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR)) as checkpointer:
            restored = checkpointer.restore(model, optimizer, state_lib.trainable_filter(config.train), step=STOP_AT)
        trees.append((nnx.state(model, nnx.Param), restored))
    (two_params, two_restored), (one_params, one_restored) = trees
    assert two_restored.step == one_restored.step == STOP_AT
    assert two_restored.data_state is None  # written for 2 processes: this one starts its data afresh
    # Equal up to the order of the gradient reductions. atol: parameters whose true gradient is zero
    # (attention key biases: softmax ignores a constant shift) move by Adam-normalised rounding noise.
    for got, want in zip(nnx.to_flat_state(two_params), nnx.to_flat_state(one_params), strict=True):
        np.testing.assert_allclose(np.asarray(got[1][...]), np.asarray(want[1][...]), rtol=1e-4, atol=1e-5,
                                   err_msg=str(got[0]))
