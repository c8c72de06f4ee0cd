"""Readers put every format in one frame (superior→inferior, anterior→posterior, right→left) in HU,
and every bad file raises its own DataError naming the file."""

import gzip
import pathlib
import pickle

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import errors
from data_pipelines.preprocess import preprocess_volume
from data_pipelines.readers import Volume, read_dicom_series, read_nifti, read_npy, read_volume

SPACING = (2.5, 0.8, 0.6)  # (depth, height, width) mm

# Where each anatomical direction points in nibabel's RAS+ world, and which canonical axis it runs along
# (canonical axes point Inferior, Posterior, Left).
WORLD = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
CANONICAL_AXIS = {"S": 0, "I": 0, "A": 1, "P": 1, "R": 2, "L": 2}
CANONICAL_CODE = ("I", "P", "L")


def canonical_hu(shape=(8, 9, 10)):
    """Distinct, asymmetric HU values so that any wrong flip or permutation shows."""
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 3 - 1000).astype(np.float32)


def even_hu(shape):
    """HU that a slope of 2 stores exactly (the DICOM series alternates slopes 1 and 2)."""
    return np.round(canonical_hu(shape) / 2) * 2


def on_disk(canonical, axcodes):
    """The voxel array and RAS affine of `canonical` stored with voxel axes pointing along `axcodes`."""
    order = [CANONICAL_AXIS[code] for code in axcodes]
    data = np.transpose(canonical, order)
    for axis, code in enumerate(axcodes):
        if code != CANONICAL_CODE[CANONICAL_AXIS[code]]:
            data = np.flip(data, axis)
    affine = np.eye(4)
    for axis, code in enumerate(axcodes):
        world_axis, sign = WORLD[code]
        column = np.zeros(3)
        column[world_axis] = sign * SPACING[CANONICAL_AXIS[code]]
        affine[:3, axis] = column
    affine[:3, 3] = (12.0, -30.0, 101.0)
    return np.ascontiguousarray(data), affine


def save_nifti(path, data, affine, *, slope=None, intercept=None, dtype=None):
    image = nib.Nifti1Image(data, affine)
    if dtype is not None:
        image.header.set_data_dtype(dtype)
    if slope is not None:
        image.header.set_slope_inter(slope, intercept)
    nib.save(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# NIfTI.


@pytest.mark.parametrize(
    "axcodes",
    [
        ("L", "P", "S"),  # DICOM-converted CT-RATE: LPS on disk
        ("R", "A", "S"),  # nibabel canonical
        ("P", "S", "L"),  # permuted axes
        ("I", "R", "A"),  # permuted and flipped
    ],
)
def test_nifti_is_reoriented_to_the_canonical_frame_with_spacing(tmp_path, axcodes):
    hu = canonical_hu()
    data, affine = on_disk(hu, axcodes)
    assert nib.aff2axcodes(affine) == axcodes
    volume = read_nifti(save_nifti(tmp_path / "scan.nii.gz", data, affine))
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    assert volume.modality_hint == "ct" and volume.source == str(tmp_path / "scan.nii.gz")


def test_nifti_header_slope_and_intercept_give_hu(tmp_path):
    hu = np.round(canonical_hu()) * 2  # even, so that slope 2 stores it exactly
    data, affine = on_disk(hu, ("L", "P", "S"))
    stored = ((data + 1024) / 2).astype(np.int16)
    path = save_nifti(tmp_path / "scaled.nii.gz", stored, affine, slope=2.0, intercept=-1024.0, dtype=np.int16)
    assert nib.load(str(path)).get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_volume(path).array, hu)


def test_given_slope_and_intercept_replace_the_header(tmp_path):
    # CT-RATE lists the rescale in its metadata CSV; the files store raw values.
    hu = np.round(canonical_hu())
    data, affine = on_disk(hu, ("R", "A", "S"))
    path = save_nifti(tmp_path / "raw.nii", (data + 1024).astype(np.int16), affine)
    np.testing.assert_array_equal(read_nifti(path, slope=1.0, intercept=-1024.0).array, hu)
    np.testing.assert_array_equal(read_nifti(path).array, hu + 1024)


def test_nifti_trailing_singleton_dimension_is_one_volume(tmp_path):
    hu = canonical_hu()
    data, affine = on_disk(hu, ("L", "P", "S"))
    volume = read_volume(save_nifti(tmp_path / "4d.nii.gz", data[..., None], affine))
    np.testing.assert_array_equal(volume.array, hu)


