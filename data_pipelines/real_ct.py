"""A grounded VQA set on real CT: every answer and slice range read off TotalSegmentator's organ labels.

The TotalSegmentator source distribution (fetched by `scripts/fetch_assets.py`) holds two real CTs with a
label map of TotalSegmentator's `total` task aligned to each, voxel for voxel:

- `totalseg_abdomen`: `example_ct_sm.nii.gz` (122 × 101 × 30 voxels of 3 mm, RAS on disk) labelled by
  `example_seg.nii.gz`. Its voxels are the top (most superior) 30 slices of `example_ct.nii.gz` — the
  first 30 in the readers' frame, the last 30 (k = 92…121) on disk — but its header carries `example_ct`'s
  affine unchanged, origin included, so in world coordinates it would overlay the *bottom* 30 slices of
  `example_ct`. The labels fit `example_ct_sm`'s voxels only; a label map is refused unless its shape and
  affine equal its volume's.
- `totalseg_dicom`: the 20-slice JPEG 2000 DICOM series `example_ct_dicom/` (512², 2 mm) labelled by
  `example_seg_dicom.nii.gz` (LAS on disk); checked by shape and spacing in the canonical frame.

Both are read with the pipeline's readers into its frame (axis 0 superior → inferior, so "upper" is
superior, as in `synthetic.py`). Questions, about the organs of `ORGANS`:

- location (closed, four choices, and open): "Which part of the volume holds the liver?" — which thirds
  of the model's slices the organ spans (`synthetic.location_words`), or "not in the scan";
- largest (closed and open): "Which of these organs is largest in this scan?" over four organs present,
  by their volume in the scan, drawn only where the largest is at least `LARGEST_MARGIN` times the second;
- presence (open, yes/no): "Is the pancreas in this scan?", as many absent organs as present ones when
  the scan allows.

An organ is present when its label covers at least `MIN_ORGAN_ML` and absent when it covers no voxel;
one in between is not asked about.

Slice ranges live on the model grid: `slices` (32) slices after the pipeline's own geometry — the
foreground crop of `preprocess_volume` (CT: HU window, min-max, voxels > 0) and the trilinear resize along
depth. Model slice k shows an organ when at least half of its interpolation weight comes from cropped
source slices holding the organ (for a resize along depth: the source slice nearest to k's centre,
ties counted as showing it); `answer_slices` is the inclusive [first, last] of those slices. An organ
with voxels in the scan but on no model slice (possible when shrinking) is asked about nowhere.

Output (image_root = `out`), in the layout of `synthetic.py`:
    nifti/totalseg_abdomen.nii.gz  dicom/totalseg_dicom/  (copies of the fetched files)  ground_truth.json
    annotations/source/test.json  annotations/source/{vqa_closed,vqa_open}_test.json

Command line: `med2e3-real-ct` (med2e3_jax/cli/real_ct.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
from collections.abc import Sequence

import numpy as np

from data_pipelines.assets import asset_path
from data_pipelines.preprocess import foreground_box, hu_to_unit, min_max, resize
from data_pipelines.readers import Volume, read_nifti, read_volume
from data_pipelines.synthetic import (
    HU_WINDOW,
    LOCATIONS,
    QUESTION_TYPES,
    _Question,
    _record,
    _write_json,
    closed_record,
    deal_letters,
    location_words,
)

log = logging.getLogger(__name__)

SPLIT = "test"
FORMAT = "source"  # annotations/<FORMAT>/: the volumes as fetched (NIfTI and DICOM, HU)
NOT_IN_SCAN = "not in the scan"
LARGEST_MARGIN = 1.25
# Below this an organ's label is a few stray voxels (example_seg marks one voxel of the right lung's middle
# lobe): such an organ is neither asked about as present nor as absent.
MIN_ORGAN_ML = 1.0
LARGEST_QUESTIONS = 4  # per case, at most

# TotalSegmentator `total` task (v2): label id and the words the questions use. Organs only (no bones,
# muscles or vessels but the two largest), so that each question has one plain-English subject.
ORGANS = {
    "spleen": (1, "spleen"),
    "kidney_right": (2, "right kidney"),
    "kidney_left": (3, "left kidney"),
    "gallbladder": (4, "gallbladder"),
    "liver": (5, "liver"),
    "stomach": (6, "stomach"),
    "pancreas": (7, "pancreas"),
    "adrenal_gland_right": (8, "right adrenal gland"),
    "adrenal_gland_left": (9, "left adrenal gland"),
    "lung_upper_lobe_left": (10, "upper lobe of the left lung"),
    "lung_lower_lobe_left": (11, "lower lobe of the left lung"),
    "lung_upper_lobe_right": (12, "upper lobe of the right lung"),
    "lung_middle_lobe_right": (13, "middle lobe of the right lung"),
    "lung_lower_lobe_right": (14, "lower lobe of the right lung"),
    "esophagus": (15, "esophagus"),
    "trachea": (16, "trachea"),
    "thyroid_gland": (17, "thyroid gland"),
    "small_bowel": (18, "small bowel"),
    "duodenum": (19, "duodenum"),
    "colon": (20, "colon"),
    "urinary_bladder": (21, "urinary bladder"),
    "prostate": (22, "prostate"),
    "heart": (51, "heart"),
    "aorta": (52, "aorta"),
    "inferior_vena_cava": (63, "inferior vena cava"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One real CT and the label map aligned to it (paths under the asset cache)."""

    id: str
    volume: str  # a NIfTI file or a DICOM series directory
    labels: str  # a NIfTI label map of TotalSegmentator's `total` task
    folder: str  # where the copy goes under the output folder: "nifti" or "dicom"


