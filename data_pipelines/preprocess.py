"""The authors' volume preprocessing and training augmentations, in numpy, equal to MONAI's transforms.

Evaluation — the intensity steps are the authors' group's preparation of raw CT (docs/data.md), the
crop and resize Med-2E3's load-time `Vision3DPreprocess`:

    CT   ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True)   `hu_to_unit`
         ScaleIntensity()  (min-max to [0, 1])                                        `min_max`
         CropForeground()  (bounding box of voxels > 0, margin 0)                     `crop_foreground`
         Resize((32, 256, 256), mode="trilinear")                                     `resize`
    MR   min-max, crop, resize
    unit crop, resize — M3D's `.npy` are stored already normalised; Med-2E3 crops and resizes them again
         at load time, which is a no-op for a (32, 256, 256) volume without an empty border.

Training adds, in this order (Med-2E3's train Compose): RandRotate90(p=0.5, in-plane), RandFlip(p=0.1)
on each of the three axes, RandScaleIntensity(0.1, p=0.5), RandShiftIntensity(0.1, p=0.5) — see
`augment`, whose randomness is a function of (seed, epoch, index) only.

`hu_to_unit`, `min_max`, `crop_foreground` and `resize` are the readable definitions; `preprocess_volume`
computes their composition without materialising the intermediates: the intensity map is monotone, so
the foreground box is found on the raw volume in one cache-blocked pass, and the intensity map is then
applied only to the slices the depth interpolation reads. The tests hold both to MONAI.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from data_pipelines.errors import EmptyForegroundError, IntensityRangeError
from data_pipelines.readers import Volume

MODALITIES = ("ct", "mr", "unit", "auto")
# M3D's volumes are min-max normalised floats; allow their rounding, not data in another unit.
UNIT_RANGE_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------
# The transforms, one by one.


def hu_to_unit(array: np.ndarray, window: Sequence[float] = (-1000.0, 1000.0)) -> np.ndarray:
    """MONAI ScaleIntensityRange(a_min, a_max, b_min=0, b_max=1, clip=True): HU window → [0, 1], float32."""
    lo, width = _window(window)
    out = np.subtract(array, lo, dtype=np.float32)
    out /= width
    return np.clip(out, 0.0, 1.0, out=out)


def min_max(array: np.ndarray) -> np.ndarray:
    """MONAI ScaleIntensity(minv=0, maxv=1): (x - min) / (max - min), float32; a constant volume → zeros."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = array.min(), array.max()
    if hi == lo:
        return np.zeros_like(array)
    out = array - lo
    out /= hi - lo
    return out


def foreground_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """MONAI CropForeground's box with its defaults: the smallest box holding every voxel > 0, or None."""
    _, highs, plane_max = _blocked_extrema(np.asarray(array))
    return _box_from_projections(highs, plane_max, lambda values: values > 0)


