"""The volume preprocessing and augmentations equal MONAI's transforms, as Med-2E3 composes them."""

import time

import numpy as np
import pytest

from data_pipelines import preprocess
from data_pipelines.errors import EmptyForegroundError, IntensityRangeError
from data_pipelines.preprocess import (
    Augmentation,
    apply_augmentation,
    augment,
    crop_foreground,
    foreground_box,
    hu_to_unit,
    min_max,
    preprocess_volume,
    resize,
    sample_augmentation,
)
from data_pipelines.readers import Volume

pytest.importorskip("torch")
mt = pytest.importorskip("monai.transforms")

TOLERANCE = 1e-5


def body_ct(shape, seed=0):
    """HU volume: an off-centre body ellipse (soft tissue, lungs, dense bone above 1000 HU) in air.

    The FOV outside a circle is -2048 (below the window), air inside it is around -1000, so both the
    window's clip and the foreground crop matter; the body spans only part of the slices.
    """
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, depth), np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij"
    )
    hu = np.full(shape, -2048.0, dtype=np.float32)
    fov = y**2 + x**2 < 0.95
    hu[fov] = -1000 + np.round(rng.normal(0, 4, fov.sum()))
    body = (((y - 0.1) / 0.55) ** 2 + ((x + 0.15) / 0.7) ** 2 < 1) & (z > -0.7) & (z < 0.8)
    hu[body] = 40 + rng.normal(0, 20, body.sum())
    lungs = body & (((np.abs(x + 0.15) - 0.3) / 0.2) ** 2 + ((y - 0.05) / 0.35) ** 2 < 1)
    hu[lungs] = -850 + rng.normal(0, 40, lungs.sum())
    spine = body & ((x + 0.15) ** 2 + (y - 0.5) ** 2 < 0.02)
    hu[spine] = 1300 + rng.normal(0, 200, spine.sum())
    return hu.astype(np.float32)


def monai_reference(array, shape, modality):
    """Med-2E3's evaluation Compose, preceded by the M3D group's intensity steps for raw CT / MR."""
    steps = []
    if modality == "ct":
        steps.append(mt.ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True))
    if modality in ("ct", "mr"):
        steps.append(mt.ScaleIntensity(minv=0.0, maxv=1.0))
    steps += [mt.CropForeground(), mt.Resize(spatial_size=shape, mode="trilinear")]
    return np.asarray(mt.Compose(steps)(array[None]))


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------------------------------------------
# Whole preprocessing against MONAI.


@pytest.mark.parametrize(
    "source_shape, shape",
    [
        ((40, 70, 90), (16, 32, 48)),  # anisotropic, non-square; shrinks
        ((9, 20, 30), (16, 32, 48)),  # grows along every axis
        ((40, 70, 90), (16, 70, 40)),  # one axis kept, one grown, one shrunk
    ],
)
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_preprocessing_matches_monai_on_ct_rate_like_hu(source_shape, shape, modality):
    hu = body_ct(source_shape)
    box = foreground_box(hu_to_unit(hu))
    assert tuple(s.stop - s.start for s in box) < source_shape, "the crop must matter in this test"
    ours = preprocess_volume(Volume(hu, (1.5, 0.7, 0.7), "ct.nii.gz", "ct"), shape=shape, modality=modality)
    assert ours.dtype == np.float32 and ours.shape == (1, *shape)
    assert max_diff(ours, monai_reference(hu, shape, modality)) <= TOLERANCE


def test_preprocessing_matches_monai_at_the_model_size_quickly():
    hu = body_ct((48, 96, 120))
    start = time.perf_counter()
    ours = preprocess_volume(Volume(hu, None, "ct.nii.gz", "ct"), shape=(32, 256, 256), modality="ct")
    elapsed = time.perf_counter() - start
    assert max_diff(ours, monai_reference(hu, (32, 256, 256), "ct")) <= TOLERANCE
    assert elapsed < 2.0


@pytest.mark.parametrize("source_shape, shape", [((40, 70, 90), (16, 32, 48)), ((32, 64, 64), (32, 64, 64))])
def test_preprocessing_matches_monai_on_m3d_like_unit_volumes(source_shape, shape):
    unit = preprocess.min_max(hu_to_unit(body_ct(source_shape, seed=1)))
    unit[:, :3] = 0.0  # an empty border that the load-time crop removes
    ours = preprocess_volume(Volume(unit, None, "m3d.npy", "unit"), shape=shape)
    assert max_diff(ours, monai_reference(unit, shape, "unit")) <= TOLERANCE


