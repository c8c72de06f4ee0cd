"""The training loop: one function, `train(config, workdir)`, for 1 device, 8 devices or N hosts.

    initialize distributed ─ mesh ─ model on the mesh (base checkpoint, or seeded init; then the
    previous stage's trainable weights) ─ optimizer ─ data iterator (this process's rows of every
    global batch) ─ restore the latest checkpoint if any ─ steps: `train_step`, metrics every
    `log_every`, a checkpoint every `checkpoint_every` and at the end

The loop runs ahead of the devices: between two log points it only dispatches steps (the step's shapes
and its LM-head layout come from the config and the batch shapes, never from device values), so the
host prepares batch N + 1 while the devices run step N; metrics are read back every `log_every` steps
and before every save. `train.transfer_guard` (a `jax.transfer_guard_device_to_host` level) can make
any device-to-host transfer between log points an error, which is how the tests prove it.

A run stops early, and cleanly, in three cases:
- SIGTERM (preemption): the handler only raises a flag. Before each step the processes exchange
  their flags through the distributed runtime's key-value store (host to host, never through the
  devices), so that one signalled host stops every host before the same step; they save the state
  after the last trained step and `train` returns (the script exits 0).
- the data runs out on any process: agreed the same way, then saved.
- a non-finite loss or gradient norm: `FloatingPointError` naming the step. The metrics are fetched
  (and checked) at every log and before every save, so no state after a bad step is ever saved and
  the last good checkpoint stays the latest.

Exact resume: the checkpoint holds the trainable parameters, the optimizer state, the step, the dropout
key and every process's data-iterator state (taken after the last trained batch, so a batch fetched
but not trained on is read again); the frozen weights are rebuilt exactly as at the start. Restarted
on the same mesh, a run replays the same computation, bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import jax
import ml_collections
import numpy as np
from flax import nnx
from orbax.checkpoint import multihost

from med2e3_jax import lora, sharding
from med2e3_jax.checkpoint.orbax_params import save_params
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.train import state as state_lib
from med2e3_jax.train import step as step_lib
from med2e3_jax.train.checkpointing import (
    CHECKPOINT_DIR,
    TrainCheckpointer,
    load_base_params,
)
from med2e3_jax.train.metrics import MetricsWriter
from med2e3_jax.train_config import validate_experiment_config

CONFIG_FILE = "config.json"
AGREE_TIMEOUT_S = 3600  # how long a process waits for the others at a step (the first step compiles)
MODEL_DIR = "model"  # the finished run's whole model, a `save_params` folder

# make_iterator(config, process_index, process_count) -> an iterator of this process's batches (dicts
# of numpy arrays, leading dim config.data.batch_size) with get_state() / set_state().
IteratorFactory = Callable[[ml_collections.ConfigDict, int, int], Iterator[dict[str, np.ndarray]]]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int  # the last step trained (and saved)
    preempted: bool  # stopped by SIGTERM before `train.steps`
    metrics: dict[str, float]  # the last logged window
    model: Med2E3  # the trained model (sharded on the run's mesh)
    optimizer: nnx.Optimizer


def make_train_iterator(config: ml_collections.ConfigDict, process_index: int, process_count: int):
    """This process's share of the training data: the Grain pipeline over `data.annotation_file`.

    Its batches are the rows process_index, process_index + process_count, ... of the global stream, so
    the global batch does not depend on the process count; its state is a small JSON dict.
    """
    data = config.data
    for key in ("annotation_file", "tokenizer_path"):
        if not data[key]:
            raise ValueError(f"config.data.{key} is empty: the training data needs it")
    if config.model.tgis.slice_weighting == "tgis" and not data.question_tokenizer_path:
        raise ValueError("config.data.question_tokenizer_path is empty: TG-IS needs the BERT tokenizer")
    from data_pipelines.annotations import load_records
    from data_pipelines.pipeline import make_dataset
    from data_pipelines.templates import load_tokenizer

    records = load_records(data.annotation_file, data.image_root or None, validate=False)
    question_tokenizer = load_tokenizer(data.question_tokenizer_path) if data.question_tokenizer_path else None
    dataset = make_dataset(records, data, train=True, tokenizer=load_tokenizer(data.tokenizer_path),
                           question_tokenizer=question_tokenizer, process_index=process_index,
                           process_count=process_count)
    return iter(dataset)


def per_process_config(config: ml_collections.ConfigDict, process_count: int) -> ml_collections.ConfigDict:
    """A copy whose `data.batch_size` is this process's share of `train.global_batch_size`."""
    train_cfg = config.train
    for parts, name in ((process_count, "processes"), (train_cfg.micro_batches, "train.micro_batches")):
        if train_cfg.global_batch_size % parts:
            raise ValueError(f"train.global_batch_size={train_cfg.global_batch_size} does not split into "
                             f"{parts} {name}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.batch_size = train_cfg.global_batch_size // process_count
    return config


# --- preemption ------------------------------------------------------------------------------------


class _StopFlags:
    """Why the processes should stop before the next step, agreed by all of them.

    SIGTERM only raises a flag here (the handler runs between two bytecodes of the main thread). Before
    every step the processes exchange their flags, so that one host being preempted, or running out of
    data, stops every host before the same step; otherwise the others would block in the step's
    collectives. The exchange goes through the coordination service's key-value store: it waits for
    the other hosts to reach the same step, never for the devices.
    """

    _runs = itertools.count()  # the n-th run of every process shares its keys with no other run

    def __init__(self):
        self.sigterm = False
        self._previous = None
        self._prefix = f"med2e3_jax/stop/{next(self._runs)}"

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        else:
            logger.warning("train() runs outside the main thread: SIGTERM will not save a checkpoint")
        return self

    def _handle(self, signum, frame) -> None:
        self.sigterm = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agree(self, step: int, *, out_of_data: bool) -> tuple[bool, bool]:
        """(stop for SIGTERM, stop for lack of data) before `step`, the same on every process."""
        flags = (self.sigterm, out_of_data)
        if jax.process_count() == 1:
            return flags
        client = multihost.get_jax_distributed_client()
        here, processes = jax.process_index(), jax.process_count()
        client.key_value_set(f"{self._prefix}/{step}/{here}", "".join(str(int(f)) for f in flags))
        timeout_ms = AGREE_TIMEOUT_S * 1000
        try:
            values = [client.blocking_key_value_get(f"{self._prefix}/{step}/{p}", timeout_ms) for p in range(processes)]
        except Exception as error:  # the runtime raises its own status errors
            raise RuntimeError(f"process {here}: the other processes did not reach step {step + 1} within "
                               f"{AGREE_TIMEOUT_S} s (a host died or hangs)") from error
        # Every process has read step - 1's flags before publishing these: step - 2's are no longer read.
        with contextlib.suppress(Exception):
            client.key_value_delete(f"{self._prefix}/{step - 2}/{here}")
        return any(v[0] == "1" for v in values), any(v[1] == "1" for v in values)


# --- model and optimizer ---------------------------------------------------------------------------


def init_model(model_cfg: ml_collections.ConfigDict, seed: int, mesh) -> Med2E3:
    """The seeded random init, computed directly on the mesh (one jitted program with the parameters'
    shardings as outputs: no host ever holds the whole model). Threefry keys are partitionable, so the
    values do not depend on the mesh or the process count."""
    create = lambda: Med2E3(model_cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = sharding.param_shardings(abstract, mesh)
    params = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return nnx.merge(graphdef, params)


def build_model(config: ml_collections.ConfigDict, mesh, *, adapters: bool = True) -> Med2E3:
    """The stage's starting point on the mesh: every weight of the base checkpoint (or the seeded init
    without one, with the pretrained `train.components` imported over it), then the trainable weights of
    the previous stage (`train.init_from`), then, in a LoRA stage (unless `adapters` is False), the
    adapters of `train.lora` (`med2e3_jax/lora.py`), with the base quantized if `train.lora.base_qtype`."""
    train_cfg = config.train
    components = {name: path for name, path in train_cfg.components.items() if path}
    lora_stage = train_cfg.stage in lora.LORA_STAGES
    if lora_stage:
        lora.check_lora_config(train_cfg.lora)
        if not train_cfg.base_checkpoint and not components.get("llm"):
            raise ValueError(f"stage {train_cfg.stage!r} adapts a pretrained LLM: set config.train.base_checkpoint "
                             "(Orbax params, med2e3-convert) or config.train.components.llm")
    if components and train_cfg.base_checkpoint:
        raise ValueError(f"config.train.base_checkpoint and config.train.components ({sorted(components)}) are both "
                         "set: the base checkpoint already holds every weight, set one of them")
    if components:
        from med2e3_jax.checkpoint.loading import load_med2e3

        model, reports = load_med2e3(config.model, components=components, seed=train_cfg.seed)
        sharding.shard_model(model, mesh)
        for name, report in zip(components, reports):
            logger.info("%s from %s: %s", name, components[name], report.summary())
    elif train_cfg.base_checkpoint:
        model = nnx.eval_shape(lambda: Med2E3(config.model, rngs=nnx.Rngs(train_cfg.seed)))
        graphdef, abstract = nnx.split(model)
        shardings = sharding.param_shardings(abstract, mesh)
        model = nnx.merge(graphdef, jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings))
        load_base_params(train_cfg.base_checkpoint, model)
        logger.info("weights from the base checkpoint %s", train_cfg.base_checkpoint)
    else:
        model = init_model(config.model, train_cfg.seed, mesh)
    if train_cfg.init_from:
        previous = TrainCheckpointer(os.path.join(train_cfg.init_from, CHECKPOINT_DIR), read_only=True)
        with previous:
            saved = previous.saved_config()
            step = previous.restore_params(model, state_lib.trainable_filter(saved.train))
        logger.info("trainable weights of stage %r (step %d) from %s", saved.train.stage, step, train_cfg.init_from)
    if lora_stage and adapters:
        model = lora.apply_lora(model, train_cfg.lora, *lora.example_inputs(config.model))
        sharding.shard_model(model, mesh)
        logger.info("LoRA rank %d on %d modules matching %s, base %s", train_cfg.lora.rank,
                    len(lora.lora_paths(model)), train_cfg.lora.module_path, train_cfg.lora.base_qtype or "as loaded")
    return model


# --- the loop --------------------------------------------------------------------------------------


class _Window:
    """Metrics since the last drain, still on the devices, and the wall time they took."""

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked
        self.checked: list[dict[str, float]] = []  # fetched since the last log
        self.seconds = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()


def _drain(window: _Window, checkpointer: TrainCheckpointer) -> None:
    """Fetches pending metrics (a sync point) and stops on the first non-finite loss or gradient norm."""
    fetched = jax.device_get([m for _, m in window.pending])
    now = time.perf_counter()
    window.seconds += now - window.started
    window.steps += len(window.pending)
    window.started = now
    for (step, _), values in zip(window.pending, fetched):
        values = {k: float(np.asarray(v)) for k, v in values.items()}
        bad = {k: values[k] for k in ("loss", "grad_norm") if k in values and not np.isfinite(values[k])}
        if bad:
            window.pending = []
            checkpointer.wait_until_finished()
            latest = checkpointer.latest_step()
            kept = (f"the last good checkpoint is step {latest} in {checkpointer.directory}" if latest is not None
                    else f"no checkpoint was written to {checkpointer.directory}")
            raise FloatingPointError(
                f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}: training stopped "
                f"without saving this state; {kept}"
            )
        window.checked.append(values)
    window.pending = []