def crop_foreground(array: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """MONAI CropForeground() on a (depth, height, width) array (a view); raises EmptyForegroundError."""
    box = foreground_box(array)
    if box is None:
        raise EmptyForegroundError(
            f"{source or 'volume'}: no voxel > 0 after normalisation: nothing to crop to", path=source
        )
    return array[box]


def resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """MONAI Resize(shape, mode="trilinear") = torch interpolate(align_corners=False), float32.

    Resizes the last len(shape) axes (leading axes are channels); like MONAI, returns the input (as
    float32) when the shape already matches, and applies no anti-aliasing.
    """
    array = np.asarray(array, dtype=np.float32)
    shape = tuple(int(n) for n in shape)
    if array.ndim < len(shape) or min(shape) < 1:
        raise ValueError(f"cannot resize an array of shape {array.shape} to {shape}")
    return _resize(array, shape)


# ---------------------------------------------------------------------------------------------------
# The composition, as the pipeline runs it.


def preprocess_volume(
    volume: Volume,
    *,
    shape: Sequence[int] = (32, 256, 256),
    modality: str = "auto",
    window: Sequence[float] = (-1000.0, 1000.0),
) -> np.ndarray:
    """The evaluation transform of one volume: float32 (1, depth, height, width) = (1, *shape).

    modality: 'ct' (HU window, min-max), 'mr' (min-max), 'unit' (values already in [0, 1]; checked) —
    each then cropped to the foreground and resized; 'auto' takes `volume.modality_hint`.
    Raises EmptyForegroundError (constant volume) and IntensityRangeError ('unit' data outside [0, 1]),
    naming `volume.source`.
    """
    if modality == "auto":
        modality = volume.modality_hint
    if modality not in MODALITIES[:3]:
        raise ValueError(f"modality {modality!r}; expected one of {MODALITIES}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape {shape}: expected (depth, height, width) of positive sizes")
    # float32 first: the foreground threshold below is exact for float32 values.
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"{volume.source}: volume array of shape {array.shape}; expected (depth, height, width)")

    lows, highs, plane_max = _blocked_extrema(array)
    low, high = lows.min(), highs.max()
    intensity = _intensity_map(modality, low, high, window, volume.source)
    threshold = _foreground_threshold(intensity, low, high)
    if threshold is None:
        raise EmptyForegroundError(
            f"{volume.source}: no voxel > 0 after {modality} normalisation (values {low:g}..{high:g}): "
            "a constant volume has no foreground to crop to",
            path=volume.source,
        )
    box = _box_from_projections(highs, plane_max, lambda values: values >= threshold)
    cropped = array[box]

    # Interpolating depth first lets the intensity map run on the slices the interpolation reads only.
    taps = _linear_taps(cropped.shape[0], shape[0])
    if taps is None:
        slab = intensity(cropped, scratch=False)
    else:
        needed = np.unique(np.concatenate([taps.lower, taps.upper]))
        slab = intensity(np.asarray(cropped[needed], dtype=np.float32), scratch=True)
        local = np.searchsorted(needed, np.arange(cropped.shape[0]))
        slab = _interpolate_axis(slab, 0, taps._replace(lower=local[taps.lower], upper=local[taps.upper]))
    return _resize(slab, shape)[None]


# ---------------------------------------------------------------------------------------------------
# Training augmentations.


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One draw of the training augmentations.

    rotate_k: quarter turns in the (height, width) plane (0 = RandRotate90 not applied), torch/np.rot90.
    flips: RandFlip applied along (depth, height, width).
    scale: RandScaleIntensity's factor (x * (1 + scale)), or None when not applied.
    shift: RandShiftIntensity's offset (x + shift), or None when not applied.
    """

    rotate_k: int = 0
    flips: tuple[bool, bool, bool] = (False, False, False)
    scale: float | None = None
    shift: float | None = None


ROTATE_PROB, FLIP_PROB, SCALE_PROB, SHIFT_PROB = 0.5, 0.1, 0.5, 0.5
SCALE_RANGE, SHIFT_RANGE = 0.1, 0.1


def sample_augmentation(*, seed: int, epoch: int, index: int) -> Augmentation:
    """The augmentation of record `index` in `epoch`: the same wherever and whenever it is drawn."""
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name}={value!r}: augmentation keys are non-negative integers")
    rng = np.random.default_rng((int(seed), int(epoch), int(index)))
    rotate_k = int(rng.integers(1, 4)) if rng.random() < ROTATE_PROB else 0
    flips = tuple(bool(rng.random() < FLIP_PROB) for _ in range(3))
    scale = float(rng.uniform(-SCALE_RANGE, SCALE_RANGE)) if rng.random() < SCALE_PROB else None
    shift = float(rng.uniform(-SHIFT_RANGE, SHIFT_RANGE)) if rng.random() < SHIFT_PROB else None
    return Augmentation(rotate_k=rotate_k, flips=flips, scale=scale, shift=shift)


def apply_augmentation(array: np.ndarray, augmentation: Augmentation) -> np.ndarray:
    """Apply one draw to a (1, depth, height, width) volume, in Med-2E3's order; float32, C-contiguous."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 4:
        raise ValueError(f"augmentation needs a (1, depth, height, width) volume, got shape {array.shape}")
    out = array
    if augmentation.rotate_k:
        out = np.rot90(out, augmentation.rotate_k, axes=(2, 3))
    flip_axes = tuple(axis + 1 for axis, flip in enumerate(augmentation.flips) if flip)
    if flip_axes:
        out = np.flip(out, axis=flip_axes)
    if augmentation.scale is not None:
        out = out * np.float32(1.0 + augmentation.scale)
    if augmentation.shift is not None:
        out = out + np.float32(augmentation.shift)
    if out is array:
        return array.copy()
    return np.ascontiguousarray(out)


