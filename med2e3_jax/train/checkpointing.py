"""Training checkpoints: what a run needs to continue exactly where it stopped, and nothing more.

Each step directory `workdir/checkpoints/<step>/` holds five Orbax items:

    params          the trainable parameters only (pure dict); frozen weights come from
                    `train.base_checkpoint` or the stage's seeded init and are never rewritten
    optimizer       the optimizer state (step count, AdamW moments) of the trainable parameters
    train_state     JSON: step and the dropout RNG key
    data_iterator   JSON, one file per process (`process_<i>-of-<n>.json`): the Grain iterator state,
                    written by Grain's Orbax handler
    config          JSON: the whole experiment config, with the sharding rules it ran under
                    (`sharding.logical_axis_rules`)

Saves are asynchronous (`train.async_checkpointing`) and atomic: Orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames it only once every item and every process is done, so a
save killed midway leaves a temporary directory that `latest_step()` ignores and the previous
checkpoint untouched. Restoring reads arrays straight onto the shardings of the live model and
optimizer, which the current rules placed, so a checkpoint written on one mesh and rule set (or one
process count) restores onto another: the saved rules are a record, not a constraint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Self

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from grain import checkpoint as grain_checkpoint

from med2e3_jax import sharding
from med2e3_jax.checkpoint.errors import CorruptCheckpointError
from med2e3_jax.checkpoint.orbax_params import PARAMS_ITEM, check_chunk_files, check_shapes, read_or_explain

CHECKPOINT_DIR = "checkpoints"
PARAMS = "params"
OPTIMIZER = "optimizer"
TRAIN_STATE = "train_state"
DATA_ITERATOR = "data_iterator"
CONFIG = "config"

logger = logging.getLogger(__name__)


# --- the per-process data-iterator item -----------------------------------------------------------


class _IteratorSnapshot:
    """The item `grain.checkpoint.CheckpointHandler` saves and restores in place of the live iterator.

    Grain's handler writes `item.get_state()` into `process_<i>-of-<n>.json`, every process its own
    file, and restores with `item.set_state()`. The loop saves the state taken after the last trained
    batch, not the live iterator's (that one may be a batch further: fetched, then the processes agreed
    to stop), and `restore` returns the state instead of setting it on an iterator of the caller's.
    """

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        # Grain's handler decodes what an item other than a `DatasetIterator` returns: JSON bytes here.
        # A `DataLoaderIterator`'s own state is bytes, kept as such under "__bytes__".
        state = {"__bytes__": self.state.decode()} if isinstance(self.state, bytes) else self.state
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if isinstance(state, dict) and set(state) == {"__bytes__"}:
            state = state["__bytes__"].encode()
        self.state = state

    def start_prefetch(self) -> None:
        pass  # Grain's handler calls it after `set_state`; a snapshot has nothing to prefetch


class _DataIteratorHandler(grain_checkpoint.CheckpointHandler):
    """Grain's handler under a class of its own, only so that its restore arguments can default to an
    empty snapshot: Orbax builds default arguments for every item when `manager.restore(step)` is called
    without any, and Grain's `CheckpointRestore` needs an item."""