def test_m3d_volume_at_the_model_size_passes_through_unchanged():
    unit = np.random.default_rng(0).uniform(0.01, 1.0, (32, 64, 64)).astype(np.float32)
    ours = preprocess_volume(Volume(unit, None, "m3d.npy", "unit"), shape=(32, 64, 64))
    np.testing.assert_array_equal(ours[0], unit)
    assert not np.shares_memory(ours, unit)


def test_foreground_edge_is_exact_for_hu_just_above_the_window_floor():
    # Fractional HU a hair above -1000 are foreground after windowing; -1000 itself and below are not.
    hu = np.full((12, 14, 16), -1000.0, dtype=np.float32)
    hu[3, 4, 5] = np.nextafter(np.float32(-1000), np.float32(0))
    hu[8, 10, 12] = -999.9
    hu[0, 0, 0] = -3000.0
    ours = preprocess_volume(Volume(hu, None, "edge.nii.gz", "ct"), shape=(8, 8, 8), modality="ct")
    assert max_diff(ours, monai_reference(hu, (8, 8, 8), "ct")) <= TOLERANCE
    assert foreground_box(min_max(hu_to_unit(hu))) == (slice(3, 9), slice(4, 11), slice(5, 13))


# ---------------------------------------------------------------------------------------------------
# Each readable step against its MONAI transform.


def test_hu_window_and_min_max_match_monai_scale_intensity():
    hu = body_ct((10, 20, 30))
    windowed = np.asarray(mt.ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True)(hu))
    np.testing.assert_array_equal(hu_to_unit(hu), windowed)
    np.testing.assert_allclose(min_max(hu), np.asarray(mt.ScaleIntensity(minv=0.0, maxv=1.0)(hu)), atol=1e-7, rtol=0)
    np.testing.assert_array_equal(min_max(np.full((3, 4, 5), 7.0)), np.zeros((3, 4, 5), np.float32))


def test_crop_foreground_matches_monai_defaults():
    volume = np.zeros((9, 10, 11), dtype=np.float32)
    volume[2, 3:5, 7] = 0.5
    volume[6, 8, 1] = 1e-30  # any positive value counts
    volume[7, 0, 0] = -1.0  # negative values do not
    expected = np.asarray(mt.CropForeground()(volume[None]))[0]
    np.testing.assert_array_equal(crop_foreground(volume), expected)
    assert crop_foreground(volume).shape == (5, 6, 7)


@pytest.mark.parametrize(
    "shape_in, shape_out", [((7, 9, 11), (3, 4, 5)), ((3, 4, 5), (7, 9, 11)), ((8, 512, 6), (8, 256, 6))]
)
def test_resize_matches_monai_trilinear(shape_in, shape_out):
    volume = np.random.default_rng(2).normal(size=(2, *shape_in)).astype(np.float32)
    expected = np.asarray(mt.Resize(spatial_size=shape_out, mode="trilinear")(volume))
    assert max_diff(resize(volume, shape_out), expected) <= 1e-6


def test_constant_volume_has_no_foreground_and_names_the_file():
    for hu, modality in [(np.full((4, 5, 6), 30.0, np.float32), "ct"), (np.full((4, 5, 6), -2000.0, np.float32), "ct")]:
        with pytest.raises(EmptyForegroundError, match="flat.nii.gz") as caught:
            preprocess_volume(Volume(hu, None, "flat.nii.gz", "ct"), shape=(4, 4, 4), modality=modality)
        assert caught.value.path == "flat.nii.gz"
    # Clipped to a constant by the window: everything at or above 1000 HU.
    bright = np.where(np.arange(120).reshape(4, 5, 6) % 2, 1500.0, 2500.0).astype(np.float32)
    with pytest.raises(EmptyForegroundError):
        preprocess_volume(Volume(bright, None, "bright.nii.gz", "ct"), shape=(4, 4, 4), modality="ct")
    with pytest.raises(EmptyForegroundError, match="zeros.npy"):
        preprocess_volume(Volume(np.zeros((4, 5, 6), np.float32), None, "zeros.npy", "unit"), shape=(4, 4, 4))


def test_unit_modality_rejects_values_outside_zero_one():
    hu = body_ct((6, 8, 8))
    with pytest.raises(IntensityRangeError, match="hu_as_m3d.npy"):
        preprocess_volume(Volume(hu, None, "hu_as_m3d.npy", "unit"), shape=(4, 4, 4))