def augment(array: np.ndarray, *, seed: int, epoch: int, index: int) -> np.ndarray:
    """Med-2E3's training augmentations of a (1, depth, height, width) volume, deterministic in (seed, epoch, index).

    RandRotate90 turns the (height, width) plane, so it needs square slices to keep batch shapes static.
    """
    if array.ndim == 4 and array.shape[2] != array.shape[3]:
        raise ValueError(f"in-plane rotation needs square slices to keep a static shape, got {array.shape}")
    return apply_augmentation(array, sample_augmentation(seed=seed, epoch=epoch, index=index))


# ---------------------------------------------------------------------------------------------------
# Trilinear resize as three separable 1-D passes.


class _Taps(NamedTuple):
    """Per output index: the two input indices and their weights (torch's align_corners=False rule)."""

    lower: np.ndarray
    upper: np.ndarray
    lower_weight: np.ndarray
    upper_weight: np.ndarray


@functools.lru_cache(maxsize=256)
def _linear_taps(size_in: int, size_out: int) -> _Taps | None:
    """None when the axis keeps its size (torch's weights are then exactly 1 and 0)."""
    if size_in == size_out:
        return None
    # float32 throughout, like torch's CPU kernel for float32 input.
    scale = np.float32(size_in) / np.float32(size_out)
    source = scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    lower = source.astype(np.int64)
    upper_weight = (source - lower.astype(np.float32)).astype(np.float32)
    upper = np.minimum(lower + 1, size_in - 1)
    lower_weight = (np.float32(1.0) - upper_weight).astype(np.float32)
    taps = _Taps(lower, upper, lower_weight, upper_weight)
    for part in taps:
        part.flags.writeable = False
    return taps


def _resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    lead = array.ndim - len(shape)
    # Shrink the most-reduced axis first so that later passes touch fewer voxels.
    axes = sorted(range(len(shape)), key=lambda a: shape[a] / array.shape[lead + a])
    for axis in axes:
        taps = _linear_taps(array.shape[lead + axis], shape[axis])
        if taps is not None:
            array = _interpolate_axis(array, lead + axis, taps)
    return array


def _interpolate_axis(array: np.ndarray, axis: int, taps: _Taps) -> np.ndarray:
    """lower_weight·array[lower] + upper_weight·array[upper] along `axis`, as strided views when regular."""
    if axis == 0:
        return _interpolate_first_axis(array, taps)
    lower = _gather(array, axis, taps.lower)
    upper = _gather(array, axis, taps.upper)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = -1
    out = _weighted(lower, array, _weights(taps.lower_weight, weight_shape))
    out += _weighted(upper, array, _weights(taps.upper_weight, weight_shape))
    return out


def _weighted(gathered: np.ndarray, source: np.ndarray, weight) -> np.ndarray:
    """gathered·weight in float32; in place when `gathered` is a float32 copy rather than a view of
    `source`: a fresh volume-sized buffer fewer, whose page faults cost as much as the arithmetic."""
    if gathered.dtype == np.float32 and not np.may_share_memory(gathered, source):
        return np.multiply(gathered, weight, out=gathered)
    return np.multiply(gathered, weight, dtype=np.float32)


def _interpolate_first_axis(array: np.ndarray, taps: _Taps) -> np.ndarray:
    # Slab by slab: reads the two source slabs in place instead of gathering copies of them.
    out = np.empty((len(taps.lower), *array.shape[1:]), dtype=np.float32)
    scratch = np.empty(array.shape[1:], dtype=np.float32)
    for k, (lower, upper, lower_weight, upper_weight) in enumerate(zip(*taps)):
        np.multiply(array[lower], lower_weight, out=out[k])
        np.multiply(array[upper], upper_weight, out=scratch)
        out[k] += scratch
    return out


def _gather(array: np.ndarray, axis: int, indices: np.ndarray) -> np.ndarray:
    # Integer shrink factors give evenly spaced indices: a strided view instead of a copy.
    index = [slice(None)] * array.ndim
    step = int(indices[1] - indices[0]) if len(indices) > 1 else 1
    if step > 0 and np.array_equal(indices, indices[0] + step * np.arange(len(indices))):
        index[axis] = slice(int(indices[0]), int(indices[-1]) + 1, step)
        return array[tuple(index)]
    return np.take(array, indices, axis=axis)


def _weights(weights: np.ndarray, shape: list[int]):
    if np.all(weights == weights[0]):
        return weights[0]
    return weights.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# The foreground box without materialising the normalised volume.


