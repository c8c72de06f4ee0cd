"""Writing torch-layout tensors (e.g. from `export_pytorch`) in the layouts `open_checkpoint` reads.

Every file is written under a temporary name and renamed into place, so an interrupted export never
leaves a truncated checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
from safetensors.numpy import save_file

from med2e3_jax.checkpoint.sources import RELEASE_PREFIXES, numpy_to_torch, require_torch

Tensors = Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]


def _items(tensors: Tensors) -> Iterable[tuple[str, np.ndarray]]:
    return tensors.items() if isinstance(tensors, Mapping) else tensors


@contextlib.contextmanager
def _atomic_path(path: str):
    """Yields a temporary path beside `path`, renamed onto `path` if the block succeeds."""
    temporary = f"{path}.partial-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_safetensors(
    tensors: Tensors, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """One `.safetensors` file. `metadata` (str -> str) joins `format: pt`, which transformers expects."""
    arrays = {key: np.ascontiguousarray(value) for key, value in _items(tensors)}
    with _atomic_path(os.fspath(path)) as temporary:
        save_file(arrays, temporary, metadata={"format": "pt", **(metadata or {})})


def write_sharded_safetensors(
    tensors: Tensors, directory: str | os.PathLike, max_shard_bytes: int
) -> list[str]:
    """HF-style shards `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`.

    `tensors` may be an iterator of (key, array), consumed once: at most one shard is held in memory. A
    tensor larger than `max_shard_bytes` gets a shard of its own. The index is written last, so a directory
    with an index is complete.

    Returns:
      the shard file names, in order.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    partials: list[str] = []
    shard_of: dict[str, int] = {}
    shard: dict[str, np.ndarray] = {}
    shard_bytes = total_bytes = 0

    def flush():
        partials.append(os.path.join(directory, f"model-{len(partials) + 1:05d}.safetensors.partial"))
        save_file(shard, partials[-1], metadata={"format": "pt"})
        shard.clear()

    try:
        for key, value in _items(tensors):
            if key in shard_of:
                raise ValueError(f"tensor {key!r} given twice")
            value = np.ascontiguousarray(value)
            if shard and shard_bytes + value.nbytes > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[key] = value
            shard_of[key] = len(partials)
            shard_bytes += value.nbytes
            total_bytes += value.nbytes
        if shard or not partials:
            flush()
        names = [f"model-{i + 1:05d}-of-{len(partials):05d}.safetensors" for i in range(len(partials))]
        for partial, name in zip(partials, names):
            os.replace(partial, os.path.join(directory, name))
    finally:
        for partial in partials:
            if os.path.exists(partial):
                os.remove(partial)
    weight_map = {key: names[i] for key, i in shard_of.items()}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    with _atomic_path(os.path.join(directory, "model.safetensors.index.json")) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


def write_release_layout(
    tensors: Mapping[str, np.ndarray], directory: str | os.PathLike, torch_dtype=None
) -> list[str]:
    """The authors' release layout: `<folder>/pytorch_model.bin` per entry of `RELEASE_PREFIXES`.

    Args:
      tensors: module-path keys (`llm.model.…`, `vision2d_model.vision2d_encoder.…`, …); a key under no
        release prefix is an error. Each folder's tensors are converted to torch one folder at a time.
      directory: created if needed; folders with no tensors are not written.
      torch_dtype: if given (a torch dtype or its name, e.g. "bfloat16"), floating tensors are cast to it.

    Returns:
      the folders written.
    """
    torch = require_torch()
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    keys_of = {folder: [] for folder in RELEASE_PREFIXES}
    stray = []
    for key in tensors:
        folder = next((f for f, prefix in RELEASE_PREFIXES.items() if key.startswith(prefix)), None)
        (keys_of[folder] if folder else stray).append(key)
    if stray:
        raise ValueError(
            f"{len(stray)} tensors are under none of the release prefixes {list(RELEASE_PREFIXES.values())}, "
            f"e.g. {stray[:10]}"
        )
    written = []
    for folder, keys in keys_of.items():
        if not keys:
            continue
        prefix = RELEASE_PREFIXES[folder]
        state = {}
        for key in keys:
            tensor = numpy_to_torch(tensors[key])
            if torch_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(torch_dtype)
            state[key[len(prefix) :]] = tensor
        os.makedirs(os.path.join(directory, folder), exist_ok=True)
        with _atomic_path(os.path.join(directory, folder, "pytorch_model.bin")) as temporary:
            torch.save(state, temporary)
        written.append(folder)
    return written