# ---------------------------------------------------------------------------------------------------
# Augmentations.


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    volume = np.random.default_rng(3).random((1, 4, 6, 6), dtype=np.float32)
    first = augment(volume, seed=5, epoch=2, index=17)
    np.testing.assert_array_equal(first, augment(volume, seed=5, epoch=2, index=17))
    draws = [sample_augmentation(seed=5, epoch=epoch, index=index) for epoch in range(3) for index in range(20)]
    continuous = [d for d in draws if d.scale is not None or d.shift is not None]
    assert len(set(continuous)) == len(continuous) > 30
    assert len({(d.rotate_k, d.flips) for d in draws}) > 5
    assert sample_augmentation(seed=6, epoch=2, index=17) != sample_augmentation(seed=5, epoch=2, index=17)
    assert first.dtype == np.float32 and first.flags.c_contiguous


@pytest.mark.parametrize(
    "augmentation",
    [
        Augmentation(rotate_k=1),
        Augmentation(rotate_k=2, flips=(True, False, True)),
        Augmentation(rotate_k=3, flips=(False, True, False), scale=0.0731, shift=-0.0412),
        Augmentation(flips=(True, True, True), scale=-0.099),
        Augmentation(shift=0.05),
        Augmentation(),
    ],
)
def test_each_augmentation_matches_its_monai_transform(augmentation):
    volume = np.random.default_rng(4).random((1, 3, 5, 5), dtype=np.float32)
    expected = volume
    if augmentation.rotate_k:
        expected = mt.Rotate90(k=augmentation.rotate_k, spatial_axes=(1, 2))(expected)
    for axis, flip in enumerate(augmentation.flips):
        if flip:
            expected = mt.Flip(spatial_axis=axis)(expected)
    if augmentation.scale is not None:
        expected = mt.ScaleIntensity(minv=None, maxv=None, factor=augmentation.scale)(expected)
    if augmentation.shift is not None:
        expected = mt.ShiftIntensity(offset=augmentation.shift)(expected)
    np.testing.assert_array_equal(apply_augmentation(volume, augmentation), np.asarray(expected))


def test_rotation_turns_the_slice_plane_like_np_rot90():
    volume = np.arange(2 * 3 * 3, dtype=np.float32).reshape(1, 2, 3, 3)
    turned = apply_augmentation(volume, Augmentation(rotate_k=1))
    np.testing.assert_array_equal(turned[0, 1], np.rot90(volume[0, 1]))
    np.testing.assert_array_equal(apply_augmentation(volume, Augmentation(flips=(True, False, False))), volume[:, ::-1])


def test_augmentation_probabilities_and_ranges_follow_med2e3():
    draws = [sample_augmentation(seed=0, epoch=0, index=i) for i in range(4000)]
    rotations = np.array([d.rotate_k for d in draws])
    assert abs((rotations > 0).mean() - 0.5) < 0.04
    assert set(np.unique(rotations[rotations > 0])) == {1, 2, 3}
    assert np.all(np.abs(np.bincount(rotations)[1:] / (rotations > 0).sum() - 1 / 3) < 0.05)
    flips = np.array([d.flips for d in draws])
    assert np.all(np.abs(flips.mean(axis=0) - 0.1) < 0.02)
    scales = np.array([d.scale for d in draws if d.scale is not None])
    shifts = np.array([d.shift for d in draws if d.shift is not None])
    assert abs(len(scales) / 4000 - 0.5) < 0.04 and abs(len(shifts) / 4000 - 0.5) < 0.04
    assert np.all(np.abs(scales) <= 0.1) and np.all(np.abs(shifts) <= 0.1)
    assert abs(scales.mean()) < 0.01 and scales.std() > 0.05


def test_augment_refuses_non_square_slices_and_bad_keys():
    with pytest.raises(ValueError, match="square"):
        augment(np.zeros((1, 2, 3, 4), np.float32), seed=0, epoch=0, index=0)
    with pytest.raises(ValueError, match="index"):
        sample_augmentation(seed=0, epoch=0, index=-1)


# ---------------------------------------------------------------------------------------------------
# The real CTs (fetched by scripts/fetch_assets.py; skipped when absent).


@pytest.mark.parametrize(
    "name",
    ["example_ct.nii.gz", "example_ct_sm.nii.gz", "aorta_report/example_ct.nii.gz", "example_ct_dicom"],
)
def test_preprocessing_of_the_real_ct_matches_monai(name):
    from data_pipelines.assets import AssetError, asset_path
    from data_pipelines.readers import read_volume

    try:
        path = asset_path(f"totalsegmentator/{name}")
    except AssetError as error:
        pytest.skip(f"real CT not fetched: {error}")
    volume = read_volume(path)
    ours = preprocess_volume(volume, shape=(32, 256, 256), modality="ct")
    assert max_diff(ours, monai_reference(volume.array, (32, 256, 256), "ct")) <= TOLERANCE
    assert volume.array.min() < -1000 < volume.array.max()  # real air and tissue on both sides of the window