def _blocked_extrema(array: np.ndarray, block_bytes: int = 1 << 22):
    """Per-slice minima and maxima and the maximum over slices of each in-plane voxel, in one pass."""
    depth = array.shape[0]
    step = max(1, block_bytes // max(1, array[0].nbytes))
    lows = np.empty(depth, dtype=array.dtype)
    highs = np.empty(depth, dtype=array.dtype)
    plane_max = None
    for start in range(0, depth, step):
        block = array[start : start + step]
        block.min(axis=(1, 2), out=lows[start : start + step])
        block.max(axis=(1, 2), out=highs[start : start + step])
        block_max = block.max(axis=0)
        plane_max = block_max if plane_max is None else np.maximum(plane_max, block_max, out=plane_max)
    return lows, highs, plane_max


def _intensity_map(modality: str, low, high, window, source) -> Callable[..., np.ndarray]:
    """The per-voxel normalisation as `f(x, scratch)` on float32 arrays; writes into x only if scratch."""
    if modality == "unit":
        if low < -UNIT_RANGE_TOLERANCE or high > 1 + UNIT_RANGE_TOLERANCE:
            raise IntensityRangeError(
                f"{source}: values {low:g}..{high:g} are not normalised to [0, 1]; read it as modality 'ct' or 'mr'",
                path=source,
            )
        return lambda x, scratch=False: x if scratch else np.array(x, dtype=np.float32)

    lo, width = _window(window) if modality == "ct" else (None, None)

    def windowed(x, scratch):
        if lo is None:
            return x if scratch else np.array(x, dtype=np.float32)
        out = np.subtract(x, lo, out=x) if scratch else np.subtract(x, lo, dtype=np.float32)
        out /= width
        return np.clip(out, 0.0, 1.0, out=out)

    # The window is monotone, so the windowed volume's extrema are the window of the raw ones.
    w_low, w_high = windowed(np.array([low, high], dtype=np.float32), True)
    w_range = np.float32(w_high - w_low)

    def normalised(x, scratch=False):
        out = windowed(x, scratch)
        if w_range == 0:
            out[...] = 0.0
            return out
        out -= w_low
        out /= w_range
        return out

    return normalised


def _foreground_threshold(intensity, low, high):
    """The least float32 t with intensity(t) > 0, so that foreground ⇔ raw >= t; None if there is none.

    Every step of the intensity map (subtract, divide by a positive number, clip) is monotone under
    IEEE rounding, so the foreground is an up-set of raw values and one threshold describes it exactly.
    """

    def positive(value) -> bool:
        return bool(intensity(np.array([value], dtype=np.float32))[0] > 0)

    if not positive(high):
        return None
    if positive(low):
        return np.float32(low)
    below, above = _ordered(low), _ordered(high)  # positive(below) is False, positive(above) is True
    while above - below > 1:
        middle = (above + below) // 2
        if positive(_from_ordered(middle)):
            above = middle
        else:
            below = middle
    return _from_ordered(above)


def _ordered(value) -> int:
    """float32 → int with the same order (adjacent floats are adjacent ints)."""
    bits = int(np.array([value], dtype=np.float32).view(np.int32)[0])
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_ordered(key: int) -> np.float32:
    bits = key if key >= 0 else (-key) | 0x80000000
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _box_from_projections(highs, plane_max, is_foreground) -> tuple[slice, slice, slice] | None:
    """The box from per-slice maxima and the in-plane maximum; `is_foreground` is monotone in the value."""
    depth = np.flatnonzero(is_foreground(highs))
    if depth.size == 0:
        return None
    # Slices outside the depth range have nothing at or above the threshold, so the in-plane maximum
    # over all slices gives the same box as over the kept ones.
    rows = np.flatnonzero(is_foreground(plane_max.max(axis=1)))
    cols = np.flatnonzero(is_foreground(plane_max.max(axis=0)))
    return (
        slice(int(depth[0]), int(depth[-1]) + 1),
        slice(int(rows[0]), int(rows[-1]) + 1),
        slice(int(cols[0]), int(cols[-1]) + 1),
    )


def _window(window: Sequence[float]) -> tuple[np.float32, np.float32]:
    """(a_min, a_max - a_min) as float32, the way MONAI's python floats reach a float32 tensor."""
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"HU window {tuple(window)}: the upper bound must exceed the lower")
    return np.float32(lo), np.float32(hi - lo)
