"""Reading the authors' PyTorch checkpoints one tensor at a time, whatever their layout on disk.

Every reader is a `TensorSource` (see `port.py`): keys, shapes and dtypes come from headers (safetensors)
or from a memory-mapped pickle (`pytorch_model.bin`), and `read` materialises one tensor, so host memory
stays near the size of the model being filled rather than the checkpoint. File pages a read touches
through a memory map count as the process's resident memory for as long as they stay mapped, so each
reader gives them back once the tensor is copied out (a fresh safetensors mapping per read; `madvise` on
the `.bin` mapping). `open_checkpoint` recognises the layouts the authors' weights come in
(docs/checkpoints.md, Formats) and presents each as one source in the module-path key namespace.

Whatever a file does wrong comes back as a `CheckpointError` naming it (`checkpoint/errors.py`): a
truncated file, a pickle that would run code (refused: `.bin` files are only ever unpickled with
`weights_only=True`), a header or index beyond `CheckpointLimits`, a shard outside its index's folder.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from med2e3_jax.checkpoint.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from med2e3_jax.checkpoint.limits import DEFAULT_LIMITS, CheckpointLimits, read_json
from med2e3_jax.checkpoint.port import TensorSource

log = logging.getLogger(__name__)

# The authors' release checkpoint: one folder per sub-module, each saved with its module path stripped.
RELEASE_PREFIXES = {
    "llm": "llm.",
    "vision2d_model": "vision2d_model.vision2d_encoder.",
    "vision2d_connector": "vision2d_connector.",
    "vision3d_model": "vision3d_model.vision3d_encoder.",
    "vision3d_connector": "vision3d_connector.",
}

# What a directory may hold, in order of preference (safetensors needs no torch and no unpickling).
HF_CHECKPOINT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

_SAFETENSORS_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def require_torch():
    """torch, imported on demand: only `.bin` files need it."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading or writing pytorch_model.bin files needs torch: pip install med2e3-jax[torch]"
        ) from error
    return torch


def _ml_dtypes_of_torch(torch) -> dict:
    """torch dtypes numpy lacks -> (ml_dtypes dtype, torch integer dtype of the same width)."""
    return {
        torch.bfloat16: (np.dtype(ml_dtypes.bfloat16), torch.int16),
        torch.float8_e4m3fn: (np.dtype(ml_dtypes.float8_e4m3fn), torch.uint8),
        torch.float8_e5m2: (np.dtype(ml_dtypes.float8_e5m2), torch.uint8),
    }