def _log(window: _Window, writer: MetricsWriter, step: int, positions_per_step: int) -> dict[str, float]:
    rows = window.checked
    if not rows:
        return {}
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1] if k != "learning_rate"}
    if "learning_rate" in rows[-1]:
        out["learning_rate"] = rows[-1]["learning_rate"]
    out["step_time"] = window.seconds / max(window.steps, 1)  # the first window includes compilation
    # Sequence positions (prompt, vision and padding) of the global batch per second.
    out["tokens_per_s"] = positions_per_step / out["step_time"] if out["step_time"] > 0 else 0.0
    writer.write(step, out)
    window.checked, window.seconds, window.steps = [], 0.0, 0
    return out


@contextlib.contextmanager
def _between_log_points(transfer_guard: str):
    """Where the loop only dispatches: `jax.transfer_guard_device_to_host(transfer_guard)` (enforced by
    the GPU and TPU runtimes; XLA:CPU's devices are host memory and ignore it)."""
    with jax.transfer_guard_device_to_host(transfer_guard):
        yield


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          make_iterator: IteratorFactory = make_train_iterator) -> TrainResult:
    """Trains `config.train.steps` steps in `workdir`, resuming from its latest checkpoint if any.

    Args:
      config: an experiment config (`configs/*.py`): model, data, train, mesh, distributed.
      workdir: checkpoints in `workdir/checkpoints`, `metrics.jsonl`, `tensorboard/`, `config.json`;
        once `train.steps` are done, the whole model in `workdir/model` (`train.export_model`).
      make_iterator: (config, process_index, process_count) -> this process's batches; the config it
        receives has `data.batch_size` = global batch / processes. Tests pass a synthetic one.

    Raises:
      FloatingPointError: the loss or gradient norm became NaN/inf (nothing of that state is saved).
    """
    # Placement, activation constraints and the jitted step all follow the config's layout.
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        return _train(config, workdir, make_iterator)