CASES = (
    Case("totalseg_abdomen", "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", "nifti"),
    Case("totalseg_dicom", "totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz", "dicom"),
)


class MaskAlignmentError(ValueError):
    """A label map does not lie voxel for voxel on its volume; the message names both files."""


# ---------------------------------------------------------------------------------------------------
# Masks on the model grid.


@dataclasses.dataclass(frozen=True)
class OrganExtent:
    """Where one organ is. voxels, volume_ml: its size in the source volume; source_slices / model_slices:
    inclusive [first, last] along the canonical depth axis of the source volume / of the model's `slices`
    slices (None: on none of them)."""

    voxels: int
    volume_ml: float
    source_slices: tuple[int, int] | None
    model_slices: tuple[int, int] | None


def read_case(case: Case, cache: str | None = None) -> tuple[Volume, np.ndarray]:
    """The volume (HU, canonical frame) and its label map ((depth, height, width) int32, same frame),
    after checking that they are aligned."""
    volume_path, labels_path = asset_path(case.volume, cache), asset_path(case.labels, cache)
    volume = read_volume(volume_path)
    labels = read_nifti(labels_path)
    if volume.array.shape != labels.array.shape or not np.allclose(volume.spacing, labels.spacing, rtol=1e-4):
        hint = ""
        if os.path.basename(volume_path) == "example_ct.nii.gz":
            hint = (" TotalSegmentator's example_seg*.nii.gz label example_ct_sm.nii.gz, the top 30 slices of "
                    "example_ct.nii.gz, not example_ct.nii.gz itself.")
        raise MaskAlignmentError(
            f"{labels_path}: label map of shape {labels.array.shape}, spacing {labels.spacing} mm (depth, height, "
            f"width, canonical frame) does not fit {volume_path}: shape {volume.array.shape}, spacing "
            f"{volume.spacing} mm.{hint}"
        )
    if os.path.isfile(volume_path):
        import nibabel as nib

        volume_affine, labels_affine = nib.load(volume_path).affine, nib.load(labels_path).affine
        if not np.allclose(volume_affine, labels_affine, atol=1e-3):
            raise MaskAlignmentError(
                f"{labels_path}: affine\n{labels_affine}\ndiffers from that of {volume_path}:\n{volume_affine}"
            )
    values = labels.array
    if values.min() < 0 or not np.array_equal(values, np.round(values)):
        raise MaskAlignmentError(f"{labels_path}: not a label map (values must be non-negative integers)")
    return volume, values.astype(np.int32)


