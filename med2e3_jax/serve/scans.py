"""A CT as the viewer holds it, its three planes under a window preset, and the embedded scans.

A `Scan` keeps two arrays on one grid of slices: the model's input (`preprocess_volume`: foreground
crop, HU window, resize to the model's (slices, height, width)) and, for display, the same cropped
volume in HU, resized along depth to the model's slices and in plane to at most `MAX_INPLANE` pixels.
Axial slice k of the page is therefore the model's slice k, the one slice score k is about.

A `.npy` in M3D's layout is already in [0, 1]: it is shown as if its values were the model's HU window
(−1000…1000 HU), so the presets are approximate on it (`Scan.calibrated` is False).

The embedded scans: phantoms written by `data_pipelines.synthetic` into the server's own folder (the
quick start's contrast-enhanced set, from another seed than the quick start's training phantoms), the
model reading their `.npy` as the quick start trained it, the page showing their NIfTI in HU; and the two
real CTs of the fetched TotalSegmentator assets, when they are there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from data_pipelines.model_inputs import InputSpec
from data_pipelines.preprocess import preprocess_volume, resize
from data_pipelines.readers import Volume, read_volume

MAX_INPLANE = 256  # pixels along the longer in-plane axis of the display copy
VIEW_PIXELS = 384  # views of smaller scans are enlarged by a whole factor towards this many pixels
# Window presets (low, high) in HU: the usual lung, soft-tissue and bone windows, and the model's own.
WINDOWS = {
    "lung": (-1350.0, 150.0),
    "soft tissue": (-160.0, 240.0),
    "bone": (-500.0, 1300.0),
    "model (-1000…1000 HU)": (-1000.0, 1000.0),
}
MODEL_WINDOW = "model (-1000…1000 HU)"
CROSSHAIR = np.array([255, 200, 0], np.uint8)  # where the other two planes cut this one
PHANTOM_SEED = 1  # the quick start trains on seed 0's phantoms
PHANTOM_PREFIX = "phantom"
REAL_CTS = {  # page name -> path under the asset cache
    "real CT: TotalSegmentator abdomen (NIfTI)": "totalsegmentator/example_ct_sm.nii.gz",
    "real CT: TotalSegmentator chest (DICOM series)": "totalsegmentator/example_ct_dicom",
}


@dataclasses.dataclass(frozen=True)
class Scan:
    """One loaded CT.

    Attributes:
      name: what the page calls it (an embedded scan's name, an upload's file name).
      model_volume: (1, slices, height, width) float32 in [0, 1], the model's input.
      display: (slices, rows, columns) float32 HU (see `calibrated`), slice k = the model's slice k.
      slice_aspect: the height of one displayed slice over the width of one pixel (coronal and sagittal
        views are stretched by it); 1 where the file has no geometry (`.npy`).
      calibrated: `display` is HU read from the file (False: a [0, 1] volume mapped onto the model's
        window).
      note: what the page says about the scan besides its shape (e.g. an embedded phantom's findings).
      questions: suggested questions (an embedded phantom's own VQA questions).
    """

    name: str
    model_volume: np.ndarray
    display: np.ndarray
    slice_aspect: float = 1.0
    calibrated: bool = True
    note: str = ""
    questions: tuple[str, ...] = ()

    @property
    def slices(self) -> int:
        return int(self.display.shape[0])

    def summary(self) -> str:
        slices, rows, columns = self.display.shape
        units = "HU" if self.calibrated else "[0, 1] shown on the model's window"
        return f"{self.name}: {slices} slices of {rows} × {columns} ({units})"


def scan_from_volumes(name: str, model_source: Volume, spec: InputSpec, *, display_source: Volume | None = None,
                      note: str = "", questions: Sequence[str] = ()) -> Scan:
    """A Scan from read volumes: the model's input from `model_source`, the display copy from
    `display_source` (default the same volume; it must lie in the same frame)."""
    model_volume = np.ascontiguousarray(
        preprocess_volume(model_source, shape=spec.volume_shape, modality=spec.modality, window=spec.hu_window),
        np.float32)
    display_source = display_source or model_source
    modality = display_source.modality_hint if spec.modality == "auto" else spec.modality
    from data_pipelines.real_ct import model_crop  # the box `preprocess_volume` crops to

    box = model_crop(display_source, modality=modality, window=spec.hu_window)
    cropped = display_source.array[box]
    calibrated = modality == "ct"
    if not calibrated:
        # [0, 1] (or min-max for MR) onto the model's HU window, so that the presets still apply.
        low, high = spec.hu_window
        finite_min, finite_max = float(cropped.min()), float(cropped.max())
        if modality == "mr" and finite_max > finite_min:
            cropped = (cropped - finite_min) / (finite_max - finite_min)
        cropped = low + np.asarray(cropped, np.float32) * (high - low)
    slices = spec.volume_shape[0]
    rows, columns = cropped.shape[1:]
    scale = min(1.0, MAX_INPLANE / max(rows, columns))
    shape = (slices, max(1, round(rows * scale)), max(1, round(columns * scale)))
    display = np.ascontiguousarray(resize(cropped, shape), np.float32)
    aspect = 1.0
    if display_source.spacing is not None:
        depth_mm = cropped.shape[0] * display_source.spacing[0] / slices
        column_mm = columns * display_source.spacing[2] / shape[2]
        aspect = depth_mm / column_mm
    return Scan(name, model_volume, display, float(aspect), calibrated, note, tuple(questions))


def read_scan(path: str | os.PathLike, spec: InputSpec, *, name: str | None = None,
              display_path: str | os.PathLike | None = None, note: str = "",
              questions: Sequence[str] = ()) -> Scan:
    """The Scan of a `.npy`, `.nii` / `.nii.gz` file or DICOM series directory, read within
    `spec.limits`; raises the readers' errors (`data_pipelines.errors.DataError`) as they are."""
    model_source = read_volume(path, limits=spec.limits)
    display_source = read_volume(display_path, limits=spec.limits) if display_path else None
    return scan_from_volumes(name or pathlib.Path(path).name, model_source, spec, display_source=display_source,
                             note=note, questions=questions)


# ---------------------------------------------------------------------------------------------------
# The three planes.


def window_image(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """(rows, columns) HU -> uint8 grey levels, `window` = (low, high) HU mapped to 0…255."""
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"window must be (low, high) with low < high, got {tuple(window)}")
    scaled = (np.asarray(hu, np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _stretch_rows(image: np.ndarray, aspect: float) -> np.ndarray:
    """Repeats the rows of a (slices, width, 3) image so that a slice is `aspect` pixels high."""
    slices = image.shape[0]
    height = max(slices, round(slices * aspect))
    rows = np.minimum((np.arange(height) + 0.5) * slices / height, slices - 1).astype(int)
    return image[rows]


def _mark_slice(image: np.ndarray, index: int, height: int) -> np.ndarray:
    """Draws the crosshair colour over the rows of `image` that show slice `index` of `height`."""
    rows = image.shape[0]
    first, last = int(index * rows / height), max(int(index * rows / height) + 1, int((index + 1) * rows / height))
    image[first:last] = (0.5 * image[first:last] + 0.5 * CROSSHAIR).astype(np.uint8)
    return image


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def plane_positions(scan: Scan) -> tuple[int, int, int]:
    """The number of axial, coronal and sagittal positions: slices, rows, columns of the display copy."""
    return tuple(int(n) for n in scan.display.shape)


def render_views(scan: Scan, window: str | Sequence[float], axial: int, coronal: int, sagittal: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial, coronal and sagittal images, uint8 (height, width, 3), each crossed where the other two
    planes cut it, enlarged by one whole factor towards VIEW_PIXELS. Positions are clipped to the scan;
    `window` is a WINDOWS name or (low, high) HU."""
    low_high = WINDOWS[window] if isinstance(window, str) else window
    slices, rows, columns = plane_positions(scan)
    axial, coronal, sagittal = (int(np.clip(p, 0, n - 1)) for p, n in
                                ((axial, slices), (coronal, rows), (sagittal, columns)))
    axial_image = _rgb(window_image(scan.display[axial], low_high))
    axial_image[coronal] = (0.5 * axial_image[coronal] + 0.5 * CROSSHAIR).astype(np.uint8)
    axial_image[:, sagittal] = (0.5 * axial_image[:, sagittal] + 0.5 * CROSSHAIR).astype(np.uint8)
    coronal_image = _stretch_rows(_rgb(window_image(scan.display[:, coronal, :], low_high)), scan.slice_aspect)
    sagittal_image = _stretch_rows(_rgb(window_image(scan.display[:, :, sagittal], low_high)), scan.slice_aspect)
    images = axial_image, _mark_slice(coronal_image, axial, slices), _mark_slice(sagittal_image, axial, slices)
    # Enlarged here, pixel for pixel: the browser would smooth a small image into a blur.
    factor = max(1, VIEW_PIXELS // max(rows, columns))
    return tuple(np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) for image in images)


# ---------------------------------------------------------------------------------------------------
# The embedded scans.


def write_phantoms(folder: str | os.PathLike, spec: InputSpec, *, num: int, seed: int = PHANTOM_SEED
                   ) -> dict[str, Callable[[], Scan]]:
    """Writes `num` phantoms into `folder` (their `.npy` at the model's resolution, their NIfTI in HU)
    and returns a loader per page name."""
    from data_pipelines import synthetic

    folder = pathlib.Path(folder)
    truth = synthetic.generate(folder, num=num, seed=seed, shape=spec.volume_shape, formats=("npy", "nifti"),
                               choice_order="natural", contrast="enhanced")
    questions: dict[str, list[str]] = {}
    for name in ("vqa_open_train.json", "vqa_open_val.json", "vqa_open_test.json"):
        path = folder / "annotations" / "npy" / name
        if path.exists():
            for record in json.loads(path.read_text()):
                questions.setdefault(pathlib.Path(record["vision3d"][0]).stem, []).append(record["question"])
    loaders = {}
    for entry in truth["volumes"]:
        findings = [f"{f['kind']} lesion in the {f['organ']} (slices {f['slices'][0]}–{f['slices'][1]})"
                    for f in entry["findings"]]
        note = "findings: " + ("; ".join(findings) if findings else "none")
        label = f"{PHANTOM_PREFIX} {entry['id'].split('_')[-1]} ({len(findings)} lesion{'s' * (len(findings) != 1)})"
        loaders[label] = _loader(folder / entry["files"]["npy"], spec, name=label,
                                 display_path=folder / entry["files"]["nifti"], note=note,
                                 questions=tuple(questions.get(entry["id"], ())[:3]))
    return loaders


def real_ct_loaders(spec: InputSpec, cache: str | None = None) -> dict[str, Callable[[], Scan]]:
    """A loader per fetched real CT (none where the assets were not fetched)."""
    from data_pipelines.assets import AssetError, asset_path

    loaders = {}
    for label, name in REAL_CTS.items():
        try:
            path = asset_path(name, cache)
        except AssetError:
            continue
        loaders[label] = _loader(path, spec, name=label, note="TotalSegmentator's example scan (real CT)")
    return loaders


def _loader(path, spec: InputSpec, **kwargs) -> Callable[[], Scan]:
    return lambda: read_scan(path, spec, **kwargs)


def embedded_scans(folder: str | os.PathLike, spec: InputSpec, *, phantoms: int, cache: str | None = None
                   ) -> Mapping[str, Callable[[], Scan]]:
    """The phantoms (written into `folder`) and the real CTs, by page name, in the page's order."""
    loaders = write_phantoms(folder, spec, num=phantoms) if phantoms else {}
    return {**loaders, **real_ct_loaders(spec, cache)}
