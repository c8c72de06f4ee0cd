"""Volumes from disk — M3D `.npy`, NIfTI (CT-RATE) and DICOM series — in one frame, as float32.

Every reader returns a `Volume` whose array runs (depth, height, width) in the radiological frame:

    axis 0  superior → inferior   (axial slices first, head first)
    axis 1  anterior → posterior  (image rows, top of the slice is the patient's front)
    axis 2  right → left          (image columns, the patient's right on the image's left)

NIfTI and DICOM carry an affine, so they are reoriented to this frame whatever their on-disk axis order
or directions; a `.npy` carries none and is taken as already in it (M3D's volumes are). Values are
Hounsfield units for CT (the file's slope and intercept applied), as stored for everything else.

Every problem that lies in the file raises its own `DataError` naming the file (see `errors.py`), so the
pipeline can count and skip it; the libraries' own exceptions (nibabel's, numpy's, pydicom's) are turned
into one of them. What a file may ask for is bounded by `VolumeLimits`, checked on its header before
anything of that size is allocated or decompressed: a header's promise of a huge array, or a small
`.nii.gz` that inflates to gigabytes, costs no more memory than the limits allow.
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
    NotAnImageError,
    UnsupportedFormatError,
    VolumeShapeError,
    VolumeTooLargeError,
)

# nibabel axis codes of the frame above: index increases towards Inferior, Posterior, Left.
CANONICAL_AXCODES = ("I", "P", "L")
NIFTI1_HEADER_BYTES, NIFTI2_HEADER_BYTES = 348, 540
GZIP_MAGIC = b"\x1f\x8b"
FLOAT32_MAX = float(np.finfo(np.float32).max)
NIFTI_INTENT_LABEL = 1002  # the NIfTI intent code of a label map
# Voxels drawn to tell an image from a mask: enough to meet every tissue of a CT, cheap to sort.
MASK_SAMPLE = 1 << 12
# A label map holds this many distinct small non-negative integers at most; an image holds more.
MAX_LABELS = 64


@dataclasses.dataclass(frozen=True)
class VolumeLimits:
    """What one volume file may ask for, checked on its header before anything of that size is allocated
    or decompressed.

    max_voxels: voxels of the stored volume. The default, 1024 x 1024 x 2048, holds a thin-slice
      whole-body CT at full in-plane resolution (its float32 copy is 8 GiB).
    max_header_bytes: bytes before the voxels: a NIfTI header with its extensions, a `.npy` header.
    min_extent: voxels along every axis. Fewer is one slice, or the 3 or 4 channels of a colour image,
      not a volume to resample to the model's depth.
    """

    max_voxels: int = 1024 * 1024 * 2048
    max_header_bytes: int = 1 << 24
    min_extent: int = 8

    def __post_init__(self):
        for name in ("max_voxels", "max_header_bytes", "min_extent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VolumeLimits.{name} must be a positive integer, got {value!r}")

    def check_shape(self, shape: tuple[int, ...], path, *, what: str = "shape") -> int:
        """The voxel count of a (depth, height, width) `shape` read from a header, or the error naming
        `path`: too many voxels (VolumeTooLargeError), an axis shorter than `min_extent` (VolumeShapeError)."""
        if len(shape) != 3 or min(shape) < 1:
            raise VolumeShapeError(f"{path}: {what} {shape} is not one 3-D volume", path=path)
        count = int(np.prod([int(n) for n in shape], dtype=object))
        if count > self.max_voxels:
            raise VolumeTooLargeError(
                f"{path}: {what} {shape} is {count:,} voxels; the limit is max_voxels={self.max_voxels:,} "
                "(raise it in the data config for larger scans)",
                path=path,
            )
        short = [(axis, int(n)) for axis, n in enumerate(shape) if n < self.min_extent]
        if short:
            axis, n = short[0]
            hint = {1: ": one slice is an image, not a volume", 3: ": 3 is an RGB image's channels",
                    4: ": 4 is an RGBA image's channels"}.get(n, "")
            raise VolumeShapeError(
                f"{path}: {what} {shape} has {n} voxels along axis {axis}; a volume needs at least "
                f"min_extent={self.min_extent} along every axis{hint}",
                path=path,
            )
        return count


DEFAULT_LIMITS = VolumeLimits()


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


def read_volume(path: str | os.PathLike, *, limits: VolumeLimits | None = None) -> Volume:
    """Read a `.npy`, `.nii` / `.nii.gz` file or a DICOM series directory, by its name, as an image.

    Beyond the format readers' checks, the data must be an image: a binary mask or a label map (a few
    distinct non-negative integers) raises NotAnImageError. `limits`: default `VolumeLimits()`.
    """
    limits = limits or DEFAULT_LIMITS
    path = pathlib.Path(path)
    if path.is_dir():
        volume = read_dicom_series(path, limits=limits)
    else:
        name = path.name.lower()
        if name.endswith(".npy"):
            volume = read_npy(path, limits=limits)
        elif name.endswith((".nii", ".nii.gz")):
            volume = read_nifti(path, limits=limits)
        else:
            _require_exists(path)
            raise UnsupportedFormatError(
                f"{path}: cannot tell the format from the name; expected .npy, .nii, .nii.gz or a DICOM directory",
                path=path,
            )
    _require_image(volume.array, path)
    return volume


# ---------------------------------------------------------------------------------------------------
# M3D `.npy`.


def read_npy(path: str | os.PathLike, *, limits: VolumeLimits | None = None) -> Volume:
    """M3D's `.npy`: (1, depth, height, width) or (depth, height, width), already in [0, 1].

    The header is read and checked against `limits` (and the file's size) first, so a header that
    promises more than the file holds, or more than the limits, allocates nothing.
    """
    limits = limits or DEFAULT_LIMITS
    path = _require_exists(path)
    try:
        with open(path, "rb") as f:
            shape, fortran_order, dtype = _npy_header(f, path, limits)
            if dtype.kind == "b":
                raise NotAnImageError(f"{path}: dtype bool is a mask, not an image", path=path)
            if dtype.kind not in "iuf" or dtype.fields is not None or dtype.hasobject:
                raise CorruptFileError(f"{path}: dtype {dtype} is not a numeric volume", path=path)
            volume_shape = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
            if len(volume_shape) != 3:
                raise VolumeShapeError(
                    f"{path}: shape {shape}; expected (depth, height, width) or (1, depth, height, width)", path=path
                )
            count = limits.check_shape(tuple(volume_shape), path)
            start, available = f.tell(), os.fstat(f.fileno()).st_size - f.tell()
            if available < count * dtype.itemsize:
                raise CorruptFileError(
                    f"{path}: truncated: the header promises {shape} {dtype} ({count * dtype.itemsize:,} bytes "
                    f"after byte {start}); the file holds {available:,}",
                    path=path,
                )
            flat = np.fromfile(f, dtype=dtype, count=count)
    except OSError as error:
        raise CorruptFileError(f"{path}: cannot be read ({error})", path=path) from error
    array = flat.reshape(volume_shape, order="F" if fortran_order else "C")
    with np.errstate(over="ignore"):  # beyond float32's range: named by the finite check below
        array = np.ascontiguousarray(array, dtype=np.float32)
    _require_finite(array, path)
    return Volume(array=array, spacing=None, source=str(path), modality_hint="unit")


def _npy_header(f, path: pathlib.Path, limits: VolumeLimits):
    """(shape, fortran_order, dtype) of an open `.npy` file, positioned at its data."""
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(f, max_header_size=limits.max_header_bytes)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(f, max_header_size=limits.max_header_bytes)
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        # numpy says ValueError for a bad magic, a header over max_header_size or an unreadable dict.
        if zipfile_magic(path):
            raise CorruptFileError(f"{path}: holds an .npz archive, not one array", path=path) from error
        raise CorruptFileError(f"{path}: not a readable .npy file ({error})", path=path) from error
    # Version 3.0 exists only for structured dtypes with non-Latin-1 field names: no volume.
    raise CorruptFileError(f"{path}: .npy format version {version}; expected 1.0 or 2.0", path=path)


def zipfile_magic(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# ---------------------------------------------------------------------------------------------------
# NIfTI.


def read_nifti(path: str | os.PathLike, *, slope: float | None = None, intercept: float | None = None,
               limits: VolumeLimits | None = None) -> Volume:
    """A `.nii` or `.nii.gz` volume, reoriented to the canonical frame, in HU.

    `slope` / `intercept` replace the header's scl_slope / scl_inter (CT-RATE lists the rescale in its
    metadata CSV); either left None keeps the header's value. The header is checked against `limits`
    before the voxels are read; a `.nii.gz` is decompressed only as far as the voxels the header
    promises, so a stream that inflates to more costs nothing beyond them.
    """
    import nibabel as nib

    limits = limits or DEFAULT_LIMITS
    path = _require_exists(path)
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == GZIP_MAGIC
            f.seek(0)
            data = f.read() if compressed else f.read(NIFTI2_HEADER_BYTES)
    except OSError as error:
        raise CorruptFileError(f"{path}: cannot be read ({error})", path=path) from error
    # The header from the stream's first MiB: decoding stops at the header, and zlib copies the input it
    # has not used.
    head = _gunzip(memoryview(data)[: 1 << 20], path, NIFTI2_HEADER_BYTES) if compressed else data
    header = _nifti_header(nib, head, path)

    shape = tuple(int(n) for n in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeShapeError(f"{path}: NIfTI data shape {header.get_data_shape()} is not one 3-D volume", path=path)
    count = limits.check_shape(shape, path, what="NIfTI data shape")
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise CorruptFileError(f"{path}: NIfTI data type {dtype} is not a scalar volume", path=path)
    offset = int(header.get_data_offset())
    if offset > limits.max_header_bytes:
        raise VolumeTooLargeError(
            f"{path}: the voxels start at byte {offset:,} (header extensions); the limit is "
            f"max_header_bytes={limits.max_header_bytes:,}",
            path=path,
        )
    needed = offset + count * dtype.itemsize
    if compressed:
        payload = _gunzip(data, path, needed)
        held = len(payload)
    else:
        held = path.stat().st_size
    if held < needed:
        raise CorruptFileError(
            f"{path}: truncated: the header promises {count * dtype.itemsize:,} bytes of voxels after byte {offset}, "
            f"the file holds {max(held - offset, 0):,}",
            path=path,
        )
    if compressed:
        flat = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
    else:
        try:
            flat = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        except OSError as error:
            raise CorruptFileError(f"{path}: cannot be read ({error})", path=path) from error
    raw = flat.reshape(shape, order="F")

    stored_rescale = (float(header["scl_slope"]), float(header["scl_inter"]))
    try:
        # nibabel reads NaN or 0 slope as "no scaling" and refuses a valid slope with a NaN intercept;
        # an infinite field it would ignore as silently, so it is refused here.
        if any(np.isinf(v) for v in stored_rescale):
            raise nib.spatialimages.HeaderDataError("infinite")
        header_slope, header_intercept = header.get_slope_inter()
    except nib.spatialimages.HeaderDataError as error:
        raise CorruptFileError(
            f"{path}: rescale scl_slope {stored_rescale[0]} / scl_inter {stored_rescale[1]} is unusable "
            f"({error}); expected finite numbers (or NaN in both for no scaling)",
            path=path,
        ) from None
    slope = (1.0 if header_slope is None else header_slope) if slope is None else slope
    intercept = (0.0 if header_intercept is None else header_intercept) if intercept is None else intercept
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise CorruptFileError(
            f"{path}: rescale slope {slope} / intercept {intercept} is unusable; expected a finite non-zero slope "
            "and a finite intercept",
            path=path,
        )
    if int(header["intent_code"]) == NIFTI_INTENT_LABEL:
        raise NotAnImageError(f"{path}: its header's intent is a label map (NIFTI_INTENT_LABEL), not an image",
                              path=path)

    oriented, spacing = _to_canonical(raw, header.get_best_affine(), path)
    array = _rescaled(oriented, slope, intercept)
    # Integers rescaled within float32's range need no pass over the voxels to be finite.
    if raw.dtype.kind == "f" or float(np.iinfo(raw.dtype).max) * abs(slope) + abs(intercept) > FLOAT32_MAX:
        _require_finite(array, path)
    return Volume(array=array, spacing=spacing, source=str(path), modality_hint="ct")


def _gunzip(data: bytes | memoryview, path: pathlib.Path, limit: int) -> bytes:
    """The first `limit` bytes (fewer if the stream holds fewer) that the gzip stream `data` inflates to.

    Decoding stops at `limit`: a stream that would inflate past it (a decompression bomb, or junk after
    the voxels) costs no more than `limit` bytes. Several gzip members (concatenated files) are
    decoded in turn. A stream that ends exactly at `limit` is still checked to its CRC.
    """
    parts, total, rest = [], 0, data
    while total < limit and bytes(rest[:2]) == GZIP_MAGIC:
        decoder = zlib.decompressobj(wbits=31)
        try:
            part = decoder.decompress(rest, limit - total)
            parts.append(part)
            total += len(part)
            # The bytes asked for are there: one more byte says whether the stream goes on (then the
            # rest is left undecoded) or ends here (then its trailer's CRC is checked).
            if total >= limit and not decoder.eof and decoder.decompress(decoder.unconsumed_tail, 1):
                break
        except zlib.error as error:
            raise CorruptFileError(f"{path}: corrupt gzip stream ({error})", path=path) from error
        if not decoder.eof:
            raise CorruptFileError(f"{path}: truncated gzip stream after {total:,} bytes", path=path)
        rest = decoder.unused_data
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _nifti_header(nib, data: bytes, path: pathlib.Path):
    if len(data) < NIFTI1_HEADER_BYTES:
        raise CorruptFileError(f"{path}: {len(data)} bytes is shorter than a NIfTI header", path=path)
    sizeof_hdr = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    if NIFTI2_HEADER_BYTES in sizeof_hdr:
        header_class, size = nib.Nifti2Header, NIFTI2_HEADER_BYTES
    else:
        header_class, size = nib.Nifti1Header, NIFTI1_HEADER_BYTES
    if len(data) < size:
        raise CorruptFileError(f"{path}: {len(data)} bytes is shorter than a NIfTI-2 header", path=path)
    try:
        header = header_class.from_fileobj(io.BytesIO(data[:size]), check=True)
        shape = header.get_data_shape()
        header.get_data_dtype()
    except Exception as error:  # nibabel raises several types for a bad header
        raise CorruptFileError(f"{path}: not a valid NIfTI header ({type(error).__name__}: {error})",
                               path=path) from error
    if bytes(header["magic"].item())[:3] not in (b"n+1", b"n+2"):
        raise CorruptFileError(
            f"{path}: NIfTI magic {header['magic'].item()!r}; only single-file .nii / .nii.gz is read", path=path
        )
    if any(int(n) < 0 for n in shape):
        raise CorruptFileError(f"{path}: NIfTI data shape {shape} has a negative size", path=path)
    return header


# ---------------------------------------------------------------------------------------------------
# DICOM.


def read_dicom_series(directory: str | os.PathLike, *, limits: VolumeLimits | None = None) -> Volume:
    """One DICOM series (a directory of single-slice files), in HU, reoriented to the canonical frame.

    Slices are ordered by ImagePositionPatient along the slice normal (file names and InstanceNumber
    are not trusted); each slice's RescaleSlope / RescaleIntercept is applied. The series' size, from
    the headers, is checked against `limits` (and an uncompressed slice's Rows x Columns against its
    stored bytes) before any pixel is decoded. Needs the optional `dicom` extra (pydicom; pylibjpeg for
    compressed series).
    """
    try:
        import pydicom
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("reading DICOM needs pydicom: pip install 'med2e3-jax[dicom]'") from error

    limits = limits or DEFAULT_LIMITS
    directory = _require_exists(directory)
    try:
        files = sorted(
            p for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
        )
    except OSError as error:
        raise CorruptFileError(f"{directory}: cannot list the directory ({error})", path=directory) from error
    if not files:
        raise MissingFileError(f"{directory}: no DICOM files in the directory", path=directory)
    if len(files) > limits.max_voxels:
        raise VolumeTooLargeError(f"{directory}: {len(files):,} files; the limit is max_voxels={limits.max_voxels:,}",
                                  path=directory)

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

    rows, cols = _pixel_grid(*slices[0])
    for file, ds in slices:
        if _pixel_grid(file, ds) != (rows, cols):
            raise VolumeShapeError(f"{file}: slice shape {_pixel_grid(file, ds)}; the series has {(rows, cols)}",
                                   path=file)
    limits.check_shape((len(slices), rows, cols), directory, what="series of (slices, rows, columns)")
    for file, ds in slices:
        _require_pixel_bytes(file, ds, rows, cols)

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
    hu = np.empty((len(slices), rows, cols), dtype=np.float32)
    for k, index in enumerate(order):
        file, ds = slices[index]
        try:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        except (TypeError, ValueError) as error:
            raise CorruptFileError(f"{file}: RescaleSlope / RescaleIntercept is not a number ({error})",
                                   path=file) from error
        if not (np.isfinite(slope) and np.isfinite(intercept)):
            raise CorruptFileError(f"{file}: rescale slope {slope} / intercept {intercept}; expected finite numbers",
                                   path=file)
        try:
            pixels = ds.pixel_array
        except Exception as error:  # pydicom's decoders raise many types
            raise CorruptFileError(
                f"{file}: cannot decode the pixel data ({type(error).__name__}: {error}); compressed series need "
                "pylibjpeg",
                path=file,
            ) from error
        if pixels.shape != (rows, cols):
            raise VolumeShapeError(f"{file}: slice shape {pixels.shape}; the series has {(rows, cols)}", path=file)
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


def _pixel_grid(file: pathlib.Path, ds) -> tuple[int, int]:
    """(Rows, Columns) of one single-frame greyscale slice, from its header, before any pixel is decoded."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        has_pixels = "PixelData" in ds
    except (AttributeError, TypeError, ValueError, KeyError) as error:
        raise CorruptFileError(
            f"{file}: needs Rows, Columns and numeric image attributes to place the pixels ({error})", path=file
        ) from error
    if not has_pixels:
        raise CorruptFileError(f"{file}: has no PixelData; expected an image slice", path=file)
    if rows < 1 or cols < 1:
        raise VolumeShapeError(f"{file}: Rows {rows} x Columns {cols} is no image", path=file)
    if frames != 1:
        raise VolumeShapeError(f"{file}: {frames} frames in one file; expected one slice per file", path=file)
    if samples != 1:
        raise VolumeShapeError(f"{file}: {samples} samples per pixel is a colour image; expected greyscale (1)",
                               path=file)
    if bits == 1:
        raise NotAnImageError(f"{file}: 1-bit pixels are a mask or overlay, not an image", path=file)
    return rows, cols


