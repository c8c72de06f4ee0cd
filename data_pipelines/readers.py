"""Volumes from disk — M3D `.npy`, NIfTI (CT-RATE) and DICOM series — in one frame, as float32.

Every reader returns a `Volume` whose array runs (depth, height, width) in the radiological frame:

    axis 0  superior → inferior   (axial slices first, head first)
    axis 1  anterior → posterior  (image rows, top of the slice is the patient's front)
    axis 2  right → left          (image columns, the patient's right on the image's left)

NIfTI and DICOM carry an affine, so they are reoriented to this frame whatever their on-disk axis order
or directions; a `.npy` carries none and is taken as already in it (M3D's volumes are). Values are
Hounsfield units for CT (the file's slope and intercept applied), as stored for everything else.

Every problem that lies in the file raises its own `DataError` naming the file (see `errors.py`), so the
pipeline can count and skip it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import zlib

import numpy as np

from data_pipelines.errors import (
    CorruptFileError,
    MissingFileError,
    NonFiniteVolumeError,
    UnsupportedFormatError,
    VolumeShapeError,
)

# nibabel axis codes of the frame above: index increases towards Inferior, Posterior, Left.
CANONICAL_AXCODES = ("I", "P", "L")


@dataclasses.dataclass(frozen=True)
class Volume:
    """One scan.

    array: float32 (depth, height, width), C-contiguous, in the frame of the module docstring.
    spacing: voxel size in mm along (depth, height, width); None when the file has no geometry (`.npy`).
    source: the file or directory read.
    modality_hint: 'ct' (values are HU), 'mr', or 'unit' (already normalised to [0, 1], M3D's `.npy`).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    source: str
    modality_hint: str


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a `.npy`, `.nii` / `.nii.gz` file or a DICOM series directory, by its name."""
    path = pathlib.Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    name = path.name.lower()
    if name.endswith(".npy"):
        return read_npy(path)
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    _require_exists(path)
    raise UnsupportedFormatError(
        f"{path}: cannot tell the format from the name; expected .npy, .nii, .nii.gz or a DICOM directory",
        path=path,
    )


# ---------------------------------------------------------------------------------------------------
# M3D `.npy`.


def read_npy(path: str | os.PathLike) -> Volume:
    """M3D's `.npy`: (1, depth, height, width) or (depth, height, width), already in [0, 1]."""
    path = _require_exists(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CorruptFileError(f"{path}: not a readable .npy file ({error})", path=path) from error
    if not isinstance(array, np.ndarray):
        raise CorruptFileError(f"{path}: holds an .npz archive, not one array", path=path)
    if array.dtype.kind not in "biuf":
        raise CorruptFileError(f"{path}: dtype {array.dtype} is not a numeric volume", path=path)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or min(array.shape) == 0:
        raise VolumeShapeError(
            f"{path}: shape {array.shape}; expected (depth, height, width) or (1, depth, height, width)", path=path
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    _require_finite(array, path)
    return Volume(array=array, spacing=None, source=str(path), modality_hint="unit")


# ---------------------------------------------------------------------------------------------------
# NIfTI.


def read_nifti(path: str | os.PathLike, *, slope: float | None = None, intercept: float | None = None) -> Volume:
    """A `.nii` or `.nii.gz` volume, reoriented to the canonical frame, in HU.

    `slope` / `intercept` replace the header's scl_slope / scl_inter (CT-RATE lists the rescale in its
    metadata CSV); either left None keeps the header's value.
    """
    import nibabel as nib

    path = _require_exists(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, path)
    header = _nifti_header(nib, data, path)

    shape = tuple(int(n) for n in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) == 0:
        raise VolumeShapeError(f"{path}: NIfTI data shape {header.get_data_shape()} is not one 3-D volume", path=path)
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise CorruptFileError(f"{path}: NIfTI data type {dtype} is not a scalar volume", path=path)
    offset = int(header.get_data_offset())
    count = int(np.prod(shape))
    if offset + count * dtype.itemsize > len(data):
        raise CorruptFileError(
            f"{path}: truncated: the header promises {count * dtype.itemsize} bytes of voxels after byte {offset}, "
            f"the file holds {max(len(data) - offset, 0)}",
            path=path,
        )
    raw = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")

    header_slope, header_intercept = header.get_slope_inter()
    slope = (1.0 if header_slope is None else header_slope) if slope is None else slope
    intercept = (0.0 if header_intercept is None else header_intercept) if intercept is None else intercept
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise CorruptFileError(f"{path}: rescale slope {slope} / intercept {intercept} is unusable", path=path)

    oriented, spacing = _to_canonical(raw, header.get_best_affine(), path)
    array = _rescaled(oriented, slope, intercept)
    if raw.dtype.kind == "f":
        _require_finite(array, path)
    return Volume(array=array, spacing=spacing, source=str(path), modality_hint="ct")


def _gunzip(data: bytes, path: pathlib.Path) -> bytes:
    # One zlib call into a buffer sized from the gzip trailer is ~30% faster than nibabel's streamed
    # GzipFile; decoding is what a CT-RATE loader spends its time on.
    # The trailer of a damaged file is noise: cap the hint so that it cannot reserve gigabytes.
    size_hint = int.from_bytes(data[-4:], "little")
    try:
        out = zlib.decompress(data, wbits=31, bufsize=max(1, min(size_hint, 64 * len(data))))
    except zlib.error as error:
        raise CorruptFileError(f"{path}: corrupt or truncated gzip stream ({error})", path=path) from error
    if len(out) % (1 << 32) != size_hint:
        # Several gzip members (concatenated files): decode them all.
        parts, rest = [], data
        while rest[:2] == b"\x1f\x8b":
            decoder = zlib.decompressobj(wbits=31)
            try:
                parts.append(decoder.decompress(rest))
            except zlib.error as error:
                raise CorruptFileError(f"{path}: corrupt gzip member ({error})", path=path) from error
            if not decoder.eof:
                raise CorruptFileError(f"{path}: truncated gzip member", path=path)
            rest = decoder.unused_data
        out = b"".join(parts)
    return out


def _nifti_header(nib, data: bytes, path: pathlib.Path):
    if len(data) < 348:
        raise CorruptFileError(f"{path}: {len(data)} bytes is shorter than a NIfTI header", path=path)
    sizeof_hdr = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    header_class, size = (nib.Nifti2Header, 540) if 540 in sizeof_hdr else (nib.Nifti1Header, 348)
    try:
        header = header_class.from_fileobj(io.BytesIO(data[:size]), check=True)
    except Exception as error:  # nibabel raises several types for a bad header
        raise CorruptFileError(f"{path}: not a valid NIfTI header ({error})", path=path) from error
    if bytes(header["magic"].item())[:3] not in (b"n+1", b"n+2"):
        raise CorruptFileError(
            f"{path}: NIfTI magic {header['magic'].item()!r}; only single-file .nii / .nii.gz is read", path=path
        )
    return header


# ---------------------------------------------------------------------------------------------------
# DICOM.


def read_dicom_series(directory: str | os.PathLike) -> Volume:
    """One DICOM series (a directory of single-slice files), in HU, reoriented to the canonical frame.

    Slices are ordered by ImagePositionPatient along the slice normal (file names and InstanceNumber
    are not trusted); each slice's RescaleSlope / RescaleIntercept is applied. Needs the optional
    `dicom` extra (pydicom; pylibjpeg for compressed series).
    """
    try:
        import pydicom
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("reading DICOM needs pydicom: pip install 'med2e3-jax[dicom]'") from error

    directory = _require_exists(directory)
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
    if not files:
        raise MissingFileError(f"{directory}: no DICOM files in the directory", path=directory)

    slices = []
    for file in files:
        try:
            slices.append((file, pydicom.dcmread(file)))
        except Exception as error:  # pydicom raises many types for a damaged file
            raise CorruptFileError(f"{file}: not a readable DICOM file ({error})", path=file) from error

    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise VolumeShapeError(
            f"{directory}: holds {len(series)} series ({sorted(series)}); put one series per directory",
            path=directory,
        )
    if len(slices) < 2:
        raise VolumeShapeError(f"{directory}: a single slice is no volume", path=directory)

    geometry = [_slice_geometry(file, ds) for file, ds in slices]
    row_dir, col_dir, pixel_spacing = geometry[0][1], geometry[0][2], geometry[0][3]
    for (file, _), (_, r, c, s) in zip(slices, geometry):
        if not (np.allclose(r, row_dir, atol=1e-4) and np.allclose(c, col_dir, atol=1e-4)):
            raise VolumeShapeError(f"{file}: ImageOrientationPatient differs from the rest of the series", path=file)
        if not np.allclose(s, pixel_spacing, rtol=1e-4):
            raise VolumeShapeError(f"{file}: PixelSpacing differs from the rest of the series", path=file)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([g[0] for g in geometry])
    order = np.argsort(positions @ normal, kind="stable")
    along = (positions @ normal)[order]
    gaps = np.diff(along)
    slice_spacing = float(np.median(gaps))
    if slice_spacing <= 1e-4 or np.any(np.abs(gaps - slice_spacing) > 0.1 * slice_spacing):
        worst = slices[order[int(np.argmax(np.abs(gaps - slice_spacing))) + 1]][0]
        raise VolumeShapeError(
            f"{directory}: slices are not evenly spaced along the normal (gaps {np.round(gaps, 3).tolist()} mm; "
            f"duplicate or missing slice near {worst.name})",
            path=directory,
        )

    first = slices[order[0]][1]
    rows, cols = int(first.Rows), int(first.Columns)
    hu = np.empty((len(slices), rows, cols), dtype=np.float32)
    for k, index in enumerate(order):
        file, ds = slices[index]
        try:
            pixels = ds.pixel_array
        except Exception as error:
            raise CorruptFileError(
                f"{file}: cannot decode the pixel data ({error}); compressed series need pylibjpeg", path=file
            ) from error
        if pixels.shape != (rows, cols):
            raise VolumeShapeError(f"{file}: slice shape {pixels.shape}; the series has {(rows, cols)}", path=file)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        np.multiply(pixels, np.float32(slope), out=hu[k], casting="unsafe")
        hu[k] += np.float32(intercept)

    # Voxel (k, r, c) sits at IPP_0 + k·Δ·normal + r·Δrow·col_dir + c·Δcol·row_dir in the patient's LPS
    # world; nibabel's orientation code speaks RAS, hence the sign flip of x and y.
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_spacing
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = row_dir * pixel_spacing[1]
    affine[:3, 3] = positions[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    oriented, spacing = _to_canonical(hu, affine, directory)
    array = np.ascontiguousarray(oriented)
    _require_finite(array, directory)
    modality = str(first.get("Modality", "CT")).lower()
    return Volume(
        array=array,
        spacing=spacing,
        source=str(directory),
        # Anything but CT has no fixed intensity scale: 'mr' means plain min-max downstream.
        modality_hint="ct" if modality == "ct" else "mr",
    )


def _slice_geometry(file: pathlib.Path, ds):
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        spacing = np.array([float(v) for v in ds.PixelSpacing])
    except (AttributeError, TypeError, ValueError) as error:
        raise VolumeShapeError(
            f"{file}: needs ImagePositionPatient, ImageOrientationPatient and PixelSpacing to place the slice ({error})",
            path=file,
        ) from error
    if position.shape != (3,) or orientation.shape != (6,) or spacing.shape != (2,):
        raise VolumeShapeError(f"{file}: malformed slice geometry attributes", path=file)
    return position, orientation[:3], orientation[3:], spacing


# ---------------------------------------------------------------------------------------------------
# Shared.


def _to_canonical(data: np.ndarray, affine: np.ndarray, path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Flip and permute `data`'s three axes (a view) so they point (Inferior, Posterior, Left)."""
    from nibabel import orientations

    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CorruptFileError(f"{path}: the voxel-to-world affine is degenerate:\n{affine}", path=path)
    start = orientations.io_orientation(affine)
    if np.isnan(start).any():
        raise CorruptFileError(f"{path}: cannot tell the axis directions from the affine:\n{affine}", path=path)
    transform = orientations.ornt_transform(start, orientations.axcodes2ornt(CANONICAL_AXCODES))
    voxel_size = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(transform):
        spacing[int(target)] = float(voxel_size[axis])
    return orientations.apply_orientation(data, transform), (spacing[0], spacing[1], spacing[2])


def _rescaled(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """float32 C-contiguous `stored * slope + intercept`, written once."""
    out = np.empty(stored.shape, dtype=np.float32)
    if slope == 1.0:
        out[...] = stored
    else:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _require_exists(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or directory", path=path)
    return path


def _require_finite(array: np.ndarray, path) -> None:
    # A float64 sum is NaN or inf exactly when a voxel is: it cannot overflow on float32 input, and it
    # costs one pass without a mask the size of the volume.
    if not np.isfinite(array.sum(dtype=np.float64)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteVolumeError(f"{path}: {bad} of {array.size} voxels are NaN or infinite", path=path)


__all__ = [
    "CANONICAL_AXCODES",
    "Volume",
    "read_dicom_series",
    "read_nifti",
    "read_npy",
    "read_volume",
]