def torch_dtype_to_numpy(dtype) -> np.dtype:
    torch = require_torch()
    special = _ml_dtypes_of_torch(torch).get(dtype)
    return special[0] if special else torch.empty(0, dtype=dtype).numpy().dtype


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array (a copy), bit-exact, bfloat16 and float8 included."""
    torch = require_torch()
    tensor = tensor.detach().cpu()
    special = _ml_dtypes_of_torch(torch).get(tensor.dtype)
    if special:
        np_dtype, int_dtype = special
        return tensor.view(int_dtype).numpy().view(np_dtype).copy()
    return tensor.numpy().copy()


def numpy_to_torch(array: np.ndarray):
    """The inverse of `torch_to_numpy`: a torch tensor with the same bits (sharing memory if possible)."""
    torch = require_torch()
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only memory
        array = array.copy()
    for torch_dtype, (np_dtype, int_dtype) in _ml_dtypes_of_torch(torch).items():
        if array.dtype == np_dtype:
            view = array.view(torch.empty(0, dtype=int_dtype).numpy().dtype)
            return torch.from_numpy(view).view(torch_dtype)
    return torch.from_numpy(array)


def _madvise():
    """libc's `madvise`, where dropping pages of a file mapping (MADV_DONTNEED) does release them."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def release_mapped_pages(address: int, nbytes: int) -> bool:
    """Unmaps from the process's resident set the pages of a read-only file mapping that cover
    [address, address + nbytes); they are read from the file again if touched. Only for memory that
    maps a file and was never written: on anonymous memory this would discard data.

    Returns whether the pages were released (False where the platform cannot).
    """
    if _MADVISE is None or nbytes <= 0:
        return False
    start = address - address % mmap.PAGESIZE
    if _MADVISE(start, address + nbytes - start, mmap.MADV_DONTNEED) != 0:
        log.debug("madvise(MADV_DONTNEED) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _lookup(table: dict, key: str, name: str):
    try:
        return table[key]
    except KeyError:
        raise KeyError(f"tensor {key!r} is not in {name}") from None


def _safetensors_header_bytes(path: str) -> int:
    """The header length a `.safetensors` file declares in its first 8 bytes (little-endian u64)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{path}: {len(prefix)} bytes, too short for a safetensors file (its header "
                                     "length alone takes 8)", path=path)
    return struct.unpack("<Q", prefix)[0]


def _safetensors_error(path: str, error: Exception, doing: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {doing}: {error} (expected a complete safetensors file: an 8-byte "
                                  "header length, the JSON header, then every tensor's bytes)", path=path)


class SafetensorsSource(TensorSource):
    """One `.safetensors` file, memory-mapped; shapes and dtypes from its header, whose declared length
    is checked against `limits` before it is parsed."""

    def __init__(self, path: str | os.PathLike, limits: CheckpointLimits = DEFAULT_LIMITS):
        self.name = os.fspath(path)
        limits.check_header(self.name, _safetensors_header_bytes(self.name), "safetensors header")
        try:
            header = safe_open(self.name, framework="numpy")
            specs = {key: (tuple(header.get_slice(key).get_shape()), header.get_slice(key).get_dtype())
                     for key in header.keys()}
        except SafetensorError as error:
            raise _safetensors_error(self.name, error, "cannot read the header") from None
        self._specs = {}
        for key, (shape, dtype) in specs.items():
            if dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.name}: tensor {key!r} has dtype {dtype}, which numpy cannot hold; "
                                      f"expected one of {', '.join(_SAFETENSORS_DTYPES)}", path=self.name)
            self._specs[key] = (shape, np.dtype(_SAFETENSORS_DTYPES[dtype]))

    def keys(self):
        return list(self._specs)

    def shape(self, key):
        return self._spec(key)[0]

    def dtype(self, key):
        return self._spec(key)[1]

    def read(self, key):
        self._spec(key)
        # A mapping per read, dropped with it: the pages it touched leave the resident set at once
        # instead of accumulating to the size of the file.
        try:
            return safe_open(self.name, framework="numpy").get_tensor(key)
        except (SafetensorError, OSError) as error:  # the file changed or shrank since it was opened
            raise _safetensors_error(self.name, error, f"cannot read tensor {key!r}") from None

    def where(self, key):
        return self.name

    def _spec(self, key):
        return _lookup(self._specs, key, self.name)


def _unpickling_refusal(path: str, error: pickle.UnpicklingError) -> CheckpointError:
    """torch's refusal, without its advice to retry with `weights_only=False` (which runs the pickle)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith(("Trying to load", "Unsupported", "WeightsUnpickler"))),
                  lines[-1] if lines else type(error).__name__).rstrip(".")
    if "global" in reason.lower():
        return UnsafeCheckpointError(
            f"{path}: refused: its pickle calls code, which a state dict of tensors never does ({reason}). Ask its "
            "publisher for a safetensors file, or re-save its tensors as safetensors where it is trusted", path=path)
    return CorruptCheckpointError(
        f"{path}: not a state dict that torch.save wrote: the weights-only unpickler cannot read it ({reason}); "
        "expected a torch.save file of tensors, or a safetensors file", path=path)


