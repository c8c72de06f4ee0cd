"""The device mesh and the one table that maps names to mesh axes.

Parameters and activations carry logical axis names (`embed`, `heads`, `mlp`, `vocab`, `batch`, ...);
`LOGICAL_RULES` says which mesh axes each name is split over, and `PARAM_LOGICAL_AXES` names the axes
of every Med-2E3 parameter by its path. A new parallelism layout is therefore a change of
`config.mesh` (and at most of this table), never of the model code:

  - data parallelism: `mesh.data` > 1; every parameter replicated, the batch split;
  - FSDP: `mesh.fsdp` > 1; parameters (and with them the optimizer state) split along `embed`, the
    batch split over `data` x `fsdp`; XLA gathers each weight where it is used;
  - tensor parallelism: `mesh.tensor` > 1; attention heads, MLP hidden units and the vocabulary split.

A dimension whose size does not divide by its mesh axes is replicated instead (logged once per name),
so that every config runs on every mesh, if not always at the best layout.

Activations are pinned where it matters (`constrain`, called on the attention inputs and output of
every layer): left to itself, XLA's propagation may follow an FSDP-split weight and run a layer on the
global batch; pinned, the batch stays split and the weights are gathered instead.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes it is split over. Names not listed are replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # Vocabulary rows split over fsdp too: the embedding tables must not split `embed` (see below).
    "vocab": ("tensor", "fsdp"),
}

# Parameter path (dot-joined, searched at the end of the path so that optimizer state such as
# `opt_state.0.mu.<param path>` follows its parameter) -> logical axis of each dimension. The first
# match wins; a parameter no pattern matches is replicated. `None` marks a dimension kept whole.
_PROJECTIONS_IN = r"(qkv_proj|q_proj|k_proj|v_proj|qkv)"  # embed -> heads
_PROJECTIONS_OUT = r"(o_proj|out_proj)"  # heads -> embed
_MLP_IN = r"(gate_up_proj|gate_proj|up_proj|fc1|linear1|intermediate)"  # embed -> hidden units
_MLP_OUT = r"(down_proj|fc2|linear2|output)"  # hidden units -> embed
#
# Weights that create or are added to the residual stream (token, position and patch embeddings, the CLS
# token) never split `embed`: their split would give the activations' `embed` dimension the fsdp axis,
# which the batch dimension needs, and XLA would then run whole towers on the global batch with the
# contraction split. Together with `constrain` on the attention inputs this took the temporaries of a
# 1-layer full-size finetune step on 8 fsdp devices from 17.9 GB to 5.0 GB (either alone: no gain).
# Token embeddings split their rows instead; the others are small and replicated.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"llm\.embed_tokens\.embedding", ("vocab", None)),
    (r"llm\.lm_head\.kernel", ("embed", "vocab")),
    (r"question_encoder\.embeddings\.word_embeddings\.embedding", ("vocab", None)),
    (rf"{_PROJECTIONS_IN}\.kernel", ("embed", "heads")),
    (rf"{_PROJECTIONS_IN}\.bias", ("heads",)),
    (rf"{_PROJECTIONS_OUT}\.kernel", ("heads", "embed")),
    (rf"{_MLP_IN}\.kernel", ("embed", "mlp")),
    (rf"{_MLP_IN}\.bias", ("mlp",)),
    (rf"{_MLP_OUT}\.kernel", ("mlp", "embed")),
    # Connectors and text_mlp map an encoder width onto the LLM's: split the LLM side.
    (r"(vision2d_connector|vision3d_connector)\.linear_in\.kernel", (None, "embed")),
    (r"(vision2d_connector|vision3d_connector)\.linear_out\.kernel", ("mlp", "embed")),
    (r"tgis\.text_mlp\.kernel", (None, "embed")),
    (r"question_encoder\.pooler\.dense\.kernel", ("embed", None)),
)
_COMPILED = tuple((re.compile(rf"(^|\.){pattern}$"), axes) for pattern, axes in PARAM_LOGICAL_AXES)

_logged_fallbacks: set[str] = set()


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all devices by default); one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[axis]) for axis in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one of mesh.{AXES} may be -1, got {dict(zip(AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh {dict(zip(AXES, sizes))}: {len(devices)} devices do not divide by the fixed axes ({known})"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, found {len(devices)}")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    *, name: str = "") -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry `logical_axes`, by `LOGICAL_RULES`.

    A dimension is replicated when its size does not divide by its mesh axes, or when those mesh axes
    already split an earlier dimension (a mesh axis can split one dimension only).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name}: logical axes {tuple(logical_axes)} do not match the shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        mesh_axes = LOGICAL_RULES.get(logical) if logical is not None else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        split = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % split:
            key = f"{name}:{logical}:{size}:{split}"
            if key not in _logged_fallbacks:
                _logged_fallbacks.add(key)
                logging.info("sharding: %s dimension %r of size %d does not divide by mesh axes %s (%d); "
                             "replicated", name, logical, size, mesh_axes, split)
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    # Canonical form, without trailing Nones: jit returns P() for a replicated vector, and an input
    # placed with P(None) would not match it, so every step would compile anew.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter (or optimizer state leaf) at dot-joined `path`."""
    for pattern, axes in _COMPILED:
        if pattern.search(path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":  # nnx.Variable's own pytree key
        parts.pop()
    return ".".join(parts)


def param_shardings(state, mesh: Mesh):
    """A tree like `state` (an nnx.State of a model or an optimizer, or any pytree) of NamedShardings."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    shardings = []
    for path, leaf in leaves:
        name = _path_str(path)
        shape = np.shape(leaf)
        axes = param_logical_axes(name, len(shape))
        shardings.append(NamedSharding(mesh, logical_to_spec(axes, shape, mesh, name=name)))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def shard_model(model, mesh: Mesh) -> None:
    """Places every array of `model` (a Module, or an nnx.Optimizer) on `mesh` by the table, in place."""
    from flax import nnx  # the sharding table itself does not depend on flax

    state = nnx.state(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    shardings = jax.tree_util.tree_leaves(param_shardings(state, mesh))
    placed = [jax.device_put(leaf, sharding) for leaf, sharding in zip(leaves, shardings)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, placed))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the layout `LOGICAL_RULES` gives `logical_axes`, on the mesh `x` is traced on.

    For activations inside `jit`: the mesh comes from `x`'s type (the mesh of the sharded inputs), so
    the models need no mesh argument; on one device, or on a mesh not made by `make_mesh`, `x` is
    returned unchanged.
    """
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    # Only meshes from `make_mesh` (all of AXES) that split something; other meshes are left alone.
    if mesh is None or mesh.empty or not set(AXES) <= set(mesh.shape):
        return x
    if math.prod(mesh.shape[a] for a in AXES) == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, name="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over `LOGICAL_RULES['batch']`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"]))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global array per key from this process's rows (the process-local slice of the batch).

    Every process passes the same keys with the same per-process batch size; the global batch is the
    concatenation over processes in process order.
    """
    sharding = batch_sharding(mesh)
    split = math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % split:
            raise ValueError(
                f"batch[{key!r}]: {global_rows} global rows do not divide by the {split} batch shards "
                f"(mesh axes {LOGICAL_RULES['batch']})"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def initialize_distributed(dist_cfg) -> None:
    """`jax.distributed.initialize` for multi-process runs (num_processes > 1); nothing otherwise.

    Must run before anything touches the devices. On CPU the cross-process collectives need gloo.
    """
    num_processes = int(dist_cfg.num_processes)
    if num_processes <= 1:
        return
    if not dist_cfg.coordinator_address:
        raise ValueError("distributed.coordinator_address is required when distributed.num_processes > 1")
    collectives = dist_cfg.get("cpu_collectives", "gloo")
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    jax.distributed.initialize(
        coordinator_address=dist_cfg.coordinator_address,
        num_processes=num_processes,
        process_id=int(dist_cfg.process_id),
    )
