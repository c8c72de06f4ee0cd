"""Filling an NNX model (concrete or abstract) from a `TensorSource`, and reading its parameters back."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from med2e3_jax.checkpoint.port import ImportReport, Path, PortTable, TensorSource, export_tensors, import_tensors


def param_specs(model: nnx.Module, only: tuple[str, ...] | None = None) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """Path -> (shape, dtype) of every `nnx.Param` of `model` (which may come from `nnx.eval_shape`),
    restricted to the submodules named in `only` when given."""
    state = nnx.state(model, nnx.Param)
    return {
        tuple(path): (tuple(var.get_value().shape), np.dtype(var.get_value().dtype))
        for path, var in nnx.to_flat_state(state)
        if only is None or path[0] in only
    }


def param_counts(model: nnx.Module) -> dict[str, int]:
    """Top-level submodule (`llm`, `vision2d`, …) -> number of parameters; `model` may be abstract."""
    counts: dict[str, int] = {}
    for path, (shape, _) in param_specs(model).items():
        counts[path[0]] = counts.get(path[0], 0) + int(np.prod(shape, dtype=np.int64))
    return counts


def load_pytorch(
    model: nnx.Module,
    source: TensorSource,
    table: PortTable,
    *,
    only: tuple[str, ...] | None = None,
    progress: bool = False,
) -> tuple[nnx.Module, ImportReport]:
    """Returns `model` with its parameters read from `source` through `table`.

    `model` may be abstract (`nnx.eval_shape(lambda: Model(..., rngs=nnx.Rngs(0)))`): nothing is then
    allocated but the imported arrays, one tensor at a time, each placed on the default device as it is
    read (peak host memory: the parameters once, plus a tensor or two in flight). Models keep no state
    but parameters (dropout keys are passed at call time). With `only`, just the parameters of those
    top-level submodules are read (a component checkpoint); the others keep their values.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(model).__name__} holds non-parameter state; it cannot be imported: {rest}")
    flat = nnx.to_flat_state(params)
    variables = {tuple(path): var for path, var in flat}

    def place(path: Path, value: np.ndarray) -> None:
        # One copy into a device buffer per tensor, the host array dropped at once: the host holds the
        # model once plus a tensor or two, never a second copy of the whole model.
        variables[path].set_value(jax.device_put(value))

    _, report = import_tensors(param_specs(model, only), source, table, progress=progress, sink=place)
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest), report


def abstract_params(model: nnx.Module) -> list[str]:
    """Names of parameters that are still abstract (never loaded) in `model`."""
    return [
        ".".join(map(str, path))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]


def params_numpy(model: nnx.Module) -> dict[Path, np.ndarray]:
    """Path -> host numpy array of every parameter."""
    return {tuple(path): np.asarray(jax.device_get(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def export_pytorch(model: nnx.Module, table: PortTable) -> dict[str, np.ndarray]:
    """Every parameter of `model` under its torch key, in the torch layout."""
    return export_tensors(params_numpy(model), table)
