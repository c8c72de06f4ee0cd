"""The device mesh, and how logical axis names land on it.

Every parameter declares the logical axes of its dimensions where the model creates it
(`param_axes`: `nnx.Linear(..., kernel_metadata=param_axes("embed", "heads"))`), and the models
constrain their activations by logical name (`constrain(x, ("batch", None, "heads", None))`). The
experiment config's `sharding.logical_axis_rules` (defaults in `train_config.sharding_config`) maps
each name to mesh axes; `logical_axis_rules(...)` makes a rule set current, and everything here
reads the current one: parameter placement (`param_shardings`, `shard_model`), activation
constraints, the batch split. A new parallelism layout is therefore a change of `config.mesh` and
`config.sharding`, never of the model code:

  - data parallelism: `mesh.data` > 1; every parameter replicated, the batch split;
  - FSDP: `mesh.fsdp` > 1; parameters (and with them the optimizer state, whose leaves carry their
    parameter's metadata) split along `embed`, the batch split over `data` x `fsdp`; XLA gathers each
    weight where it is used;
  - tensor parallelism: `mesh.tensor` > 1; attention heads, MLP hidden units and the vocabulary split;
  - anything else the rules can say: e.g. `configs/plans.py:finetune_8xh100_tp` splits the LLM over
    `tensor` and runs the encoders as FSDP over every device (docs/sharding.md).

One rule is overridden on the command line by name, e.g.
`--config.sharding.logical_axis_rules.heads=fsdp,tensor` (docs/sharding.md has the syntax).

The declarations keep three choices. Weights that create or are added to the residual stream (token,
position and patch embeddings, the CLS token) never split `embed`: their split would give the
activations' `embed` dimension the fsdp axis, which the batch dimension needs, and XLA would then run
whole towers on the global batch with the contraction split; token embeddings split their rows
(`vocab`) instead, the others are small and replicated. The connectors and TG-IS's `text_mlp` map an
encoder width onto the LLM's and split the LLM side (`embed`). A dimension whose size does not divide
by its mesh axes is replicated instead (logged once per name), so that every config runs on every
mesh, if not always at the best layout.

Activations are pinned where it matters (`constrain`, called on the attention inputs and output of
every layer): left to itself, XLA's propagation may follow an FSDP-split weight and run a layer on the
global batch; pinned, the batch stays split and the weights are gathered instead.

The current rules are a `jax.make_user_context`: part of `jit`'s cache key, so a step traced under
one rule set is traced again under another.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

# Logical axis name -> the mesh axes it is split over, as ((name, (mesh axes...)), ...).
Rules = tuple[tuple[str, tuple[str, ...]], ...]

_logged_fallbacks: set[str] = set()


def normalize_rules(rules, *, where: str = "sharding.logical_axis_rules") -> Rules:
    """`rules` (a mapping such as `config.sharding.logical_axis_rules`, or (name, mesh axes) pairs) as
    hashable pairs. Mesh axes may be a tuple, one name, or comma-joined names as the command line gives
    them (`fsdp,tensor`); '' and () replicate. Unknown mesh axes are an error naming the rule."""
    pairs = rules.items() if isinstance(rules, Mapping) or hasattr(rules, "items") else rules
    out = []
    for name, mesh_axes in pairs:
        if mesh_axes is None:
            mesh_axes = ()
        elif isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        axes = tuple(part.strip() for entry in mesh_axes for part in str(entry).split(",") if part.strip())
        unknown = [a for a in axes if a not in AXES]
        if unknown or len(set(axes)) != len(axes):
            raise ValueError(f"{where}.{name}: expected distinct mesh axes from {AXES}, got {tuple(mesh_axes)}")
        out.append((str(name), axes))
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: one rule per logical axis name expected, got {names}")
    return tuple(out)


@functools.cache
def default_rules() -> Rules:
    """The rules of `train_config.sharding_config()`, which every config in configs/ starts from."""
    from med2e3_jax.train_config import (
        sharding_config,  # the config module, not a copy of its table
    )

    return normalize_rules(sharding_config().logical_axis_rules)


# None: no rule set entered, the defaults apply.
_current = jax.make_user_context(None)


def rules_of(config) -> Rules:
    """The rules of an experiment config (`config.sharding.logical_axis_rules`); the defaults for a
    config without a `sharding` section (one saved before it had one)."""
    if "sharding" not in config:
        return default_rules()
    return normalize_rules(config.sharding.logical_axis_rules)


@contextlib.contextmanager
def logical_axis_rules(rules):
    """Makes `rules` (a mapping or (name, mesh axes) pairs; `rules_of(config)` for a config's) current:

        with sharding.logical_axis_rules(sharding.rules_of(config)):
            ...  # placement, constraints and the jitted step follow config.sharding
    """
    with _current(normalize_rules(rules)):
        yield


def current_rules() -> Rules:
    """The rules entered last (`logical_axis_rules`), or the defaults."""
    rules = _current.value
    return default_rules() if rules is None else rules


def mesh_axes(logical: str | None) -> tuple[str, ...]:
    """The mesh axes the current rules split `logical` over (() for a name without a rule)."""
    if logical is None:
        return ()
    return dict(current_rules()).get(logical, ())


def param_axes(*logical_axes: str | None) -> dict:
    """Metadata that declares a parameter's logical axes, one per dimension (None: kept whole):
    `nnx.Param(value, **param_axes("embed"))`, `nnx.Linear(..., kernel_metadata=param_axes(...))`.

    flax's `out_sharding` metadata, which `nnx.Optimizer` copies onto the parameter's moments. Eager
    sharding is off: a model is built without a mesh, and `shard_model` / `param_shardings` place it
    by the current rules.
    """
    return dict(out_sharding=tuple(logical_axes), eager_sharding=False)


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
    """The PartitionSpec of an array whose dimensions carry `logical_axes`, by the current rules.

    A dimension is replicated when its size does not divide by its mesh axes, or when those mesh axes
    already split an earlier dimension (a mesh axis can split one dimension only).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name}: logical axes {tuple(logical_axes)} do not match the shape {tuple(shape)}")
    rules = dict(current_rules())
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        split_over = tuple(a for a in rules.get(logical, ()) if mesh.shape[a] > 1 and a not in used)
        split = math.prod(mesh.shape[a] for a in split_over)
        if split_over and size % split:
            key = f"{name}:{logical}:{size}:{split}"
            if key not in _logged_fallbacks:
                _logged_fallbacks.add(key)
                logging.info("sharding: %s dimension %r of size %d does not divide by mesh axes %s (%d); "
                             "replicated", name, logical, size, split_over, split)
            split_over = ()
        used.update(split_over)
        spec.append(_spec_entry(split_over))
    # Canonical form, without trailing Nones: jit returns P() for a replicated vector, and an input
    # placed with P(None) would not match it, so every step would compile anew.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _spec_entry(mesh_axes: tuple[str, ...]):
    return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def declared_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axes `variable` was created with (`param_axes`), or None where it declares none."""
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def param_shardings(state, mesh: Mesh):
    """A tree like `state` (an nnx.State of a model or an optimizer, or any pytree) of NamedShardings.

    Each variable is placed by the logical axes it declares (the optimizer's moments carry their
    parameter's) under the current rules; arrays that declare none are replicated.
    """

    def place(path, node):
        name = _path_str(path)
        axes = declared_axes(node) if isinstance(node, nnx.Variable) else None

        def sharding_of(leaf):
            shape = np.shape(leaf)
            if axes is not None and len(axes) != len(shape):
                raise ValueError(f"{name}: declares logical axes {axes} for an array of shape {tuple(shape)}")
            logical = axes if axes is not None else (None,) * len(shape)
            return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, name=name))

        return jax.tree.map(sharding_of, node) if isinstance(node, nnx.Variable) else sharding_of(node)

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh: Mesh) -> None:
    """Places every array of `model` (a Module, or an nnx.Optimizer) on `mesh` by the current rules, in place."""
    state = nnx.state(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    shardings = jax.tree_util.tree_leaves(param_shardings(state, mesh))
    placed = [jax.device_put(leaf, sharding) for leaf, sharding in zip(leaves, shardings)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, placed))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the layout the current rules give `logical_axes`, on the mesh `x` is traced on.

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
    """The leading (batch) dimension split over the mesh axes of `batch`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(_spec_entry(mesh_axes("batch"))))


def batch_shards(mesh: Mesh) -> int:
    """How many shards `batch_sharding` splits the batch rows into."""
    return math.prod(mesh.shape[axis] for axis in mesh_axes("batch"))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global array per key from this process's rows (the process-local slice of the batch).

    Every process passes the same keys with the same per-process batch size; the global batch is the
    concatenation over processes in process order.
    """
    sharding = batch_sharding(mesh)
    split = batch_shards(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % split:
            raise ValueError(
                f"batch[{key!r}]: {global_rows} global rows do not divide by the {split} batch shards "
                f"(mesh axes {mesh_axes('batch')})"
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