def _require_pixel_bytes(file: pathlib.Path, ds, rows: int, cols: int) -> None:
    """CorruptFileError if an uncompressed slice stores fewer bytes than Rows x Columns need: the stored
    bytes cost what the file does, the decoded slice what its header says."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    value = ds.get_item("PixelData").value
    if syntax is None or syntax.is_compressed or not isinstance(value, (bytes, bytearray)):
        return
    need = rows * cols * (int(ds.get("BitsAllocated", 16) or 16) // 8)
    if len(value) < need:
        raise CorruptFileError(
            f"{file}: truncated: PixelData holds {len(value):,} bytes; Rows {rows} x Columns {cols} at "
            f"{ds.get('BitsAllocated', 16)} bits need {need:,}",
            path=file,
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
    """float32 C-contiguous `stored * slope + intercept`, written once.

    Values beyond float32's range become infinite without a warning: the finite check that follows
    names the file instead.
    """
    out = np.empty(stored.shape, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
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


def _require_image(array: np.ndarray, path) -> None:
    """Raise NotAnImageError if `array` (float32, every voxel finite) is a binary mask or a label map.

    Judged on a seeded sample of voxels: an image (CT, MR, a normalised M3D volume) takes many values
    over it, a mask two, a label map a few small non-negative integers. A constant volume passes here
    and fails preprocessing for its lack of foreground.
    """
    flat = array.reshape(-1)
    if flat.size > MASK_SAMPLE:
        # Random positions, not a stride: a stride can run down one edge column of every slice.
        flat = flat[np.random.default_rng(0).integers(0, flat.size, MASK_SAMPLE)]
    values = np.unique(flat)
    if values.size == 2:
        raise NotAnImageError(
            f"{path}: holds only the values {values[0]:g} and {values[1]:g}: a binary mask, not an image", path=path
        )
    if 2 < values.size <= MAX_LABELS and values[0] >= 0 and np.all(values == np.round(values)):
        raise NotAnImageError(
            f"{path}: holds only {values.size} distinct non-negative integers ({values[0]:g}..{values[-1]:g}): "
            "a label map, not an image",
            path=path,
        )


def _require_finite(array: np.ndarray, path) -> None:
    # A float64 sum is NaN or inf exactly when a voxel is: it cannot overflow on float32 input, and it
    # costs one pass without a mask the size of the volume.
    if not np.isfinite(array.sum(dtype=np.float64)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteVolumeError(
            f"{path}: {bad} of {array.size} voxels are NaN or infinite (or, rescaled, beyond float32's range); "
            "expected finite values",
            path=path,
        )


__all__ = [
    "CANONICAL_AXCODES",
    "Volume",
    "read_dicom_series",
    "read_nifti",
    "read_npy",
    "read_volume",
]