def _train(config, workdir, make_iterator) -> TrainResult:
    validate_experiment_config(config)  # before anything is built or written: name the key at fault
    workdir = os.path.abspath(os.fspath(workdir))
    sharding.initialize_distributed(config.distributed)
    process_index, process_count = jax.process_index(), jax.process_count()
    config = per_process_config(config, process_count)
    train_cfg = config.train
    mesh = sharding.make_mesh(config.mesh)
    logger.info("process %d of %d, mesh %s", process_index, process_count, dict(mesh.shape))
    if process_index == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=1))

    model = build_model(config, mesh)
    optimizer = state_lib.make_optimizer(model, train_cfg)
    sharding.shard_model(optimizer, mesh)
    trainable = state_lib.trainable_filter(train_cfg)
    checkpointer = TrainCheckpointer.for_workdir(workdir, train_cfg)
    iterator = make_iterator(config, process_index, process_count)

    step, rng_key = 0, jax.random.key(train_cfg.seed)
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(model, optimizer, trainable)
        step, rng_key = restored.step, restored.rng_key
        if restored.data_state is not None:
            iterator.set_state(restored.data_state)
        logger.info("resumed from step %d in %s", step, checkpointer.directory)

    # The iterator state that goes with the steps trained so far: a batch fetched but not trained on
    # (when the processes agree to stop) must be read again after a resume.
    data_state = iterator.get_state()

    def save(at: int) -> None:
        _drain(window, checkpointer)  # never save past a non-finite step
        if at not in checkpointer.all_steps():
            checkpointer.save(at, model=model, optimizer=optimizer, trainable=trainable, rng_key=rng_key,
                              data_state=data_state, config=config)
        window.restart_clock()

    train_step = step_lib.make_train_step(model, optimizer, micro_batches=train_cfg.micro_batches,
                                          head_slots_per_row=train_cfg.head_slots_per_row,
                                          head_chunk=train_cfg.head_chunk)
    run_ahead = functools.partial(_between_log_points, train_cfg.transfer_guard)
    positions_per_step = None
    window = _Window()
    last_logged: dict[str, float] = {}
    preempted = False
    writer = MetricsWriter(workdir, total_steps=train_cfg.steps, initial_step=step)
    try:
        with _StopFlags() as stop:
            while step < train_cfg.steps:
                with run_ahead():  # nothing here reads the devices: the host runs ahead of them
                    local = next(iterator, None)
                    preempted, exhausted = stop.agree(step, out_of_data=local is None)
                    if exhausted:
                        logger.warning("the data ran out after step %d of %d", step, train_cfg.steps)
                        break
                    if preempted:
                        logger.warning("SIGTERM: stopping after step %d with a checkpoint", step)
                        break
                    batch = sharding.global_batch({k: local[k] for k in step_lib.MODEL_INPUTS if k in local}, mesh)
                    if positions_per_step is None:
                        positions_per_step = int(np.prod(batch["input_ids"].shape))
                    metrics = train_step(batch, rng_key)
                step += 1
                data_state = iterator.get_state()
                window.pending.append((step, metrics))
                writer.advance()
                if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                    _drain(window, checkpointer)
                    last_logged = _log(window, writer, step, positions_per_step)
                if step % train_cfg.checkpoint_every == 0:
                    save(step)
            _drain(window, checkpointer)
            if window.checked:
                last_logged = _log(window, writer, step, positions_per_step)
            if step > 0:
                save(step)
        if not preempted and hasattr(iterator, "check_skip_budget"):
            iterator.check_skip_budget()  # a run that stops before its data does is judged here too
        if step == train_cfg.steps and not preempted and train_cfg.export_model:
            # The whole model (frozen weights too) with its config: what generate/evaluate read. A LoRA
            # stage's adapters are merged into the float base (loaded again where it was quantized).
            exported = model
            if train_cfg.stage in lora.LORA_STAGES:
                exported = lora.merge_lora(model, train_cfg.lora, build_model(config, mesh, adapters=False))
            save_params(exported, os.path.join(workdir, MODEL_DIR))
            logger.info("model written to %s", os.path.join(workdir, MODEL_DIR))
    finally:
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
        if hasattr(iterator, "close"):
            iterator.close()
    return TrainResult(step=step, preempted=preempted, metrics=last_logged,
                       model=model, optimizer=optimizer)