def model_crop(volume: Volume, *, modality: str = "auto", window: Sequence[float] = HU_WINDOW):
    """The (depth, height, width) slices of `volume` that `preprocess_volume` crops it to."""
    modality = volume.modality_hint if modality == "auto" else modality
    normalised = {
        "ct": lambda a: min_max(hu_to_unit(a, window)),
        "mr": min_max,
        "unit": lambda a: a,
    }[modality](volume.array)
    box = foreground_box(normalised)
    if box is None:
        raise ValueError(f"{volume.source}: nothing to crop to: no voxel > 0 after {modality} normalisation")
    return box


def model_slice_mask(present: np.ndarray, slices: int) -> np.ndarray:
    """(slices,) bool: the model slices showing what `present` ((cropped depth,) bool) marks, i.e. those
    that take at least half their weight from marked source slices in the pipeline's depth resize."""
    weight = resize(np.asarray(present, np.float32)[:, None, None], (slices, 1, 1))[:, 0, 0]
    return weight >= 0.5


def _range(flags: np.ndarray) -> tuple[int, int] | None:
    found = np.flatnonzero(flags)
    return (int(found[0]), int(found[-1])) if found.size else None


def organ_extents(volume: Volume, labels: np.ndarray, *, slices: int = 32) -> dict[str, OrganExtent]:
    """Every organ of `ORGANS`: its voxel count and its slice ranges in the source and on the model grid."""
    box = model_crop(volume)
    cropped = labels[box]
    extents = {}
    for name, (label, _) in ORGANS.items():
        inside = labels == label
        cropped_slices = (cropped == label).any(axis=(1, 2))
        model = _range(model_slice_mask(cropped_slices, slices)) if cropped_slices.any() else None
        voxels = int(inside.sum())
        extents[name] = OrganExtent(voxels, voxels * float(np.prod(volume.spacing)) / 1000.0,
                                    _range(inside.any(axis=(1, 2))), model)
    return extents


# ---------------------------------------------------------------------------------------------------
# Questions.


def _words(name: str) -> str:
    return ORGANS[name][1]


def _slices(extent: OrganExtent) -> list[int] | None:
    return None if extent.model_slices is None else list(extent.model_slices)