def test_nifti_reader_matches_nibabel_on_a_big_endian_float_file(tmp_path):
    hu = canonical_hu()
    data, affine = on_disk(hu, ("P", "S", "L"))
    image = nib.Nifti1Image(data.astype(">f4"), affine)
    nib.save(image, str(tmp_path / "be.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "be.nii.gz").array, hu)


# ---------------------------------------------------------------------------------------------------
# M3D .npy.


@pytest.mark.parametrize("leading_channel", [True, False])
def test_npy_volume_reads_with_or_without_the_channel_axis(tmp_path, leading_channel):
    unit = np.random.default_rng(0).random((8, 10, 12), dtype=np.float32)
    np.save(tmp_path / "m3d.npy", unit[None] if leading_channel else unit)
    volume = read_volume(tmp_path / "m3d.npy")
    np.testing.assert_array_equal(volume.array, unit)
    assert volume.spacing is None and volume.modality_hint == "unit"


# ---------------------------------------------------------------------------------------------------
# DICOM.


def write_dicom_series(directory, hu, *, row_dir=(1, 0, 0), col_dir=(0, 1, 0), series_uid=None, names=None):
    """One file per slice of `hu` (slices, rows, cols), slice k at z = k * 2.5 mm; varying rescale."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    directory.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    names = names or [f"slice_{k}.dcm" for k in range(len(hu))]
    paths = []
    for k, (image, name) in enumerate(zip(hu, names)):
        slope, intercept = (1.0, -1024.0) if k % 2 else (2.0, -2048.0)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = len(hu) - k  # deliberately not the slice order
        ds.ImagePositionPatient = [-100.0, -120.0, 2.5 * k]
        ds.ImageOrientationPatient = [*map(float, row_dir), *map(float, col_dir)]
        ds.PixelSpacing = [0.8, 0.6]  # between rows, between columns
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.round((image - intercept) / slope).astype("<i2").tobytes()
        ds.save_as(directory / name, enforce_file_format=True)
        paths.append(directory / name)
    return paths


def test_dicom_series_is_ordered_by_position_and_rescaled(tmp_path):
    pytest.importorskip("pydicom")
    # Stored inferior → superior (z grows with k); the canonical frame runs superior → inferior.
    stored = even_hu((8, 9, 10))
    names = [f"{name}.dcm" for name in ("q", "b", "x", "a", "m", "c", "z", "d")]  # file order unrelated to position
    write_dicom_series(tmp_path / "series", stored, names=names)
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, stored[::-1])
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.6))
    assert volume.modality_hint == "ct"


def test_dicom_rows_pointing_right_are_mirrored_to_the_canonical_frame(tmp_path):
    pytest.importorskip("pydicom")
    stored = even_hu((8, 9, 11))
    write_dicom_series(tmp_path / "series", stored, row_dir=(-1, 0, 0))
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "series").array, stored[::-1, :, ::-1])


def test_dicom_directory_with_two_series_or_a_duplicate_slice_is_rejected(tmp_path):
    pytest.importorskip("pydicom")
    stored = even_hu((8, 9, 11))
    write_dicom_series(tmp_path / "mixed", stored)
    write_dicom_series(tmp_path / "mixed", stored, names=[f"other_{k}.dcm" for k in range(8)])
    with pytest.raises(errors.VolumeShapeError, match="2 series"):
        read_volume(tmp_path / "mixed")
    paths = write_dicom_series(tmp_path / "duplicate", stored)
    (tmp_path / "duplicate" / "copy.dcm").write_bytes(paths[1].read_bytes())
    with pytest.raises(errors.VolumeShapeError, match="evenly spaced"):
        read_volume(tmp_path / "duplicate")


def test_unreadable_dicom_file_is_named(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "series", even_hu((8, 9, 11)))
    (tmp_path / "series" / "junk.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(errors.CorruptFileError, match="junk.dcm") as caught:
        read_volume(tmp_path / "series")
    assert caught.value.path == str(tmp_path / "series" / "junk.dcm")


# ---------------------------------------------------------------------------------------------------
# Bad input: one error each, naming the file.


def good_nifti(tmp_path, name="scan.nii.gz"):
    data, affine = on_disk(canonical_hu((8, 10, 12)), ("L", "P", "S"))
    return save_nifti(tmp_path / name, data, affine)


def assert_names(caught, path):
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)


def test_truncated_nifti_gz_is_corrupt(tmp_path):
    path = good_nifti(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(errors.CorruptFileError) as caught:
        read_volume(path)
    assert_names(caught, path)


def test_gzipped_nifti_with_fewer_voxels_than_the_header_promises_is_corrupt(tmp_path):
    path = good_nifti(tmp_path)
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[: len(payload) - 100]))
    with pytest.raises(errors.CorruptFileError, match="truncated") as caught:
        read_volume(path)
    assert_names(caught, path)


@pytest.mark.parametrize("content", [b"\x1f\x8b" + bytes(range(256)) * 4, b"plain garbage " * 100])
def test_garbage_nifti_is_corrupt(tmp_path, content):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(content)
    with pytest.raises(errors.CorruptFileError) as caught:
        read_volume(path)
    assert_names(caught, path)


def test_truncated_or_garbage_npy_is_corrupt(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((1, 8, 10, 12), np.float32))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(errors.CorruptFileError) as caught:
        read_volume(path)
    assert_names(caught, path)
    path = tmp_path / "text.npy"
    path.write_text("this is not an array")
    with pytest.raises(errors.CorruptFileError) as caught:
        read_volume(path)
    assert_names(caught, path)


@pytest.mark.parametrize("shape", [(6, 8), (3, 4, 6, 8), (1, 1, 4, 6, 8), (0, 4, 4)])
def test_npy_of_wrong_dimensionality_is_a_shape_error(tmp_path, shape):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(errors.VolumeShapeError) as caught:
        read_npy(path)
    assert_names(caught, path)


@pytest.mark.parametrize("shape", [(6, 8), (4, 5, 6, 2)])
def test_nifti_of_wrong_dimensionality_is_a_shape_error(tmp_path, shape):
    path = save_nifti(tmp_path / "bad.nii.gz", np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(errors.VolumeShapeError) as caught:
        read_volume(path)
    assert_names(caught, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_rejected(tmp_path, bad):
    volume = np.zeros((8, 9, 10), np.float32)
    volume[2, 3, 4] = bad
    np.save(tmp_path / "bad.npy", volume)
    with pytest.raises(errors.NonFiniteVolumeError, match="1 of 720") as caught:
        read_volume(tmp_path / "bad.npy")
    assert_names(caught, tmp_path / "bad.npy")
    path = save_nifti(tmp_path / "bad.nii.gz", volume, np.eye(4))
    with pytest.raises(errors.NonFiniteVolumeError) as caught:
        read_volume(path)
    assert_names(caught, path)


def test_constant_volume_fails_preprocessing_with_empty_foreground_naming_the_file(tmp_path):
    path = save_nifti(tmp_path / "flat.nii.gz", np.full((8, 10, 12), -1000, np.int16), np.eye(4))
    with pytest.raises(errors.EmptyForegroundError) as caught:
        preprocess_volume(read_volume(path), shape=(4, 4, 4), modality="ct")
    assert_names(caught, path)


@pytest.mark.parametrize("name", ["absent.npy", "absent.nii.gz", "absent.nii", "absent_dir/"])
def test_missing_file_is_reported_as_missing(tmp_path, name):
    path = tmp_path / name
    reader = read_dicom_series if name.endswith("/") else read_volume
    with pytest.raises(errors.MissingFileError) as caught:
        reader(path)
    assert_names(caught, path)


def test_unknown_suffix_is_unsupported(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"x")
    with pytest.raises(errors.UnsupportedFormatError) as caught:
        read_volume(path)
    assert_names(caught, path)


def test_data_errors_keep_their_path_across_processes():
    error = errors.CorruptFileError("/data/a.nii.gz: truncated", path="/data/a.nii.gz")
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is errors.CorruptFileError
    assert restored.path == "/data/a.nii.gz" and str(restored) == str(error)
    assert isinstance(restored, errors.DataError) and isinstance(restored, ValueError)


def test_volume_is_immutable_record():
    volume = Volume(np.zeros((1, 1, 1), np.float32), None, "x.npy", "unit")
    with pytest.raises(AttributeError):
        volume.source = "y.npy"


# ---------------------------------------------------------------------------------------------------
# The real CTs fetched from the TotalSegmentator sdist (scripts/fetch_assets.py); skipped when absent.


def real_asset(name):
    from data_pipelines.assets import AssetError, asset_path

    try:
        return asset_path(f"totalsegmentator/{name}")
    except AssetError as error:
        pytest.skip(f"real CT not fetched: {error}")


def nibabel_canonical(path):
    """The file's voxels in the frame (superior→inferior, anterior→posterior, right→left), via nibabel's
    own RAS canonical form: a route independent of the reader's."""
    ras = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)
    return ras.transpose(2, 1, 0)[::-1, ::-1, ::-1]


@pytest.mark.parametrize(
    "name, on_disk, shape, spacing, hu_range",
    [
        ("example_ct.nii.gz", ("R", "A", "S"), (112, 101, 122), (3.0, 3.0, 3.0), (-1207, 3382)),
        ("example_ct_sm.nii.gz", ("R", "A", "S"), (30, 101, 122), (3.0, 3.0, 3.0), (-1100, 1207)),
        ("aorta_report/example_ct.nii.gz", ("L", "P", "S"), (191, 167, 233), (1.5, 1.5, 1.5), (-1094, 3343)),
    ],
)
def test_real_nifti_ct_reads_in_hu_in_the_canonical_frame(name, on_disk, shape, spacing, hu_range):
    path = real_asset(name)
    assert nib.aff2axcodes(nib.load(path).affine) == on_disk
    volume = read_volume(path)
    assert volume.array.shape == shape and volume.spacing == pytest.approx(spacing)
    assert (volume.array.min(), volume.array.max()) == hu_range
    assert volume.modality_hint == "ct"
    np.testing.assert_array_equal(volume.array, nibabel_canonical(path))


def test_small_example_ct_is_the_top_thirty_slices_of_the_example_ct():
    # Its header repeats example_ct's affine (origin included), yet its voxels are example_ct's most
    # superior 30 slices: the label maps that come with it fit these voxels, not example_ct's.
    small, full = read_volume(real_asset("example_ct_sm.nii.gz")), read_volume(real_asset("example_ct.nii.gz"))
    np.testing.assert_array_equal(small.array, full.array[:30])


def dicom_slices(directory):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("pylibjpeg")
    return [pydicom.dcmread(path) for path in sorted(pathlib.Path(directory).iterdir())]


def test_real_jpeg2000_dicom_series_reads_in_hu():
    directory = real_asset("example_ct_dicom")
    slices = dicom_slices(directory)
    assert len(slices) == 20 and slices[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    volume = read_volume(directory)
    assert volume.array.shape == (20, 512, 512) and volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert (volume.array.min(), volume.array.max()) == (-1024, 1839)
    assert volume.modality_hint == "ct"


def test_real_dicom_series_equals_its_nifti_counterpart(tmp_path):
    """TotalSegmentator's NIfTI of this series (example_seg_dicom.nii.gz) fixes its grid in the world:
    filled with the DICOM pixels found at each of its voxel centres (from the DICOM headers alone), it is
    the series as a NIfTI file, and both readers must give the same volume."""
    directory = real_asset("example_ct_dicom")
    reference = nib.load(real_asset("example_seg_dicom.nii.gz"))
    assert nib.aff2axcodes(reference.affine) == ("L", "A", "S")  # not the DICOM's own (L, P, S) order
    slices = dicom_slices(directory)
    ds = slices[0]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # rows along x, columns along y
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    corner = np.array([float(v) for v in ds.ImagePositionPatient])

    # NIfTI voxel (i, j, k) -> RAS world -> DICOM's LPS world -> (slice z, row, column) of the series.
    grid = reference.shape
    world = [reference.affine[axis, axis] * np.arange(grid[axis]) + reference.affine[axis, 3] for axis in range(3)]
    assert np.count_nonzero(reference.affine[:3, :3] - np.diag(np.diag(reference.affine[:3, :3]))) == 0
    lps_x, lps_y, lps_z = -world[0], -world[1], world[2]
    columns, rows = (lps_x - corner[0]) / column_spacing, (lps_y - corner[1]) / row_spacing
    by_z = {round(float(s.ImagePositionPatient[2]), 3): s for s in slices}
    for index in (columns, rows):
        np.testing.assert_allclose(index, np.round(index), atol=1e-3)  # voxel centres fall on pixel centres
    assert sorted(by_z) == sorted(round(float(z), 3) for z in lps_z)
    ordered = [by_z[round(float(z), 3)] for z in lps_z]
    hu = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in ordered], axis=-1)
    data = hu[np.round(rows).astype(int)][:, np.round(columns).astype(int)].transpose(1, 0, 2)  # (i, j, k)

    target = tmp_path / "example_ct_dicom.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.int16), reference.affine), str(target))
    np.testing.assert_array_equal(read_volume(target).array, read_volume(directory).array)
