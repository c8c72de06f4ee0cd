"""The port-table mechanism: torch key patterns <-> Flax NNX parameter paths, with their transforms.

A `PortTable` is a list of `Rule`s, each a pair of patterns with `{name}` placeholders that match
integers (layer indices), plus the transform that turns the torch tensor into the JAX one and back.
Tables are written per component relative to the component (`checkpoint/*_port.py`) and composed
with prefixes, so that one rule serves a component checkpoint and the full model alike.

Import is strict and streaming: tensors are read one at a time; every source tensor is either
consumed by a rule or matched by the table's `unused` patterns; every parameter of the model must be
filled; shapes are checked before a tensor is read. All problems are collected and raised together
in one `CheckpointMismatchError` that names each key, file and shape. Every floating tensor read must
be finite in the file and in the dtype it is imported in (`NonFiniteWeightError` otherwise): a NaN
weight would otherwise surface steps later as a NaN loss, far from its cause.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from med2e3_jax.checkpoint.errors import CheckpointMismatchError, NonFiniteWeightError

log = logging.getLogger(__name__)

Path = tuple  # an NNX state path, e.g. ("layers", 0, "self_attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a torch tensor becomes a JAX parameter (`to_jax`) and back (`to_torch`); both exact."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]

    def jax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `to_jax` produces, computed on a zero-stride view (no memory)."""
        return tuple(self.to_jax(np.broadcast_to(np.zeros((), np.float32), torch_shape)).shape)


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear stores (out, in); nnx.Linear's kernel is (in, out).
LINEAR = Transform("transpose", lambda x: np.transpose(x), lambda x: np.transpose(x))
# torch Conv2d stores (out, in, kh, kw); nnx.Conv's kernel is (kh, kw, in, out).
CONV2D = Transform(
    "OIHW->HWIO", lambda x: np.transpose(x, (2, 3, 1, 0)), lambda x: np.transpose(x, (3, 2, 0, 1))
)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern:
    """`{name}` matches an integer; in `unused` patterns, `*` matches anything."""
    parts = _PLACEHOLDER.split(pattern)
    regex = "".join(
        re.escape(p).replace(r"\*", ".*") if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts)
    )
    return re.compile(regex + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """`source` is a torch key pattern, `target` an NNX path pattern ('.'-joined); `{i}` matches an int."""

    source: str
    target: str
    transform: Transform = IDENTITY

    def __post_init__(self):
        if set(_PLACEHOLDER.findall(self.source)) != set(_PLACEHOLDER.findall(self.target)):
            raise ValueError(f"rule {self.source!r} -> {self.target!r}: placeholders differ")

    def prefixed(self, source_prefix: str, target_prefix: str) -> Rule:
        return Rule(source_prefix + self.source, target_prefix + self.target, self.transform)


def linear(source: str, target: str | None = None, *, bias: bool = True) -> tuple[Rule, ...]:
    """torch `nn.Linear` -> `nnx.Linear` (kernel transposed)."""
    target = source if target is None else target
    rules = (Rule(f"{source}.weight", f"{target}.kernel", LINEAR),)
    return rules + ((Rule(f"{source}.bias", f"{target}.bias"),) if bias else ())


def norm(source: str, target: str | None = None, *, bias: bool = True) -> tuple[Rule, ...]:
    """torch `nn.LayerNorm` / RMSNorm -> `nnx.LayerNorm` / `nnx.RMSNorm` (`weight` is `scale`)."""
    target = source if target is None else target
    rules = (Rule(f"{source}.weight", f"{target}.scale"),)
    return rules + ((Rule(f"{source}.bias", f"{target}.bias"),) if bias else ())


def embedding(source: str, target: str | None = None) -> Rule:
    """torch `nn.Embedding` -> `nnx.Embed`."""
    return Rule(f"{source}.weight", f"{source if target is None else target}.embedding")


@dataclasses.dataclass(frozen=True)
class PortTable:
    """Rules plus the source-key patterns that are deliberately not imported (and why)."""

    rules: tuple[Rule, ...]
    unused: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_forward", [(_compile(r.source), r) for r in self.rules])
        object.__setattr__(self, "_backward", [(_compile(r.target), r) for r in self.rules])
        object.__setattr__(self, "_unused", [_compile(u) for u in self.unused])

    def prefixed(self, source_prefix: str, target_prefix: str) -> PortTable:
        return PortTable(
            tuple(r.prefixed(source_prefix, target_prefix) for r in self.rules),
            tuple(source_prefix + u for u in self.unused),
        )

    def __add__(self, other: PortTable) -> PortTable:
        return PortTable(self.rules + other.rules, self.unused + other.unused)

    def target_for(self, source_key: str) -> tuple[str, Transform] | None:
        for regex, rule in self._forward:
            match = regex.match(source_key)
            if match:
                return rule.target.format(**match.groupdict()), rule.transform
        return None

    def source_for(self, target: str) -> tuple[str, Transform] | None:
        for regex, rule in self._backward:
            match = regex.match(target)
            if match:
                return rule.source.format(**match.groupdict()), rule.transform
        return None

    def is_unused(self, source_key: str) -> bool:
        return any(regex.match(source_key) for regex in self._unused)


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


class TensorSource:
    """What the importer reads from. Implementations in `checkpoint/sources.py`.

    `keys()` lists the torch keys; `shape(key)` and `dtype(key)` come from headers without reading
    data; `read(key)` returns one tensor as a numpy array; `where(key)` names the file holding it.
    """

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def where(self, key: str) -> str:
        raise NotImplementedError


class DictSource(TensorSource):
    """A source over an in-memory mapping of key -> array (e.g. a torch state dict turned to numpy)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], name: str = "<state dict>"):
        self._tensors = tensors
        self._name = name

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return np.asarray(self._tensors[key]).dtype

    def read(self, key):
        return np.asarray(self._tensors[key])

    def where(self, key):
        return self._name


@dataclasses.dataclass
class ImportReport:
    """What an import did: mapped tensors (source key -> target path) and deliberately unused keys."""

    mapped: dict[str, str]
    unused: list[str]
    num_parameters: int
    num_bytes: int

    def summary(self) -> str:
        return (
            f"mapped {len(self.mapped)} tensors ({self.num_parameters:,} parameters, "
            f"{self.num_bytes / 2**20:.1f} MiB); {len(self.unused)} deliberately unused"
        )


def _format_problems(title: str, lines: list[str], limit: int = 25) -> str:
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return f"{title} ({len(lines)}):\n" + "\n".join("  " + line for line in shown)


def import_tensors(
    expected: Mapping[Path, tuple[tuple[int, ...], np.dtype]],
    source: TensorSource,
    table: PortTable,
    *,
    progress: bool = False,
    description: str = "importing",
    sink: Callable[[Path, np.ndarray], None] | None = None,
) -> tuple[dict[Path, np.ndarray], ImportReport]:
    """Reads `source` through `table` into arrays for every path in `expected`.

    Args:
      expected: parameter path -> (shape, dtype) of the model being filled (see `expected_params`).
      source: the torch tensors.
      table: the port table, with prefixes matching the source's key namespace.
      sink: if given, called with (path, array) as each tensor is read, instead of collecting the arrays,
        so that a caller can place each one and drop it before the next is read (bounded memory).

    Returns:
      (path -> numpy array in the expected dtype, or {} with `sink`; report). Raises
      CheckpointMismatchError naming every unexpected, missing and mis-shaped tensor, before reading any.
    """
    by_name = {path_str(p): p for p in expected}
    plan: list[tuple[str, Path, Transform]] = []
    unexpected, wrong_shape, unused = [], [], []
    claimed: dict[str, str] = {}
    for key in source.keys():
        found = table.target_for(key)
        if found is None or found[0] not in by_name:
            if table.is_unused(key):
                unused.append(key)
                continue
            reason = "no rule maps it" if found is None else f"maps to {found[0]!r}, which this model does not have"
            unexpected.append(f"{key} {list(source.shape(key))} in {source.where(key)}: {reason}")
            continue
        target, transform = found
        if target in claimed:
            unexpected.append(f"{key}: maps to {target!r}, already filled from {claimed[target]!r}")
            continue
        claimed[target] = key
        want = tuple(expected[by_name[target]][0])
        got = transform.jax_shape(source.shape(key))
        if got != want:
            wrong_shape.append(
                f"{key} in {source.where(key)}: shape {list(source.shape(key))} (as {transform.name}: "
                f"{list(got)}) but {target} expects {list(want)}"
            )
            continue
        plan.append((key, by_name[target], transform))
    missing = [
        f"{name} {list(expected[path][0])} (torch key {_torch_key_hint(table, name)})"
        for name, path in by_name.items()
        if name not in claimed
    ]
    problems = [
        _format_problems(title, lines)
        for title, lines in (
            ("unexpected tensors", unexpected),
            ("missing tensors", missing),
            ("tensors with the wrong shape", wrong_shape),
        )
        if lines
    ]
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the model:\n" + "\n".join(problems))

    arrays: dict[Path, np.ndarray] = {}
    num_parameters = num_bytes = 0
    for key, path, transform in tqdm(plan, desc=description, disable=not progress, unit="tensor"):
        dtype = expected[path][1]
        raw = transform.to_jax(source.read(key))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing cast is reported below
            value = np.ascontiguousarray(raw, dtype=dtype)
        check_finite(key, source.where(key), raw, value)
        del raw
        num_parameters += value.size
        num_bytes += value.nbytes
        if sink is None:
            arrays[path] = value
        else:
            sink(path, value)
        del value
    if unused:
        log.debug("deliberately unused tensors: %s", ", ".join(unused))
    report = ImportReport({key: path_str(path) for key, path, _ in plan}, unused, num_parameters, num_bytes)
    return arrays, report


# Elements checked at a time: the boolean mask of a block, not of the largest tensor, is what the check adds.
_FINITE_BLOCK = 1 << 22


def _is_floating(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def check_finite(key: str, where: str, raw: np.ndarray, value: np.ndarray) -> None:
    """Raises NonFiniteWeightError if `value` (tensor `key` of file `where`, cast from `raw`, which has
    the same shape) holds a NaN or infinity: naming the first, and whether it was in the file or came
    from a value beyond the range of `value`'s dtype (float64 weights cast to float32, say)."""
    if not _is_floating(value.dtype):
        return
    flat = value.reshape(-1)
    first, count = None, 0
    for start in range(0, flat.size, _FINITE_BLOCK):
        finite = np.isfinite(flat[start:start + _FINITE_BLOCK])
        if first is None:
            if finite.all():
                continue
            first = start + int(np.argmin(finite))
        count += finite.size - int(np.count_nonzero(finite))
    if first is None:
        return
    index = tuple(int(i) for i in np.unravel_index(first, value.shape))
    original = np.asarray(raw)[index]
    if not _is_floating(original.dtype) or np.isfinite(original):
        what = f"{float(original):.6g} in the file, beyond {value.dtype}'s range (±{float(ml_dtypes.finfo(value.dtype).max):.4g})"
    else:
        what = f"{float(original)} in the file"
    raise NonFiniteWeightError(
        f"{key} in {where}: {count:,} of {flat.size:,} values are not finite as {value.dtype}, the first at index "
        f"{index}: {what}; every imported weight must be a finite {value.dtype}", path=where)


def _torch_key_hint(table: PortTable, target: str) -> str:
    found = table.source_for(target)
    return repr(found[0]) if found else "unknown"


def export_tensors(params: Mapping[Path, np.ndarray], table: PortTable) -> dict[str, np.ndarray]:
    """The inverse of `import_tensors`: NNX parameters -> torch-layout tensors under torch keys."""
    tensors = {}
    for path, value in params.items():
        found = table.source_for(path_str(path))
        if found is None:
            raise CheckpointMismatchError(f"no port rule exports parameter {path_str(path)}")
        key, transform = found
        tensors[key] = np.ascontiguousarray(transform.to_torch(np.asarray(value)))
    return tensors