def _torch_load(torch, path: str, *, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_refusal(path, error) from None


class TorchBinSource(TensorSource):
    """One `pytorch_model.bin` (any `torch.save`d state dict), memory-mapped: only `read` touches data.

    Unpickled with `weights_only=True` only: a file whose pickle names anything else is refused."""

    def __init__(self, path: str | os.PathLike):
        torch = require_torch()
        self.name = os.fspath(path)
        self._mapped = True
        try:
            try:
                state = _torch_load(torch, self.name, mmap=True)
            except RuntimeError as error:
                if "zipfile" not in str(error):
                    raise
                # Files from torch < 1.6 (legacy, non-zip format) cannot be memory-mapped.
                log.warning("%s is in torch's legacy format; loading it whole", self.name)
                state = _torch_load(torch, self.name, mmap=False)
                self._mapped = False
        except CheckpointError:
            raise
        except Exception as error:  # torch's own: truncated zip (OSError), bad records (RuntimeError, KeyError)
            raise CorruptCheckpointError(
                f"{self.name}: not a readable torch checkpoint ({type(error).__name__}: {error}); expected a "
                "complete torch.save file (zip, or torch's legacy format)", path=self.name) from None
        # On a big-endian host torch byte-swaps the mapped data in place: those pages must stay.
        self._mapped &= sys.byteorder == "little"
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{self.name} holds a {type(state).__name__}, not a state dict "
                                         "(a dict of tensor name -> tensor)", path=self.name)
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if len(self._tensors) != len(state):
            others = sorted(k for k in state if k not in self._tensors)
            log.info("%s: ignoring non-tensor entries %s", self.name, others)

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(self._tensor(key).shape)

    def dtype(self, key):
        return torch_dtype_to_numpy(self._tensor(key).dtype)

    def read(self, key):
        tensor = self._tensor(key)
        value = torch_to_numpy(tensor)
        if self._mapped:
            # torch maps the whole file once and never writes to it: the storage's pages can go.
            storage = tensor.untyped_storage()
            release_mapped_pages(storage.data_ptr(), storage.nbytes())
        return value

    def where(self, key):
        return self.name

    def _tensor(self, key):
        return _lookup(self._tensors, key, self.name)


