"""What can be wrong with one input: each case its own `DataError`, naming the file or record at fault.

The pipeline catches `DataError` to skip a bad example (and count it) in training mode and re-raises
it in strict mode; anything else is a bug and propagates. So a reader raises one of these for every
problem that lies in the data, and nothing else.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem in one input file or annotation record.

    `path` is the file, directory or record id at fault; the message names it too, so a log line
    alone says which input to look at.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)

    def __reduce__(self):
        # Grain workers send exceptions across processes: keep `path` through pickling.
        return (_rebuild, (type(self), str(self), self.path))


def _rebuild(cls, message, path):
    return cls(message, path=path)


class MissingFileError(DataError):
    """The file or directory does not exist."""


class CorruptFileError(DataError):
    """The file exists but cannot be decoded: truncated, not the format its name says, bad header."""


class UnsupportedFormatError(DataError):
    """The file's suffix names no format that `read_volume` reads."""


class VolumeShapeError(DataError):
    """The data is not one 3-D volume: wrong number of dimensions, an axis shorter than the limits allow
    (one slice, three colour channels), or slices that form no regular grid."""


class VolumeTooLargeError(DataError):
    """The file's header asks for more voxels or header bytes than `readers.VolumeLimits` allow; refused
    before anything of that size is allocated or decompressed."""


class NotAnImageError(DataError):
    """The data is a mask or label map (boolean, 1-bit, or a handful of distinct values), not an image."""


class OutsideDataRootError(DataError):
    """A record's volume path resolves (symlinks followed) outside the data root it is confined to."""


class NonFiniteVolumeError(DataError):
    """The volume holds NaN or infinite voxels."""


class IntensityRangeError(DataError):
    """An already-normalised (M3D `.npy`) volume has values outside [0, 1]."""


class EmptyForegroundError(DataError):
    """Nothing is left after intensity normalisation: a constant volume has no foreground to crop to."""


class RecordError(DataError):
    """A malformed annotation record: no `<image3d>`, a broken conversation, missing fields, no question."""


class PromptTooLongError(RecordError):
    """The record's prompt does not fit `llm_max_length`: no answer token left to train on, or the
    generation prompt cut off; the message gives the token counts."""