@ocp.args.register_with_handler(_DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class _DataIteratorSave(grain_checkpoint.CheckpointSave):
    pass


@ocp.args.register_with_handler(_DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class _DataIteratorRestore(grain_checkpoint.CheckpointRestore):
    item: Any = dataclasses.field(default_factory=_IteratorSnapshot)


def _iterator_state_file(step_directory: str) -> str:
    """This process's file in the data-iterator item, named as Grain's handler names it."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.join(step_directory, DATA_ITERATOR, name)


# --- RNG keys as JSON ------------------------------------------------------------------------------


def _key_to_json(key: jax.Array) -> dict:
    """A typed key as its implementation and raw data; a legacy uint32 key as its data."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl, data = str(jax.random.key_impl(key)), jax.random.key_data(key)
    else:
        impl, data = None, key
    return {"impl": impl, "data": np.asarray(jax.device_get(data)).tolist()}


def _key_from_json(saved: dict) -> jax.Array:
    data = np.asarray(saved["data"], np.uint32)
    if saved["impl"] is None:
        return jax.numpy.asarray(data)
    return jax.random.wrap_key_data(data, impl=saved["impl"])


# --- save and restore ------------------------------------------------------------------------------


def _live_target(tree):
    """Abstract arrays with the live arrays' shapes, dtypes and shardings: restore lands on them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


@dataclasses.dataclass
class Restored:
    step: int
    rng_key: jax.Array
    data_state: Any  # this process's iterator state; None if written by a different process count
    config: ml_collections.ConfigDict  # the config the checkpoint was written with


class TrainCheckpointer:
    """An Orbax `CheckpointManager` over `directory` (usually `workdir/checkpoints`).

    All processes must construct it and call `save`/`restore` together (Orbax synchronises them).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        """`read_only` for another run's checkpoints (e.g. `train.init_from`): nothing is written or
        cleaned up there."""
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory} does not exist: expected a training run's checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # A save killed midway leaves `<step>.orbax-checkpoint-tmp-*`: never a restorable step,
            # removed when the next run opens the directory.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        items = {
            PARAMS: (ocp.args.StandardSave, ocp.args.StandardRestore),
            OPTIMIZER: (ocp.args.StandardSave, ocp.args.StandardRestore),
            TRAIN_STATE: (ocp.args.JsonSave, ocp.args.JsonRestore),
            DATA_ITERATOR: (_DataIteratorSave, _DataIteratorRestore),
            CONFIG: (ocp.args.JsonSave, ocp.args.JsonRestore),
        }
        for name, arg_types in items.items():
            for arg_type in arg_types:
                registry.add(name, arg_type)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    @classmethod
    def for_workdir(cls, workdir: str | os.PathLike, train_cfg: ml_collections.ConfigDict) -> TrainCheckpointer:
        return cls(
            os.path.join(os.fspath(workdir), CHECKPOINT_DIR),
            keep=train_cfg.keep_checkpoints,
            async_save=train_cfg.async_checkpointing,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        *,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        trainable,
        rng_key: jax.Array,
        data_state: Any,
        config: ml_collections.ConfigDict,
    ) -> None:
        """Starts saving `step` (returns once the arrays are copied off the devices when asynchronous).

        Args:
          trainable: the nnx filter of the trainable parameters (`train.state.trainable_filter`).
          data_state: this process's `iterator.get_state()`.
        """
        args = ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, trainable))),
                OPTIMIZER: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
                TRAIN_STATE: ocp.args.JsonSave({"step": int(step), "rng_key": _key_to_json(rng_key)}),
                DATA_ITERATOR: _DataIteratorSave(_IteratorSnapshot(data_state)),
                CONFIG: ocp.args.JsonSave(_config_json(config)),
            }
        )
        self.manager.save(int(step), args=args, force=True)

    def saved_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        step = self._step_or_latest(step)
        restored = read_or_explain(
            lambda: self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})),
            os.path.join(self.directory, str(step), CONFIG))
        return ml_collections.ConfigDict(restored[CONFIG])

    def restore_params(self, model: nnx.Module, trainable, step: int | None = None) -> int:
        """Loads the saved trainable parameters into `model` (in place, on its shardings).

        `trainable` must select the parameters the checkpoint was written with (for `init_from`, the
        previous stage's filter, from `saved_config(step).train`). Returns the step read.
        """
        step = self._step_or_latest(step)
        params = nnx.state(model, trainable)
        target = _live_target(nnx.to_pure_dict(params))
        where = os.path.join(self.directory, str(step))
        metadata = read_or_explain(lambda: self.manager.item_metadata(step), where)
        check_shapes(metadata[PARAMS], target, os.path.join(where, PARAMS))
        restored = read_or_explain(
            lambda: self.manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})),
            where)
        nnx.replace_by_pure_dict(params, restored[PARAMS])
        nnx.update(model, params)
        return step

    def restore(
        self, model: nnx.Module, optimizer: nnx.Optimizer, trainable, step: int | None = None
    ) -> Restored:
        """Everything saved at `step` (default: the latest): parameters and optimizer state in place,
        the rest returned."""
        step = self._step_or_latest(step)
        params = nnx.state(model, trainable)
        opt_state = nnx.state(optimizer)
        params_target = _live_target(nnx.to_pure_dict(params))
        opt_target = _live_target(nnx.to_pure_dict(opt_state))
        where = os.path.join(self.directory, str(step))
        metadata = read_or_explain(lambda: self.manager.item_metadata(step), where)
        check_shapes(metadata[PARAMS], params_target, os.path.join(where, PARAMS))
        check_shapes(metadata[OPTIMIZER], opt_target, os.path.join(where, OPTIMIZER))
        items = {
            PARAMS: ocp.args.StandardRestore(params_target),
            OPTIMIZER: ocp.args.StandardRestore(opt_target),
            TRAIN_STATE: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }
        # Grain's handler raises when this process has no file: written by another process count.
        data_snapshot = None
        if os.path.exists(_iterator_state_file(where)):
            data_snapshot = _IteratorSnapshot()
            items[DATA_ITERATOR] = _DataIteratorRestore(data_snapshot)
        restored = read_or_explain(lambda: self.manager.restore(step, args=ocp.args.Composite(**items)), where)
        nnx.replace_by_pure_dict(params, restored[PARAMS])
        nnx.update(model, params)
        nnx.replace_by_pure_dict(opt_state, restored[OPTIMIZER])
        nnx.update(optimizer, opt_state)
        data_state = None if data_snapshot is None else data_snapshot.state
        if data_snapshot is None:
            logger.warning(
                "checkpoint %s holds no data-iterator state for process %d of %d (it was written by another "
                "process count): the data iterator starts afresh",
                where, jax.process_index(), jax.process_count(),
            )
        saved_config = ml_collections.ConfigDict(restored[CONFIG])
        if sharding.rules_of(saved_config) != sharding.current_rules():
            logger.info("checkpoint %s was written under the sharding rules %s; its arrays are placed by the "
                        "current ones, %s", where, sharding.rules_of(saved_config), sharding.current_rules())
        train_state = restored[TRAIN_STATE]
        return Restored(
            step=int(train_state["step"]),
            rng_key=_key_from_json(train_state["rng_key"]),
            data_state=data_state,
            config=saved_config,
        )

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint under {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no finished checkpoint for step {step} under {self.directory} "
                                    f"(have {self.all_steps()})")
        return step


def load_base_params(directory: str | os.PathLike, model: nnx.Module) -> None:
    """Every parameter of a `save_params` checkpoint (the imported base model) into `model`, in place,
    onto its shardings. This is where the frozen weights come from."""
    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_ITEM)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found: train.base_checkpoint must be a directory written by "
                                "save_params (scripts/convert_checkpoint.py)")
    params = nnx.state(model, nnx.Param)
    target = _live_target(params)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = read_or_explain(lambda: checkpointer.metadata(path).item_metadata, path)
        if metadata is None:
            raise CorruptCheckpointError(f"{path}: its metadata cannot be read; train.base_checkpoint must be a "
                                         "directory written by save_params (med2e3-convert)", path=path)
        check_shapes(metadata.tree, target, path)
        check_chunk_files(metadata.tree, path)
        restored = read_or_explain(lambda: checkpointer.restore(path, target), path)
    nnx.update(model, restored)