def questions_for(
    extents: dict[str, OrganExtent], slices: int, rng: np.random.Generator
) -> list[tuple[str, tuple[str, ...], _Question]]:
    """(kind, organ keys, question) triples of one case, kind "location" | "largest" | "presence";
    `choices[0]` of a closed question is the correct one."""
    shown = [n for n, e in extents.items() if e.model_slices is not None and e.volume_ml >= MIN_ORGAN_ML]
    absent = [str(n) for n in rng.permutation([n for n, e in extents.items() if e.voxels == 0])]
    places = list(LOCATIONS.values()) + [NOT_IN_SCAN]
    questions = []

    # Location: every organ present, and absent ones (a third as many) for "not in the scan".
    for name in shown + absent[: max(1, len(shown) // 3)]:
        extent = extents[name]
        where = location_words(extent.model_slices, slices) if extent.voxels else NOT_IN_SCAN
        others = [str(p) for p in rng.choice([p for p in places if p != where], 3, replace=False)]
        answer = f"It spans {where} of the scan." if extent.voxels else f"The {_words(name)} is not in the scan."
        question = _Question("location", f"Which part of the volume holds the {_words(name)}?", [where, *others],
                             answer, _slices(extent))
        questions.append(("location", (name,), question))

    # Largest of four present organs, where the answer is clear.
    drawn = set()
    for _ in range(50):
        if len(drawn) == LARGEST_QUESTIONS or len(shown) < 4:
            break
        four = tuple(str(n) for n in rng.choice(shown, 4, replace=False))
        ranked = sorted(four, key=lambda n: -extents[n].volume_ml)
        if frozenset(four) in drawn or extents[ranked[0]].volume_ml < LARGEST_MARGIN * extents[ranked[1]].volume_ml:
            continue
        drawn.add(frozenset(four))
        listed = ", the ".join(_words(n) for n in four[:-1]) + f" or the {_words(four[-1])}"
        question = _Question(
            "organ", "Which of these organs is largest in this scan?",
            [_words(ranked[0]), *(_words(str(n)) for n in rng.permutation(ranked[1:]))],
            f"The {_words(ranked[0])}.", _slices(extents[ranked[0]]),
            open_text=f"Which is largest in this scan: the {listed}?",
        )
        questions.append(("largest", tuple(sorted(four)), question))

    # Presence, yes / no: every organ present and as many absent ones as there are.
    for name in shown + absent[: len(shown)]:
        present = extents[name].voxels > 0
        question = _Question("organ", "", [], "Yes." if present else "No.", _slices(extents[name]),
                             open_text=f"Is the {_words(name)} in this scan?")
        questions.append(("presence", (name,), question))
    return questions


# ---------------------------------------------------------------------------------------------------
# The set on disk.


def build_grounded_set(
    out_dir: str | os.PathLike, *, seed: int = 0, slices: int = 32, cache: str | None = None
) -> dict[str, str]:
    """Write the grounded set of every case in `CASES` under `out_dir` (the annotations' image_root).

    Returns the paths written: "test" (every record), "vqa_closed_test", "vqa_open_test",
    "ground_truth".
    """
    out = pathlib.Path(out_dir)
    closed, opened, truth = [], [], []
    for index, case in enumerate(CASES):
        rng = np.random.default_rng([seed, index])
        volume, labels = read_case(case, cache)
        extents = organ_extents(volume, labels, slices=slices)
        log.info("%s: %d of the %d organs present, %d absent", case.id,
                 sum(e.volume_ml >= MIN_ORGAN_ML for e in extents.values()), len(ORGANS),
                 sum(e.voxels == 0 for e in extents.values()))
        target = f"{case.folder}/{case.id}" + (".nii.gz" if case.folder == "nifti" else "")
        _copy(volume.source, out / target)
        for kind, organs, question in questions_for(extents, slices, rng):
            record_id = f"{case.id}_{kind}_{'+'.join(organs)}"
            subject = {"organs": list(organs)} if len(organs) > 1 else {"organ": organs[0]}
            if question.choices:
                closed.append((f"{SPLIT}/{kind}", question, record_id, target, subject))
            opened.append(dict(_record(
                f"{record_id}_open", question.open_text or question.text, question.open_answer, target,
                question_type=QUESTION_TYPES[question.kind], answer=question.open_answer,
                answer_slices=question.answer_slices), **subject))
        box = model_crop(volume)
        truth.append(dict(
            id=case.id,
            files={"volume": target, "source": case.volume, "labels": case.labels},
            source_shape=list(volume.array.shape),
            spacing_mm=[round(s, 6) for s in volume.spacing],
            crop=[[s.start, s.stop] for s in box],
            organs={n: dict(dataclasses.asdict(e), words=_words(n)) for n, e in extents.items()},
        ))
    positions = deal_letters([group for group, *_ in closed], np.random.default_rng([seed, 1 << 30]))
    closed_records = [
        dict(closed_record(f"{record_id}_closed", question, position, target), **subject)
        for (_, question, record_id, target, subject), position in zip(closed, positions)
    ]

    folder = out / "annotations" / FORMAT
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        SPLIT: folder / f"{SPLIT}.json",
        f"vqa_closed_{SPLIT}": folder / f"vqa_closed_{SPLIT}.json",
        f"vqa_open_{SPLIT}": folder / f"vqa_open_{SPLIT}.json",
        "ground_truth": out / "ground_truth.json",
    }
    _write_json(paths[SPLIT], closed_records + opened)
    _write_json(paths[f"vqa_closed_{SPLIT}"], closed_records)
    _write_json(paths[f"vqa_open_{SPLIT}"], opened)
    _write_json(paths["ground_truth"], dict(
        seed=seed,
        slices=slices,
        frame="axis 0 superior->inferior, axis 1 anterior->posterior, axis 2 patient right->left",
        slice_ranges="inclusive [first, last]; model_slices on the model's slices after the pipeline's crop and "
                     "depth resize (a slice shows an organ when >= half its interpolation weight is on its slices)",
        labels="TotalSegmentator 'total' task",
        hu_window=list(HU_WINDOW),
        volumes=truth,
    ))
    return {name: str(path) for name, path in paths.items()}


def _copy(source: str, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(source):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
