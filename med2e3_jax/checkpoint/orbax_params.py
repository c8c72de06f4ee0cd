"""Model parameters as an Orbax checkpoint, with the model config beside them.

The config travels with the weights so that a checkpoint is self-describing: restoring needs only the
directory, and restoring onto a mesh needs only the shardings of the abstract model.

Restoring checks what it can before Orbax reads anything, so that a broken checkpoint fails in one
line naming the file or parameter rather than deep inside TensorStore: the saved config is bounded in
size and the model it describes in bytes (`CheckpointLimits`); every parameter's saved shape is compared
with the model's, by name; with one Zarr array per parameter, every chunk file is checked to exist.
What Orbax still raises comes back as a `CorruptCheckpointError` carrying the root cause's first line.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from med2e3_jax.checkpoint.errors import CheckpointError, CheckpointMismatchError, CorruptCheckpointError
from med2e3_jax.checkpoint.limits import DEFAULT_LIMITS, CheckpointLimits, read_json
from med2e3_jax.models.med2e3 import Med2E3

log = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
PARAMS_ITEM = "params"

T = TypeVar("T")


def save_params(model: Med2E3, directory: str | os.PathLike) -> None:
    """Writes `directory/params` (Orbax) and `directory/model_config.json`.

    One Zarr array per parameter rather than Orbax's default OCDBT store, whose writer buffers a
    large share of the parameters' bytes on top of them while it saves; this way a save adds little,
    so that converting the released model fits in a small multiple of its size
    (`benchmarks/bench_convert.py`). Restoring detects either format.
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer(use_ocdbt=False) as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_ITEM), nnx.state(model, nnx.Param), force=True)
    if jax.process_index() == 0:
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(model.cfg.to_json(indent=1))


def load_config(directory: str | os.PathLike, limits: CheckpointLimits = DEFAULT_LIMITS) -> ml_collections.ConfigDict:
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a checkpoint written by save_params?")
    saved = read_json(path, limits, "model config")
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{path} holds a JSON {type(saved).__name__}, not a model config (an object)",
                                     path=path)
    return ml_collections.ConfigDict(saved)


def restore_params(directory: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None, *,
                   limits: CheckpointLimits = DEFAULT_LIMITS) -> Med2E3:
    """The model saved in `directory`, built from its saved config unless `cfg` is given.

    Raises:
      CheckpointTooLargeError: the saved config, or the parameters it asks for, exceed `limits`.
      CheckpointMismatchError: a parameter's saved shape differs from `cfg`'s model (each is named with
        both shapes, and the config keys in which `cfg` differs from the saved one).
      CorruptCheckpointError: a file of the checkpoint is missing or unreadable.
    """
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_FILE)
    given = cfg is not None
    cfg = cfg if given else load_config(directory, limits)
    abstract = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params
    )
    limits.check_parameters(config_path, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(target)))
    path = os.path.join(directory, PARAMS_ITEM)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a checkpoint written by save_params?")
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = read_or_explain(lambda: checkpointer.metadata(path).item_metadata, path)
        if metadata is None:  # Orbax logs a warning and returns None when one array's metadata is unreadable
            check_array_metadata_files(path)
            raise CorruptCheckpointError(f"{path}: its metadata cannot be read; expected a params item written by "
                                         "save_params", path=path)
        metadata = metadata.tree
        try:
            check_shapes(metadata, target, path)
        except CheckpointMismatchError as error:
            if not given or not os.path.exists(config_path):
                raise
            hint = config_differences(load_config(directory, limits), cfg)
            raise CheckpointMismatchError(f"{error}. {hint}" if hint else str(error), path=path) from None
        check_chunk_files(metadata, path)
        restored = read_or_explain(lambda: checkpointer.restore(path, target), path)
    return nnx.merge(graphdef, restored)


# --- what restoring checks -------------------------------------------------------------------------


def _path(key_path) -> str:
    """'a/0/b' for dict keys, sequence indices and attributes alike: Orbax's metadata has string keys
    where the live tree may have integers (optax's chained states)."""
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in key_path)
    return "/".join(str(p) for p in parts)


