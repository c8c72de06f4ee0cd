"""Record-driven reads stay under the data root: a record's `vision3d` that leaves it is refused by name.

An annotation file says which files to open, so a hostile or careless one could point training or
evaluation at any file the process may read (`../../home/user/.ssh/…`, `/etc/…`, a symlink placed in
the data folder). Every path a record names is resolved — `..` and symlinks followed, as the open
would — and must land inside the resolved root; for a DICOM series directory each file in it must
too. `allow_outside=True` (the data and evaluation configs' `allow_outside_root`) lifts the check for
users who keep volumes elsewhere on purpose.

Without a root (an empty `image_root`) there is nothing to confine to and paths are read as given.
"""

from __future__ import annotations

import os

from data_pipelines.errors import OutsideDataRootError


def confine(path: str | os.PathLike, root: str | os.PathLike | None, *, allow_outside: bool = False,
            record_id=None) -> str:
    """`path` if it resolves inside `root` (or the check is off), else OutsideDataRootError naming the
    record, the path and where it leads.

    `path` is taken as the reader will open it: already joined to the root where the record's path
    was relative (`annotations.load_records` joins them).
    """
    path = os.fspath(path)
    if root is None or os.fspath(root) == "" or allow_outside:
        return path
    real_root = os.path.realpath(root)
    candidates = [path]
    if os.path.isdir(path):
        # A DICOM series: the reader opens every file in the directory.
        candidates += [os.path.join(path, name) for name in sorted(os.listdir(path)) if not name.startswith(".")]
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, real_root]) != real_root:
            who = f"record {record_id!r}: " if record_id is not None else ""
            leads = "" if real == os.path.abspath(candidate) else f" (it leads to {real})"
            raise OutsideDataRootError(
                f"{who}volume path {candidate}{leads} lies outside the data root {real_root}; keep volumes under "
                "image_root, or set allow_outside_root=True (data config or evaluation config) to read it",
                path=candidate,
            )
    return path


__all__ = ["confine"]
