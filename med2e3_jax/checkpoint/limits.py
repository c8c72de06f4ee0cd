"""Size bounds a checkpoint's headers are held to before anything they promise is read or allocated.

A safetensors header, a sharded index, an HF `config.json` or a saved `model_config.json` is a few
kilobytes to a few megabytes for any real model; the bound refuses a file that claims more before it is
parsed. A saved model config decides the size of the model `restore_params` builds, so the bytes of its
parameters are bounded too, by default by the host's physical memory, which they could not exceed anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os

from med2e3_jax.checkpoint.errors import CheckpointTooLargeError, CorruptCheckpointError


def physical_memory_bytes() -> int | None:
    """The host's physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclasses.dataclass(frozen=True)
class CheckpointLimits:
    """max_header_bytes: a safetensors header, or a JSON index or config file, at most this long.
    max_parameter_bytes: the parameters a saved config asks for, at most this many bytes (None: the
    host's physical memory)."""

    max_header_bytes: int = 64 * 2**20
    max_parameter_bytes: int | None = None

    def parameter_bytes_bound(self) -> int | None:
        return physical_memory_bytes() if self.max_parameter_bytes is None else self.max_parameter_bytes

    def check_header(self, path: str | os.PathLike, nbytes: int, what: str) -> None:
        if nbytes > self.max_header_bytes:
            raise CheckpointTooLargeError(
                f"{os.fspath(path)}: its {what} is {nbytes:,} bytes, more than the {self.max_header_bytes:,} "
                "allowed (CheckpointLimits.max_header_bytes; real checkpoints need a few MB at most)", path=path)

    def check_parameters(self, where: str | os.PathLike, nbytes: int) -> None:
        bound = self.parameter_bytes_bound()
        if bound is not None and nbytes > bound:
            raise CheckpointTooLargeError(
                f"{os.fspath(where)}: its config asks for {nbytes / 1e9:,.2f} GB of parameters, more than the "
                f"{bound / 1e9:,.2f} GB allowed (CheckpointLimits.max_parameter_bytes; default the host's "
                "physical memory)", path=where)


DEFAULT_LIMITS = CheckpointLimits()


def read_json(path: str | os.PathLike, limits: CheckpointLimits = DEFAULT_LIMITS, what: str = "JSON file"):
    """The JSON document at `path`, its size checked first; a file that does not parse is a
    `CorruptCheckpointError` naming it and the position."""
    path = os.fspath(path)
    limits.check_header(path, os.path.getsize(path), what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({error})", path=path) from None
