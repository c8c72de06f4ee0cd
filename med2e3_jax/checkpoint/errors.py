"""What can be wrong with a checkpoint: each case its own `CheckpointError`, naming the file, key or
parameter at fault and what was expected.

Readers and restorers raise these for every problem that lies in the checkpoint (or in a config that
does not fit it) instead of the exceptions of the libraries underneath, whose messages rarely say which
file they were reading.
"""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A problem in one checkpoint. `path` is the file or directory at fault; the message names it too."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class CorruptCheckpointError(CheckpointError):
    """The file exists but cannot be decoded: truncated, not the format its name says, a chunk missing."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint (`.bin`, `.pt`) that would need code run to load: refused, never unpickled
    with `weights_only=False`."""


class CheckpointTooLargeError(CheckpointError):
    """A header, index or config asks for more bytes than `CheckpointLimits` allow; refused before
    anything of that size is read or allocated."""


class NonFiniteWeightError(CheckpointError):
    """A tensor holds NaN or infinite values, or values beyond the range of the dtype it is imported in."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model: names every offending key or parameter and both shapes."""
