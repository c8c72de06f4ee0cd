"""What a compiled step computes and moves per device, read from its HLO text, and the roofline step
time that follows from a device's peak rates.

`read_hlo` parses `compiled.as_text()` (an SPMD-partitioned module: every shape is one device's) and
counts, per step and per device:

  - matmul FLOPs: 2 x (result elements) x (contracted size) for every `dot`, and
    2 x (result elements) x (kernel elements / output features) for every `convolution`, fusions
    included;
  - memory traffic: the bytes every top-level instruction (a fusion, a copy, a collective, ...)
    reads and writes, its operands plus its result, with the compiler's fusion decisions; parameters,
    constants, tuples and control flow move nothing themselves;
  - collectives: each all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute with
    its result bytes and its device groups.

A `conditional`'s branches count zero times (whether they run depends on the data: the LM head's
overflow chunks run only for a batch with more targets than slots), so the figures are those of a step
whose batches fit the static layout. An instruction inside a `while` body counts `known_trip_count` times (nested loops multiply); a loop
without a known trip count is an error, since its cost cannot be known. XLA's own
`compiled.cost_analysis()` counts a while body once, which is why the counts are taken here.

Bytes a collective moves per device and execution, over a group of n devices, by the ring
algorithm (what each device sends; it receives as much):

  - all-gather: (n - 1) / n x result bytes;
  - reduce-scatter: (n - 1) / n x operand bytes = (n - 1) x result bytes;
  - all-reduce: 2 (n - 1) / n x result bytes (a reduce-scatter, then an all-gather);
  - all-to-all: (n - 1) / n x result bytes;
  - collective-permute: result bytes (every device sends its buffer once).

`roofline` bounds the step time below by its slowest resource, each assumed to run at its peak and
all three perfectly overlapped: step >= max(FLOPs / peak FLOP/s, memory traffic / HBM bandwidth,
collective time), the collective time being the sum over collectives of bytes / link bandwidth, with
the slower link (e.g. InfiniBand between hosts) for a group that spans hosts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

import numpy as np

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
    "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
# Instructions that move no data themselves (control flow is counted in its bodies).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "add-dependency", "opt-barrier"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result type as printed: f32[8,4]{1,0}, or a tuple (f32[2], s32[])
    opcode: str
    operands: tuple[str, ...]
    attributes: str  # everything after the operand list


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled step, as one device sees it."""

    kind: str  # one of COLLECTIVE_KINDS
    name: str
    result_bytes: float
    groups: tuple[tuple[int, ...], ...]  # device ids that exchange data; pairs (source, target) for a permute
    executions: int  # per step: the trip counts of the loops around it

    @property
    def group_size(self) -> int:
        return max((len(g) for g in self.groups), default=1)

    @property
    def bytes_moved(self) -> float:
        """Bytes one device sends per execution, by the ring algorithm (the module docstring)."""
        n = self.group_size
        if self.kind == "collective-permute":
            return self.result_bytes
        if n <= 1:
            return 0.0
        factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                  "all-to-all": (n - 1) / n}[self.kind]
        return factor * self.result_bytes

    def spans_hosts(self, devices_per_host: int | None) -> bool:
        """Whether some group holds devices of two hosts (device id // devices_per_host)."""
        if not devices_per_host:
            return False
        return any(len({d // devices_per_host for d in g}) > 1 for g in self.groups)


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """Per device, per step, from the compiled HLO."""

    matmul_flops: float
    memory_bytes: float
    collectives: tuple[Collective, ...]
    loop_trip_counts: tuple[int, ...]  # of every while loop, outermost first as found

    def collective_bytes(self) -> dict[str, float]:
        """Bytes each collective kind moves per device per step (`Collective.bytes_moved` x executions)."""
        totals = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
        for c in self.collectives:
            totals[c.kind] += c.bytes_moved * c.executions
        return totals


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO type: an array `f32[8,4]{1,0}` or a tuple of them (summed); `f32[]` is a scalar."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _ELEMENT_BYTES:
            raise ValueError(f"HLO element type {dtype!r} in {shape!r} has no known size; expected one of "
                             f"{sorted(_ELEMENT_BYTES)}")
        total += _ELEMENT_BYTES[dtype] * math.prod(_dims(dims))
    return total


def _dims(dims: str) -> list[int]:
    # Bounded dynamic dimensions print as `<=8`: count the bound.
    return [int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip()]


def _array_dims(shape: str) -> list[int]:
    arrays = _ARRAY.findall(shape)
    if len(arrays) != 1:
        raise ValueError(f"expected one array type, found {shape!r}")
    return _dims(arrays[0][1])


def _closing(text: str, start: int, opening: str, closing: str) -> int:
    """Index of the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening}{closing} in HLO line: {text[:200]!r}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def parse_instruction(line: str) -> Instruction | None:
    """One HLO instruction line (`%name = type opcode(operands), attributes`), or None for other lines."""
    match = _INSTRUCTION.match(_COMMENT.sub("", line))
    if not match:
        return None
    name, rest = match.groups()
    if rest.startswith("("):
        end = _closing(rest, 0, "(", ")")
        shape, rest = rest[: end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode_match = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if not opcode_match:
        raise ValueError(f"HLO instruction %{name}: expected `opcode(` after its type {shape!r}, found {rest[:80]!r}")
    opcode = opcode_match.group(1)
    start = opcode_match.end() - 1
    end = _closing(rest, start, "(", ")")
    operands = tuple(token.split()[-1].lstrip("%") for token in _split_top_level(rest[start + 1:end])
                     if token.strip())
    return Instruction(name, shape, opcode, operands, rest[end + 1:])


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: its instructions}, the entry computation's name) of an HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is not None:
            instruction = parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation: expected the text of compiled.as_text()")
    return computations, entry


def _trip_count(instruction: Instruction) -> int:
    match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?', instruction.attributes)
    if not match:
        raise ValueError(f"while loop %{instruction.name} has no known_trip_count in its backend_config: its "
                         "cost per step cannot be counted")
    return int(match.group(1))


def _called(instruction: Instruction) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls: role body, condition, fused, reducer or called."""
    found = []
    for key, names in re.findall(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([^\s,}]+)",
                                 instruction.attributes):
        role = {"calls": "fused" if instruction.opcode == "fusion" else "called",
                "true_computation": "branch", "false_computation": "branch"}.get(key, key)
        if key == "to_apply":
            role = "called" if instruction.opcode == "call" else "reducer"
        found.append((role, names))
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", instruction.attributes):
        found += [("branch", b.strip().lstrip("%")) for b in branches.split(",") if b.strip()]
    return found


def execution_counts(computations: Mapping[str, list[Instruction]], entry: str
                     ) -> tuple[dict[str, int], set[str], list[int]]:
    """How often each computation runs per step; the computations that run as steps of their own
    (entry, loop bodies and conditions, called computations; not fusion bodies or reducers); the trip
    counts of the loops that run."""
    callers: dict[str, list[tuple[str, int]]] = {}
    top_level = {entry}
    trips: dict[str, int] = {}
    for computation, instructions in computations.items():
        for instruction in instructions:
            trip = _trip_count(instruction) if instruction.opcode == "while" else 1
            if instruction.opcode == "while":
                trips[instruction.name] = trip
            for role, callee in _called(instruction):
                if callee not in computations:
                    raise ValueError(f"%{instruction.name} calls %{callee}, which the module does not define")
                callers.setdefault(callee, []).append((computation, {"body": trip, "condition": trip + 1, "branch": 0}.get(role, 1)))
                if role in ("body", "condition", "called", "branch"):
                    top_level.add(callee)
    counts = {entry: 1}

    def count(name, seen=()):
        if name not in counts:
            if name in seen:
                raise ValueError(f"HLO call graph has a cycle through %{name}")
            counts[name] = sum(count(caller, (*seen, name)) * factor for caller, factor in callers.get(name, []))
        return counts[name]

    for name in computations:
        count(name)
    running = [trip for computation in computations if counts[computation]
               for trip in (trips.get(i.name) for i in computations[computation]) if trip is not None]
    return counts, {c for c in top_level if counts[c]}, running


def _braced(attributes: str, key: str) -> str | None:
    """The text inside the balanced braces after `key=` (`replica_groups={{0,1},{2,3}}` -> `{0,1},{2,3}`)."""
    at = attributes.find(f"{key}={{")
    if at < 0:
        return None
    start = at + len(key) + 1
    return attributes[start + 1:_closing(attributes, start, "{", "}")]


def _id_lists(braced: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in g.split(",") if x.strip()) for g in re.findall(r"\{([\d,\s]*)\}", braced))


def iota_ids(spec: str) -> np.ndarray:
    """Device ids of an iota list `[d0,d1,...]` or `[d0,d1,...]T(p0,p1,...)`: arange, reshaped, transposed."""
    match = re.fullmatch(r"\s*\[([\d,\s]*)\](?:T\(([\d,\s]*)\))?\s*", spec)
    if not match:
        raise ValueError(f"expected an iota device list like [2,4]T(1,0), found {spec!r}")
    dims = _dims(match.group(1))
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(2):
        ids = ids.transpose(_dims(match.group(2)))
    return ids.reshape(-1)


def replica_groups(attributes: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """The device groups of a collective's attributes, in any of XLA's three printed forms:

      - explicit: `replica_groups={{0,1},{2,3}}` (`{}`: one group of all devices);
      - iota: `replica_groups=[2,4]<=[8]` or `[4,2]<=[2,4]T(1,0)` (groups x size, then an iota list);
      - mesh axes: `replica_groups=mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}`: the device ids
        laid out on the named mesh, one group per position of the axes not listed in braces;

    or a collective-permute's `source_target_pairs={{0,1},{1,2}}`.
    """
    pairs = _braced(attributes, "source_target_pairs")
    if pairs is not None:
        return _id_lists(pairs)
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", attributes)
    if mesh:
        axes = [(a.strip().strip("'"), int(s)) for a, s in (p.split("=") for p in mesh.group(1).split(","))]
        names = [n for n, _ in axes]
        sizes = [s for _, s in axes]
        if mesh.group(2):
            ids = (iota_ids(mesh.group(2)) if mesh.group(2).lstrip().startswith("[")
                   else np.array(_dims(mesh.group(2).strip("{}() "))))
        else:
            ids = np.arange(math.prod(sizes))
        if ids.size != math.prod(sizes):
            raise ValueError(f"mesh {dict(axes)} has {math.prod(sizes)} positions, device_ids list {ids.size}")
        grouped = [a.strip().strip("'") for a in mesh.group(3).split(",") if a.strip()]
        unknown = [a for a in grouped if a not in names]
        if unknown:
            raise ValueError(f"replica groups over axes {unknown} of a mesh with axes {names} ({attributes[:200]!r})")
        layout = ids.reshape(sizes)
        kept = [i for i, n in enumerate(names) if n not in grouped]
        order = kept + [names.index(a) for a in grouped]
        size = math.prod(sizes[names.index(a)] for a in grouped)
        return tuple(tuple(int(d) for d in g) for g in layout.transpose(order).reshape(-1, size))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]*\](?:T\([\d,]*\))?)", attributes)
    if iota:
        groups, size = int(iota.group(1)), int(iota.group(2))
        return tuple(tuple(int(d) for d in g) for g in iota_ids(iota.group(3)).reshape(groups, size))
    explicit = _braced(attributes, "replica_groups")
    if explicit is not None:
        return tuple(g for g in _id_lists(explicit) if g) or (tuple(range(num_devices)),)
    raise ValueError(f"collective without replica groups XLA's text forms describe: {attributes[:200]!r}")


