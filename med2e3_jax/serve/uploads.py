"""The server's private folder: where uploads land, are read, and are removed.

    root/                 mode 0700, made by `tempfile.mkdtemp` (or an empty folder the user names)
      <gradio's upload subfolders>/NAME     an upload as the browser sent it, deleted once read
      unzipped/<random>/                    a DICOM series `.zip` extracted, deleted once read
      embedded/                             the embedded phantoms (scans.write_phantoms)
      outputs/<random>/                     figures and answers offered for download

Gradio's own cache is pointed at `root` (GRADIO_TEMP_DIR), so every file the page can fetch lies under
it. An upload is accepted only from inside `root`, at most `max_bytes` on disk; a `.zip` holds at most
`max_bytes` uncompressed and `MAX_ZIP_MEMBERS` files, extracted flat under numbered names (no path of
the archive is ever used), so a member named `../../x` or a symlink cannot leave the folder.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
import zipfile

from data_pipelines.data_root import confine
from data_pipelines.errors import CorruptFileError, DataError, UnsupportedFormatError, VolumeTooLargeError

log = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 10_000
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".npy", ".zip")
_CHUNK = 1 << 20


class UploadFolder:
    """The private folder (see the module docstring).

    Args:
      max_bytes: the most an upload (and an unzipped series) may take on disk.
      root: an existing empty folder to use; default a new private temporary folder, removed by `close`.
    """

    def __init__(self, max_bytes: int, root: str | os.PathLike | None = None):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._owns_root = root is None
        if root is None:
            root = tempfile.mkdtemp(prefix="med2e3-serve-")
        else:
            os.makedirs(root, mode=0o700, exist_ok=True)
        self.root = pathlib.Path(root).resolve()
        os.chmod(self.root, 0o700)

    def folder(self, name: str) -> pathlib.Path:
        """A subfolder of the root, created."""
        path = self.root / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def new_folder(self, under: str) -> pathlib.Path:
        """A new private folder with a random name under `root/under`."""
        return pathlib.Path(tempfile.mkdtemp(dir=self.folder(under)))

    def accept(self, path: str | os.PathLike) -> pathlib.Path:
        """The upload at `path`, checked: inside the root, a regular file, a known suffix, within
        `max_bytes`. Raises a DataError naming the upload."""
        name = pathlib.Path(path).name
        real = pathlib.Path(confine(path, self.root))
        if not real.is_file():
            raise DataError(f"{name}: the upload is not a file", path=name)
        if not name.lower().endswith(UPLOAD_SUFFIXES):
            raise UnsupportedFormatError(
                f"{name}: cannot tell the format from the name; expected {', '.join(UPLOAD_SUFFIXES)} "
                "(a DICOM series as a .zip)", path=name)
        size = real.stat().st_size
        if size > self.max_bytes:
            raise VolumeTooLargeError(f"{name}: {size:,} bytes; uploads are limited to {self.max_bytes:,} bytes "
                                      "(med2e3-serve --max_upload_mb)", path=name)
        return real

    def unzip_series(self, archive: pathlib.Path) -> pathlib.Path:
        """A DICOM series `.zip` extracted into a new folder of numbered files (the caller removes it)."""
        name = archive.name
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.infolist() if not m.is_dir() and not _ignored(m.filename)]
                if not members:
                    raise CorruptFileError(f"{name}: the archive holds no file", path=name)
                if len(members) > MAX_ZIP_MEMBERS:
                    raise VolumeTooLargeError(f"{name}: {len(members):,} files; at most {MAX_ZIP_MEMBERS:,}",
                                              path=name)
                promised = sum(m.file_size for m in members)
                if promised > self.max_bytes:
                    raise VolumeTooLargeError(f"{name}: unzips to {promised:,} bytes; the limit is "
                                              f"{self.max_bytes:,} (med2e3-serve --max_upload_mb)", path=name)
                target = self.new_folder("unzipped")
                written = 0
                for index, member in enumerate(members):
                    with zf.open(member) as source, open(target / f"slice_{index:05d}.dcm", "wb") as out:
                        # The sizes in the archive's directory are the sender's word: count what inflates.
                        while chunk := source.read(_CHUNK):
                            written += len(chunk)
                            if written > self.max_bytes:
                                shutil.rmtree(target, ignore_errors=True)
                                raise VolumeTooLargeError(f"{name}: inflates past {self.max_bytes:,} bytes",
                                                          path=name)
                            out.write(chunk)
                return target
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as error:
            raise CorruptFileError(f"{name}: not a readable .zip ({error})", path=name) from error

    def discard(self, path: str | os.PathLike) -> None:
        """Removes an upload (and the subfolder Gradio made for it, once empty); only inside the root."""
        path = pathlib.Path(path)
        try:
            confine(path, self.root)
        except DataError:
            return
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        parent = path.parent
        if parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                pass  # not empty: another upload of the same content

    def close(self) -> None:
        """Removes the root when this object made it."""
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _ignored(member: str) -> bool:
    """Archive entries that are not slices: macOS resource forks, hidden files, a DICOMDIR index."""
    base = member.replace("\\", "/").rsplit("/", 1)[-1]
    return member.startswith("__MACOSX/") or base.startswith(".") or base.upper() == "DICOMDIR"
