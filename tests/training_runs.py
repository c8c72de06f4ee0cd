"""Training runs for the loop, checkpoint and multi-host tests: a deterministic synthetic data iterator
with Grain's `get_state()/set_state()`, and a command line that runs `loop.train` in a subprocess (to be
killed, signalled, or started as one of several processes).

    python tests/training_runs.py --workdir DIR --steps 6 --checkpoint_every 3 \
        [--hang_in_save_of 6 --marker FILE] [--sigterm_self_at 2] [--process_id 0 --num_processes 2 \
         --coordinator localhost:PORT]

The global batch of step s (1-based) is `random_batch(config, global_batch_size, seed=s)`; process p of
n reads rows [p * B/n, (p + 1) * B/n), so every process count sees the same global batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batches_for_tests import small_config

from med2e3_jax.random_batches import random_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiling the small model's init and training step takes ~50 s on 2 cores; the runs of a test file
# (in-process and subprocesses alike) share compiled programs through JAX's persistent cache.
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": "",  # filled in by `compilation_cache`
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def shared_cache_dir(tmp_path_factory) -> str:
    """One cache for the whole pytest session (every test file that uses it)."""
    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@contextlib.contextmanager
def compilation_cache(directory: str):
    """Turns on JAX's persistent compilation cache in `directory` for this process and the subprocesses
    started by `launch`, restoring the previous settings afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    options = {
        "jax_compilation_cache_dir": directory,
        "jax_persistent_cache_min_compile_time_secs": float(CACHE_ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    cc.reset_cache()  # the cache is set up once per process: make it see the new directory
    CACHE_ENV["JAX_COMPILATION_CACHE_DIR"] = directory
    try:
        yield directory
    finally:
        CACHE_ENV["JAX_COMPILATION_CACHE_DIR"] = ""
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()


_reading_forbidden = threading.local()


@contextlib.contextmanager
def device_reads_forbidden_between_log_points():
    """Makes every read of a `jax.Array`'s value inside `loop.train`'s run-ahead section (between two log
    points) raise. XLA:CPU ignores jax's transfer guard (its devices are host memory), so the guard here
    is on the two entry points every device-to-host read goes through: `ArrayImpl._value` (np.asarray,
    float, device_get, printing) and `ArrayImpl.copy_to_host_async`."""
    from jax._src.array import ArrayImpl

    from med2e3_jax.train import loop

    value, copy, section = ArrayImpl._value, ArrayImpl.copy_to_host_async, loop._between_log_points

    def refuse(what):
        if getattr(_reading_forbidden, "on", False):
            raise AssertionError(f"{what} of a device array between two log points: the loop waited on the devices")

    def guarded_value(self):
        refuse("a read")
        return value.fget(self)

    def guarded_copy(self):
        refuse("a copy to the host")
        return copy(self)

    @contextlib.contextmanager
    def guarded_section(level):
        with section(level):
            _reading_forbidden.on = True
            try:
                yield
            finally:
                _reading_forbidden.on = False

    ArrayImpl._value, ArrayImpl.copy_to_host_async = property(guarded_value), guarded_copy
    loop._between_log_points = guarded_section
    try:
        yield
    finally:
        ArrayImpl._value, ArrayImpl.copy_to_host_async, loop._between_log_points = value, copy, section


def loop_config(stage: str = "finetune", **train):
    """`small_config` with the loop's knobs: log every step, synchronous test-sized checkpoints."""
    config = small_config(stage)
    config.train.update(steps=6, log_every=1, checkpoint_every=3, keep_checkpoints=3, async_checkpointing=True)
    config.train.update(train)
    return config


class SyntheticBatches:
    """This process's rows of deterministic global batches; its state is the index of the next batch.

    Args:
      nan_at: 0-based batch index whose volume is NaN (the loss of step nan_at + 1 is NaN).
      on_fetch: {batch index: callable} run when that batch is requested (before it is returned).
      num_batches: the data runs out after this many batches (never by default).
    """

    def __init__(self, config, process_index: int, process_count: int, *, nan_at=None, on_fetch=None,
                 num_batches=None):
        self.config = config
        self.global_batch = config.train.global_batch_size
        self.rows = slice(process_index * config.data.batch_size, (process_index + 1) * config.data.batch_size)
        self.next_index = 0
        self.nan_at = nan_at
        self.on_fetch = on_fetch or {}
        self.num_batches = num_batches

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        index = self.next_index
        if self.num_batches is not None and index >= self.num_batches:
            raise StopIteration
        if index in self.on_fetch:
            self.on_fetch[index]()
        batch = random_batch(self.config, self.global_batch, seed=index + 1)
        batch = {k: v[self.rows] for k, v in batch.items()}
        if index == self.nan_at:
            batch["volume"] = np.full_like(batch["volume"], np.nan)
        self.next_index += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        self.next_index = int(state["next_index"])


def synthetic_iterator(**options):
    """A `make_iterator` for `loop.train`."""
    return lambda config, process_index, process_count: SyntheticBatches(config, process_index, process_count,
                                                                        **options)


# --- subprocesses ----------------------------------------------------------------------------------


def subprocess_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    if CACHE_ENV["JAX_COMPILATION_CACHE_DIR"]:
        env.update(CACHE_ENV)
    return env


def launch(args: list[str], *, devices: int = 8, log_path: str) -> subprocess.Popen:
    """Starts `python tests/training_runs.py ARGS`, output to `log_path`."""
    with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=subprocess_env(devices),
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def wait_for(predicate, *, timeout: float, process: subprocess.Popen | None = None, log_path: str = "") -> None:
    """Polls `predicate` until it holds; fails early (with the log) if `process` exits first."""
    deadline = time.time() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"subprocess exited with {process.returncode} first:\n{tail(log_path)}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s:\n{tail(log_path)}")
        time.sleep(0.1)


def tail(path: str, chars: int = 6000) -> str:
    """The end of a subprocess log, for failure messages."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-chars:]


def _hang_in_save_of(step: int, marker: str) -> None:
    """Makes the save of `step` stop forever midway: after the arrays went out, before the commit."""
    from grain import checkpoint as grain_checkpoint

    original = grain_checkpoint.CheckpointHandler.save

    def save(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        if os.path.basename(os.path.dirname(str(directory))).startswith(f"{step}.orbax-checkpoint-tmp"):
            with open(marker, "w") as f:
                f.write(str(directory))
            time.sleep(3600)

    grain_checkpoint.CheckpointHandler.save = save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stage", default="finetune")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint_every", type=int, required=True)
    parser.add_argument("--marker", default="")
    parser.add_argument("--hang_in_save_of", type=int, default=None)
    parser.add_argument("--marker_at_batch", type=int, default=None, help="write --marker when fetching it")
    parser.add_argument("--sigterm_self_at", type=int, default=None, help="SIGTERM this process at this batch")
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--result", default="", help="write the TrainResult summary here (JSON)")
    parser.add_argument("--log_every", type=int, default=1)
    parser.add_argument("--forbid_device_reads", action="store_true",
                        help="fail on any read of a device array between two log points")
    args = parser.parse_args(argv)

    from med2e3_jax.train.loop import train

    config = loop_config(args.stage, steps=args.steps, checkpoint_every=args.checkpoint_every,
                         log_every=args.log_every)
    config.distributed.update(coordinator_address=args.coordinator, num_processes=args.num_processes,
                              process_id=args.process_id)
    on_fetch = {}
    if args.hang_in_save_of is not None:
        _hang_in_save_of(args.hang_in_save_of, args.marker)
    if args.marker_at_batch is not None:
        on_fetch[args.marker_at_batch] = lambda: open(args.marker, "w").close()
    if args.sigterm_self_at is not None:
        on_fetch[args.sigterm_self_at] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    guard = device_reads_forbidden_between_log_points() if args.forbid_device_reads else contextlib.nullcontext()
    with guard:
        result = train(config, args.workdir, make_iterator=synthetic_iterator(on_fetch=on_fetch))
    if args.result:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump({"step": result.step, "preempted": result.preempted, "metrics": result.metrics}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