def _collective_kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVE_KINDS else None


def _collective_result_bytes(instruction: Instruction, kind: str) -> float:
    if not instruction.opcode.endswith("-start") or kind == "all-reduce":
        return shape_bytes(instruction.shape)
    # Async starts return (operands, results[, context]): count the results.
    elements = _split_top_level(instruction.shape.strip()[1:-1])
    if kind == "collective-permute":
        return shape_bytes(elements[1])
    return shape_bytes(",".join(elements[len(elements) // 2:]))


def read_hlo(text: str, num_devices: int) -> StepCounts:
    """Per-device matmul FLOPs, memory traffic and collectives of one step of a compiled module's text."""
    computations, entry = parse_module(text)
    counts, top_level, trips = execution_counts(computations, entry)
    by_name = {i.name: i for instructions in computations.values() for i in instructions}
    shapes = {name: i.shape for name, i in by_name.items()}
    users: dict[str, dict[str, list[Instruction]]] = {}
    for computation, instructions in computations.items():
        uses = users.setdefault(computation, {})
        for i in instructions:
            for operand in i.operands:
                uses.setdefault(operand, []).append(i)
    flops = traffic = 0.0
    collectives = []
    for computation, instructions in computations.items():
        times = counts.get(computation, 0)
        if not times:
            continue
        for instruction in instructions:
            if instruction.opcode == "dot":
                flops += times * _dot_flops(instruction, shapes)
            elif instruction.opcode == "convolution":
                flops += times * _convolution_flops(instruction, shapes)
            if computation in top_level and instruction.opcode not in _NO_TRAFFIC and not \
                    instruction.opcode.endswith("-done"):
                traffic += times * (shape_bytes(instruction.shape)
                                    + sum(shape_bytes(shapes[o]) for o in instruction.operands if o in shapes))
            kind = _collective_kind(instruction.opcode)
            if kind is None:
                continue
            groups = replica_groups(instruction.attributes, num_devices)
            if kind == "all-reduce" and not instruction.opcode.endswith("-start"):
                collectives += _split_scattered(instruction, groups, times, users[computation], by_name)
            else:
                collectives.append(Collective(kind, instruction.name, _collective_result_bytes(instruction, kind),
                                              groups, times))
    return StepCounts(flops, traffic, tuple(collectives), tuple(trips))


def _elements(shape: str) -> int:
    return sum(math.prod(_dims(dims)) for _, dims in _ARRAY.findall(shape))


def _takes_partition_id(instruction: Instruction, by_name: Mapping[str, Instruction], depth: int = 2) -> bool:
    """Whether an operand is the device's partition id, or a scalar computed from it."""
    for operand in instruction.operands:
        source = by_name.get(operand)
        if source is None:
            continue
        if source.opcode == "partition-id":
            return True
        if depth and _elements(source.shape) == 1 and _takes_partition_id(source, by_name, depth - 1):
            return True
    return False


def _only_its_share(value: Instruction, n: int, users, by_name, depth: int = 4) -> bool:
    """Whether every use of `value` keeps only this device's 1/n of it: a slice at the partition id,
    possibly after elementwise steps (converts, copies) of the whole array."""
    uses = users.get(value.name, [])
    if not uses:
        return False
    whole = _elements(value.shape)
    for use in uses:
        kept = _elements(use.shape)
        if kept * n == whole and _takes_partition_id(use, by_name):
            continue
        elementwise = kept == whole and len(use.operands) == 1 and use.opcode in ("fusion", "convert", "copy", "bitcast")
        if not (depth and elementwise and _only_its_share(use, n, users, by_name, depth - 1)):
            return False
    return True


def _split_scattered(instruction: Instruction, groups, times: int, users, by_name) -> list[Collective]:
    """An all-reduce as collectives: the results of which each device keeps only its 1/n share (a
    dynamic-slice at its partition id) count as a reduce-scatter, the rest as an all-reduce.

    XLA's GPU and TPU pipelines rewrite that pattern into a reduce-scatter (ReduceScatterCreator);
    XLA:CPU keeps the all-reduce, which would double the bytes FSDP's gradient reduction moves.
    """
    n = max((len(g) for g in groups), default=1)
    if instruction.shape.startswith("("):
        parts = [u for u in users.get(instruction.name, []) if u.opcode == "get-tuple-element"]
        elements = _split_top_level(instruction.shape.strip()[1:-1])
        covered = len({re.search(r"index=(\d+)", u.attributes).group(1) for u in parts}) == len(elements)
        values = parts if covered and len(parts) == len(elements) else None
    else:
        values = [instruction]
    scattered = kept = 0.0
    if values is None:
        kept = shape_bytes(instruction.shape)
    else:
        for value in values:
            if n > 1 and _only_its_share(value, n, users, by_name):
                scattered += shape_bytes(value.shape)
            else:
                kept += shape_bytes(value.shape)
    found = []
    if kept or not scattered:
        found.append(Collective("all-reduce", instruction.name, kept, groups, times))
    if scattered:
        found.append(Collective("reduce-scatter", instruction.name, scattered / n, groups, times))
    return found


def _dot_flops(instruction: Instruction, shapes: Mapping[str, str]) -> float:
    lhs = _array_dims(shapes[instruction.operands[0]])
    match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    contracted = math.prod(lhs[int(d)] for d in match.group(1).split(",") if d) if match else 1
    return 2.0 * math.prod(_array_dims(instruction.shape)) * contracted


def _convolution_flops(instruction: Instruction, shapes: Mapping[str, str]) -> float:
    kernel = _array_dims(shapes[instruction.operands[1]])
    labels = re.search(r"dim_labels=[^_]+_([^-]+)->", instruction.attributes)
    if not labels or "o" not in labels.group(1):
        raise ValueError(f"convolution %{instruction.name}: expected dim_labels=..._<kernel>->..., found "
                         f"{instruction.attributes[:120]!r}")
    out_features = kernel[labels.group(1).index("o")]
    return 2.0 * math.prod(_array_dims(instruction.shape)) * math.prod(kernel) / out_features


# --- the roofline --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak rates of one device (vendor figures), in FLOP/s and bytes/s."""

    peak_flops: float
    hbm_bandwidth: float
    link_bandwidth: float  # to the devices of its host or slice, bytes sent per second
    host_link_bandwidth: float | None = None  # to other hosts, bytes sent per second
    devices_per_host: int | None = None

    @classmethod
    def from_config(cls, hardware) -> Device:
        """From a plan's `hardware` section (`configs/plans.py`)."""
        get = hardware.get if hasattr(hardware, "get") else lambda k, d=None: getattr(hardware, k, d)
        missing = [k for k in ("peak_flops", "hbm_bandwidth", "link_bandwidth") if get(k) is None]
        if missing:
            raise ValueError(f"hardware section {get('name', '?')!r} lacks {missing} (configs/plans.py HARDWARE)")
        return cls(float(get("peak_flops")), float(get("hbm_bandwidth")), float(get("link_bandwidth")),
                   None if get("host_link_bandwidth") is None else float(get("host_link_bandwidth")),
                   get("devices_per_host"))


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Lower bounds of one step's time per device, in seconds."""

    compute_s: float
    memory_s: float
    network_s: float
    network_host_s: float  # the part of network_s spent on groups that span hosts

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.network_s)

    @property
    def bound(self) -> str:
        """The term that sets the step time: compute, memory or network."""
        terms = {"compute": self.compute_s, "memory": self.memory_s, "network": self.network_s}
        return max(terms, key=terms.get)


def network_seconds(collectives: Iterable[Collective], device: Device) -> tuple[float, float]:
    """(all collectives, those over groups spanning hosts): bytes moved / the bandwidth of the links used."""
    total = across = 0.0
    for c in collectives:
        crossing = c.spans_hosts(device.devices_per_host)
        bandwidth = device.host_link_bandwidth if crossing and device.host_link_bandwidth else device.link_bandwidth
        seconds = c.bytes_moved * c.executions / bandwidth
        total += seconds
        across += seconds if crossing else 0.0
    return total, across


def roofline(flops: float, memory_bytes: float, collectives: Iterable[Collective], device: Device) -> Roofline:
    """The step's time bounds per device from its FLOPs, HBM traffic and collectives (per device)."""
    network, across = network_seconds(collectives, device)
    return Roofline(flops / device.peak_flops, memory_bytes / device.hbm_bandwidth, network, across)


def mfu(model_flops_per_device: float, step_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: model FLOPs per device / (step time x peak FLOP/s)."""
    return model_flops_per_device / (step_s * peak_flops)


def cost_analysis(compiled) -> dict[str, float]:
    """XLA's `compiled.cost_analysis()` totals (flops, bytes accessed, ...): while bodies counted once."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per module
        analysis = analysis[0] if analysis else {}
    return {k: float(v) for k, v in (analysis or {}).items() if "{" not in k}