class ShardedSource(TensorSource):
    """An HF sharded checkpoint: an index JSON whose `weight_map` names each tensor's shard file.

    Shards are opened on first use; all are checked to exist up front so that a missing one fails before
    any import work, naming the file.
    """

    def __init__(self, index_path: str | os.PathLike, limits: CheckpointLimits = DEFAULT_LIMITS):
        self.name = os.fspath(index_path)
        self._limits = limits
        index = read_json(self.name, limits, "sharded checkpoint index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpointError(f"{self.name} has no 'weight_map' of tensor name -> shard file name; "
                                         "is it a sharded checkpoint index?", path=self.name)
        directory = os.path.dirname(os.path.abspath(self.name))
        self._shard_of = {}
        for key, shard in weight_map.items():
            # A shard is a file of the index's folder: a name reaching out of it reads another file.
            path = os.path.join(directory, shard)
            if os.path.isabs(shard) or os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory):
                raise UnsafeCheckpointError(f"{self.name}: tensor {key!r} is in shard {shard!r}, outside the index's "
                                            f"folder {directory}; shards must be files beside the index",
                                            path=self.name)
            self._shard_of[key] = path
        missing = sorted({p for p in self._shard_of.values() if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(f"{self.name} lists shards that do not exist: {', '.join(missing)}")
        self._shards: dict[str, TensorSource] = {}

    def keys(self):
        return list(self._shard_of)

    def shape(self, key):
        return self._shard(key).shape(key)

    def dtype(self, key):
        return self._shard(key).dtype(key)

    def read(self, key):
        return self._shard(key).read(key)

    def where(self, key):
        return _lookup(self._shard_of, key, self.name)

    def _shard(self, key) -> TensorSource:
        path = self.where(key)
        if path not in self._shards:
            self._shards[path] = type(self).open_shard(path, self._limits)
        return self._shards[path]

    @staticmethod
    def open_shard(path: str, limits: CheckpointLimits) -> TensorSource:
        raise NotImplementedError


class ShardedSafetensorsSource(ShardedSource):
    """`model.safetensors.index.json` and its `.safetensors` shards."""

    @staticmethod
    def open_shard(path, limits):
        return SafetensorsSource(path, limits)


class ShardedTorchBinSource(ShardedSource):
    """`pytorch_model.bin.index.json` and its `.bin` shards."""

    @staticmethod
    def open_shard(path, limits):
        return TorchBinSource(path)


class PrefixedSource(TensorSource):
    """`inner` with `strip_prefix` removed from, then `add_prefix` put in front of, every key.

    Every inner key must start with `strip_prefix`: a key that does not would otherwise vanish from the
    import without being accounted for.
    """

    def __init__(self, inner: TensorSource, add_prefix: str = "", strip_prefix: str = ""):
        self.inner = inner
        self.name = f"{getattr(inner, 'name', type(inner).__name__)} (keys as {add_prefix}*)"
        stray = [k for k in inner.keys() if not k.startswith(strip_prefix)]
        if stray:
            raise ValueError(
                f"cannot strip {strip_prefix!r}: {len(stray)} keys in {inner.where(stray[0])} lack it, "
                f"e.g. {stray[:5]}"
            )
        self._inner_key = {add_prefix + k[len(strip_prefix) :]: k for k in inner.keys()}

    def keys(self):
        return list(self._inner_key)

    def shape(self, key):
        return self.inner.shape(self._to_inner(key))

    def dtype(self, key):
        return self.inner.dtype(self._to_inner(key))

    def read(self, key):
        return self.inner.read(self._to_inner(key))

    def where(self, key):
        return self.inner.where(self._to_inner(key))

    def _to_inner(self, key):
        return _lookup(self._inner_key, key, self.name)


class MergedSource(TensorSource):
    """Several sources as one; a key held by two of them is an error naming both files."""

    def __init__(self, sources: Sequence[TensorSource]):
        self.sources = tuple(sources)
        self.name = " + ".join(getattr(s, "name", type(s).__name__) for s in self.sources)
        self._source_of: dict[str, TensorSource] = {}
        for source in self.sources:
            for key in source.keys():
                if key in self._source_of:
                    raise ValueError(
                        f"tensor {key!r} is in both {self._source_of[key].where(key)} and {source.where(key)}"
                    )
                self._source_of[key] = source

    def keys(self):
        return list(self._source_of)

    def shape(self, key):
        return self._source(key).shape(key)

    def dtype(self, key):
        return self._source(key).dtype(key)

    def read(self, key):
        return self._source(key).read(key)

    def where(self, key):
        return self._source(key).where(key)

    def _source(self, key):
        return _lookup(self._source_of, key, self.name)


def _open_file(path: str, limits: CheckpointLimits) -> TensorSource:
    if path.endswith(".safetensors.index.json"):
        return ShardedSafetensorsSource(path, limits)
    if path.endswith(".bin.index.json"):
        return ShardedTorchBinSource(path, limits)
    if path.endswith(".safetensors"):
        return SafetensorsSource(path, limits)
    if path.endswith((".bin", ".pt", ".pth")):
        return TorchBinSource(path)
    raise ValueError(
        f"{path}: not a checkpoint file (looked for *.safetensors, *.bin, *.pt, *.pth, "
        "*.safetensors.index.json, *.bin.index.json)"
    )


def _open_hf_directory(directory: str, limits: CheckpointLimits) -> TensorSource | None:
    for name in HF_CHECKPOINT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _open_file(path, limits)
    return None


def open_checkpoint(path: str | os.PathLike, limits: CheckpointLimits = DEFAULT_LIMITS) -> tuple[TensorSource, str]:
    """Opens a PyTorch checkpoint in any of the layouts the authors' weights come in.

    Returns:
      (source, layout), layout one of
      - "file": `path` is a `.safetensors` / `.bin` (/ `.pt`, `.pth`) file or a sharded index JSON;
      - "hf": `path` is a directory holding one of `HF_CHECKPOINT_FILES` (the first found wins);
      - "release": `path` holds some of the folders of `RELEASE_PREFIXES`, each an HF-style checkpoint
        with its module prefix stripped; the source puts the prefixes back (module-path keys).

    Headers and indexes are held to `limits` before they are parsed; problems in a file raise a
    `CheckpointError` naming it.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return _open_file(path, limits), "file"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}: it does not exist")
    hf = _open_hf_directory(path, limits)
    if hf is not None:
        return hf, "hf"
    folders = [f for f in RELEASE_PREFIXES if os.path.isdir(os.path.join(path, f))]
    if not folders:
        raise FileNotFoundError(
            f"no checkpoint found in {path}: looked for one of {', '.join(HF_CHECKPOINT_FILES)}, or the "
            f"release layout's sub-folders {', '.join(f + '/' for f in RELEASE_PREFIXES)}"
        )
    parts = []
    for folder in folders:
        inner = _open_hf_directory(os.path.join(path, folder), limits)
        if inner is None:
            raise FileNotFoundError(
                f"{os.path.join(path, folder)} holds none of {', '.join(HF_CHECKPOINT_FILES)}"
            )
        parts.append(PrefixedSource(inner, add_prefix=RELEASE_PREFIXES[folder]))
    return MergedSource(parts), "release"


def iter_tensors(source: TensorSource) -> Iterable[tuple[str, np.ndarray]]:
    """(key, array) for every tensor of `source`, read one at a time (e.g. to re-shard a checkpoint)."""
    for key in source.keys():
        yield key, source.read(key)