def _flat(tree) -> dict[str, object]:
    return {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(saved, target, where: str) -> None:
    """Raises CheckpointMismatchError naming every array of `target` that `saved` (Orbax metadata of
    the same tree) lacks or holds in another shape, with both shapes."""
    saved_flat, target_flat = _flat(saved), _flat(target)
    missing = sorted(set(target_flat) - set(saved_flat))
    wrong = [f"{key}: saved {tuple(getattr(saved_flat[key], 'shape', None) or ())}, the model expects "
             f"{tuple(want.shape)}"
             for key, want in target_flat.items()
             if key in saved_flat and tuple(getattr(saved_flat[key], "shape", None) or ()) != tuple(want.shape)]
    if not missing and not wrong:
        return
    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} of the arrays the model needs, e.g. {', '.join(missing[:3])}")
    if wrong:
        parts.append(f"{len(wrong)} arrays have another shape: {'; '.join(wrong[:5])}"
                     + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    raise CheckpointMismatchError(f"{where}: " + "; ".join(parts), path=where)


def config_differences(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict, limit: int = 5) -> str:
    """'the config given differs from the checkpoint's in llm.hidden_size (saved 64, given 128), ...'"""

    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            if isinstance(value, Mapping | ml_collections.ConfigDict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = tuple(value) if isinstance(value, list | tuple) else value
        return out

    a, b = flat(saved.to_dict()), flat(given.to_dict())
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not keys:
        return ""
    shown = [f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"The config given differs from the checkpoint's {CONFIG_FILE} in {', '.join(shown)}{more}"


def check_chunk_files(metadata, directory: str) -> None:
    """With one Zarr array per parameter (`save_params`), every chunk file must be there: TensorStore
    would otherwise fail deep in a restore, the cause buried under the tracebacks of its other reads.
    OCDBT checkpoints (one store for all arrays) are left to Orbax."""
    if any(name.startswith("ocdbt.") or name == "manifest.ocdbt" for name in os.listdir(directory)):
        return
    for key, leaf in _flat(metadata).items():
        name = getattr(leaf, "name", None)
        if name is None:
            continue
        array = os.path.join(directory, name)
        if not os.path.isfile(os.path.join(array, ".zarray")):
            raise CorruptCheckpointError(f"{directory}: parameter {key} has no {os.path.join(name, '.zarray')}: "
                                         "the checkpoint is incomplete (copy or convert it again)", path=directory)
        shape = tuple(leaf.shape)
        chunk = tuple(getattr(getattr(leaf, "storage", None), "chunk_shape", None) or shape)
        grid = [range(math.ceil(s / c)) if c else range(1) for s, c in zip(shape, chunk)]
        for index in itertools.product(*grid) if shape else [(0,)]:
            chunk_name = ".".join(map(str, index))
            if not os.path.isfile(os.path.join(array, chunk_name)):
                count = int(np.prod([len(g) for g in grid])) if shape else 1
                raise CorruptCheckpointError(
                    f"{directory}: parameter {key}: chunk file {os.path.join(name, chunk_name)} is missing (shape "
                    f"{shape} is stored in {count} chunks of {chunk}); the checkpoint is incomplete (copy or "
                    "convert it again)", path=array)


def check_array_metadata_files(directory: str) -> None:
    """Names the first array folder of a one-Zarr-array-per-parameter checkpoint that lacks its `.zarray`."""
    for name in sorted(os.listdir(directory)):
        folder = os.path.join(directory, name)
        if name.endswith(".value") and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, ".zarray")):
            raise CorruptCheckpointError(f"{directory}: parameter {name[:-len('.value')]} has no "
                                         f"{os.path.join(name, '.zarray')}: the checkpoint is incomplete (copy or "
                                         "convert it again)", path=folder)


def read_or_explain(read: Callable[[], T], where: str) -> T:
    """`read()`, with an exception from Orbax or TensorStore turned into one CorruptCheckpointError
    naming `where` and the root cause; the original stays chained (`--verbose` shows it)."""
    _quiet_orbax_aftermath()  # before the read: its other threads may report while the error propagates
    try:
        return read()
    except CheckpointError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        raise CorruptCheckpointError(f"{where}: cannot be read: {root_cause(error)}", path=where) from error
    except Exception as error:  # Orbax raises a bare Exception for a failed array read
        if type(error) is not Exception:
            raise
        raise CorruptCheckpointError(f"{where}: cannot be read: {root_cause(error)}", path=where) from error


def root_cause(error: BaseException) -> str:
    """The first line of the innermost exception of `error`'s chain, TensorStore's spec dump cut off."""
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]


_AFTERMATH = ("Event loop is closed", "Encountered error while reading array")


def _quiet_orbax_aftermath() -> None:
    """After a failed read, Orbax's other reads finish on threads whose event loop is gone, and each
    reports an unraisable exception, then or at exit, hundreds of tracebacks in all: from the first
    read on, those two kinds are logged at debug level; other unraisable exceptions go to the previous
    hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_med2e3_quiet", False):
        return

    def hook(unraisable):
        if any(text in str(unraisable.exc_value) for text in _AFTERMATH):
            log.debug("after a failed Orbax read: %s", unraisable.exc_value)
            return
        previous(unraisable)

    hook._med2e3_quiet = True
    sys.unraisablehook = hook
