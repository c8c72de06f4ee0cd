"""A phantom CT set whose answers depend on where the lesions are: the embedded demo and test data.

Each phantom is one analytic description — a body (fat ring around soft tissue), a spine, two lungs, a
heart, liver, spleen, two kidneys, a bladder, and 0-3 lesions (hypo- or hyperdense spheres or
ellipsoids) in the lungs, liver, spleen, kidneys or bladder — rendered twice:

- at the model resolution `shape` (slices, height, width), saved M3D-style as `npy/<id>.npy`,
  (1, slices, height, width) float32: HU window [-1000, 1000] scaled to [0, 1], then min-max;
- at a finer source resolution `source_shape`, saved CT-RATE-style as `nifti/<id>.nii.gz`: int16 with
  scl_slope 1, scl_inter -1024 (so the stored values read back as HU), an affine with the voxel spacing,
  in LPS orientation on disk (voxel axes point to patient Left, Posterior, Superior), so readers must
  reorient.

Both arrays share one frame, which is also the frame of every slice index in the ground truth: axis 0
runs superior → inferior ("upper" means superior), axis 1 anterior → posterior, axis 2 patient right →
left (the radiological view). The scan covers a random stretch of the body (chest only, chest and
abdomen, …), so an organ's slices differ between phantoms. The body fills every slice, so cropping the
foreground never removes slices: slice k of a (slices, …) resize of the source volume covers the same
stretch of the body as slice k of the model-resolution phantom.

Texts per volume: a report, closed four-choice VQA and open VQA about which organ holds a lesion
(question_type 3, M3D's "organ"), whether an organ holds one (4, "abnormality"), which thirds of the
scan a lesion spans (5, "location") and its size class (6; M3D has no size type). Reports have
question_type 0. Records are the authors' annotation JSON plus `answer`, `answer_choice` (closed) and
`answer_slices`: the inclusive [first, last] model-resolution slice range of what the answer is about —
the lesion asked about; the lesions of the organ chosen in a closed "organ" question; every lesion for a
report or an open "organ" question (reports also list each in `finding_slices`); the organ when the
answer is that it has no lesion; null when there is nothing to look at.

Closed choices (`choice_order`): "shuffled" (the default, like M3D-VQA) lists the distractors in a random
order and deals the correct letter evenly over A-D within each split and question type, so no letter
prior helps; "natural" lists the four in NATURAL_ORDER (organs head to feet, "No" before the kinds of
lesion, the scan's thirds from the top, sizes ascending), so the letter follows from the answer and the
choices offered (for presence and size, from the answer alone): a model that reads the answer from the
scan then needs little symbol matching to name its letter.

Contrast (`contrast`): "plain" (the default) draws the organs as on a non-contrast scan — liver, spleen
and kidneys within 25 HU of the soft tissue around them, so at M3D's window of -1000 to 1000 HU they
hardly show — and lesions of any size 40-160 HU from their organ; "enhanced" draws the organs as in a
portal-venous phase (CONTRAST_ENHANCED_HU) and every lesion outside the lungs at least
MIN_CONSPICUOUS_MM across and far from its organ (CONSPICUOUS_HU), so that a small model trained for
minutes can see both (the quick start's set). Lung lesions are conspicuous either way.

Everything is deterministic from the seed: volume i's anatomy, noise and texts depend on (seed, i) only.

Output (image_root = `out`):
    npy/phantom_00000.npy  nifti/phantom_00000.nii.gz  ground_truth.json
    annotations/<format>/{train,val,test}.json                       every task (for training)
    annotations/<format>/{report,vqa_closed,vqa_open}_{split}.json   one task (for evaluation)
    annotations/<format>/vqa_{split}.json                            closed and open VQA

Command line: `med2e3-phantoms` (med2e3_jax/cli/phantoms.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from data_pipelines.image_placeholder import IMAGE3D_TOKEN

HU_WINDOW = (-1000.0, 1000.0)
AIR_HU = -1024.0  # outside the body: the scanner's padding value, which also is nifti's scl_inter
NIFTI_SLOPE, NIFTI_INTERCEPT = 1.0, -1024.0
NOISE_HU = 12.0
BODY_LENGTH_MM = 600.0  # the anatomy coordinate t in [0, 1] spans this much of the body
INPLANE_FOV_MM = 400.0
LESION_FILL = 0.55  # a lesion's semi-axes are at most this fraction of its organ's
LESION_CENTRE_SPREAD = 0.45  # and its centre lies this deep inside the organ (1 = the organ's surface)
SPLITS = ("train", "val", "test")
TASKS = ("report", "vqa_closed", "vqa_open")

QUESTION_TYPES = {"report": 0, "organ": 3, "abnormality": 4, "location": 5, "size": 6}


@dataclasses.dataclass(frozen=True)
class Organ:
    """An organ as an axis-aligned ellipsoid: centre and semi-axes in anatomy units (t along the body, u
    anterior → posterior and v patient right → left as fractions of the in-plane field of view)."""

    centre: tuple[float, float, float]  # (t, u, v)
    semi_axes: tuple[float, float, float]
    hu: float
    lesion_kinds: tuple[str, ...] = ()  # empty: never holds a lesion


ORGANS = {
    "right lung": Organ((0.20, 0.47, 0.31), (0.20, 0.22, 0.13), -820.0, ("hypodense", "hyperdense")),
    "left lung": Organ((0.20, 0.47, 0.69), (0.20, 0.22, 0.13), -820.0, ("hypodense", "hyperdense")),
    "heart": Organ((0.28, 0.40, 0.56), (0.09, 0.12, 0.12), 40.0),
    "liver": Organ((0.49, 0.48, 0.31), (0.13, 0.20, 0.14), 60.0, ("hypodense", "hyperdense")),
    "spleen": Organ((0.47, 0.58, 0.74), (0.07, 0.09, 0.065), 50.0, ("hypodense", "hyperdense")),
    "right kidney": Organ((0.60, 0.65, 0.35), (0.08, 0.065, 0.06), 30.0, ("hypodense", "hyperdense")),
    "left kidney": Organ((0.61, 0.65, 0.65), (0.08, 0.065, 0.06), 30.0, ("hypodense", "hyperdense")),
    "bladder": Organ((0.88, 0.42, 0.50), (0.06, 0.09, 0.09), 10.0, ("hypodense", "hyperdense")),
}
LESION_ORGANS = tuple(name for name, organ in ORGANS.items() if organ.lesion_kinds)
BODY_SEMI_AXES = (0.32, 0.44)  # (u, v) of the body's elliptic cross-section
FAT_THICKNESS = 0.08  # fraction of the body's semi-axes that is subcutaneous fat
FAT_HU, SOFT_TISSUE_HU = -100.0, 40.0
SPINE = ((0.70, 0.50), 0.04, 400.0)  # centre (u, v), radius, HU
CONTRASTS = ("plain", "enhanced")
CONTRAST_ENHANCED_HU = {"heart": 150.0, "liver": 110.0, "spleen": 120.0, "right kidney": 160.0, "left kidney": 160.0}
MIN_CONSPICUOUS_MM = 20.0  # "enhanced": every lesion at least this long (up to 20 draws, else none)
CONSPICUOUS_HU = {"hypodense": (300.0, 500.0), "hyperdense": (400.0, 600.0)}  # below / above the organ

SIZE_CLASSES = (  # (name, smallest diameter mm, largest diameter mm)
    ("under 2 cm", 0.0, 20.0),
    ("2 to 3 cm", 20.0, 30.0),
    ("3 to 5 cm", 30.0, 50.0),
    ("over 5 cm", 50.0, 80.0),
)
LOCATIONS = {  # (third of the first slice, third of the last slice) -> words
    (0, 0): "the upper third",
    (1, 1): "the middle third",
    (2, 2): "the lower third",
    (0, 1): "the upper and middle thirds",
    (1, 2): "the middle and lower thirds",
    (0, 2): "all three thirds",
}
PRESENCE_ANSWERS = ("No", "Yes, a single hypodense lesion", "Yes, a single hyperdense lesion", "Yes, several lesions")
REPORT_QUESTIONS = (
    "Generate a radiology report for this CT.",
    "Describe the findings of this CT scan.",
    "Can you write the findings for this CT volume?",
)


# ---------------------------------------------------------------------------------------------------
# The analytic phantom.


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    centre_mm: tuple[float, float, float]  # (z, y, x) in the array frame, from the field of view's corner
    semi_axes_mm: tuple[float, float, float]
    hu: float


@dataclasses.dataclass(frozen=True)
class Finding:
    organ: str
    kind: str  # "hypodense" | "hyperdense"
    shape: str  # "round" | "oval"
    diameter_mm: float  # the longest axis
    size_class: str
    ellipsoid: Ellipsoid


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One phantom in millimetres: `fov_mm` (z, y, x) is the scanned box; `coverage` is the (first, last)
    anatomy t the scan covers."""

    fov_mm: tuple[float, float, float]
    coverage: tuple[float, float]
    body_semi_axes_mm: tuple[float, float]
    organs: dict[str, Ellipsoid]
    findings: tuple[Finding, ...]


def _spacing(fov_mm, shape) -> np.ndarray:
    return np.asarray(fov_mm, np.float64) / np.asarray(shape, np.float64)


def _voxel_centres(fov_mm, shape) -> list[np.ndarray]:
    spacing = _spacing(fov_mm, shape)
    return [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]


def _size_class(diameter_mm: float) -> str:
    return next(name for name, lo, hi in SIZE_CLASSES if diameter_mm < hi or hi == SIZE_CLASSES[-1][2])


def sample_phantom(rng: np.random.Generator, *, shape, source_shape, contrast: str = "plain") -> Phantom:
    """Draw one phantom's anatomy and lesions (`contrast`: one of CONTRASTS, see the module docstring).

    Every lesion is visible at both resolutions: its centre sits on a voxel centre of the `shape` grid,
    and each semi-axis is at least one `source_shape` voxel, so the source voxel nearest the centre lies
    inside it too (its normalised distance is at most sqrt(3) / 2).
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    length = rng.uniform(0.6, 1.0)
    start = rng.uniform(0.0, 1.0 - length)
    fov = (length * BODY_LENGTH_MM, INPLANE_FOV_MM, INPLANE_FOV_MM)
    body_scale = rng.uniform(0.88, 1.0)
    body = (BODY_SEMI_AXES[0] * body_scale * fov[1], BODY_SEMI_AXES[1] * body_scale * fov[2])

    organs = {}
    for name, organ in ORGANS.items():
        t, u, v = np.asarray(organ.centre) + rng.uniform(-0.02, 0.02, 3)
        u, v = 0.5 + (u - 0.5) * body_scale, 0.5 + (v - 0.5) * body_scale
        semi = np.asarray(organ.semi_axes) * rng.uniform(0.9, 1.1, 3) * (1.0, body_scale, body_scale)
        organs[name] = Ellipsoid(
            centre_mm=((t - start) * BODY_LENGTH_MM, u * fov[1], v * fov[2]),
            semi_axes_mm=tuple(float(s) for s in semi * (BODY_LENGTH_MM, fov[1], fov[2])),
            hu=float(CONTRAST_ENHANCED_HU.get(name, organ.hu) if contrast == "enhanced" else organ.hu)
            + float(rng.uniform(-5.0, 5.0)),
        )

    source_spacing = _spacing(fov, source_shape)
    model_spacing = _spacing(fov, shape)
    findings: list[Finding] = []
    count = rng.choice(4, p=(0.15, 0.4, 0.3, 0.15))
    for _ in range(40):  # attempts; a draw that does not fit is simply dropped
        if len(findings) == count:
            break
        name = LESION_ORGANS[rng.integers(len(LESION_ORGANS))]
        if sum(f.organ == name for f in findings) >= 2:
            continue
        organ = organs[name]
        if contrast == "enhanced":
            finding = _conspicuous_finding(rng, name, organ, source_spacing, model_spacing, fov)
        else:
            finding = _sample_finding(rng, name, organ, source_spacing, model_spacing, fov)
        if finding is None:
            continue
        if any(_overlap(finding.ellipsoid, f.ellipsoid) for f in findings):
            continue
        findings.append(finding)
    return Phantom(fov, (start, start + length), body, organs, tuple(findings))


def _sample_finding(rng, name, organ: Ellipsoid, source_spacing, model_spacing, fov) -> Finding | None:
    organ_semi = np.asarray(organ.semi_axes_mm)
    shape = ("round", "oval")[rng.integers(2)]
    aspect = np.ones(3) if shape == "round" else rng.permutation([1.0, *rng.uniform(0.6, 0.85, 2)])
    radius_lo = float(np.max(source_spacing / aspect))
    radius_hi = float(np.min(LESION_FILL * organ_semi / aspect))
    radius_hi = min(radius_hi, SIZE_CLASSES[-1][2] / 2)
    if radius_lo > radius_hi:
        return None
    feasible = [(lo, hi) for _, lo, hi in SIZE_CLASSES if lo / 2 < radius_hi and hi / 2 > radius_lo]
    lo, hi = feasible[rng.integers(len(feasible))]
    radius = rng.uniform(max(lo / 2, radius_lo), min(hi / 2, radius_hi))
    direction = rng.standard_normal(3)
    offset = direction / np.linalg.norm(direction) * LESION_CENTRE_SPREAD * rng.uniform() ** (1 / 3)
    centre = np.asarray(organ.centre_mm) + offset * organ_semi
    centre = (np.floor(centre / model_spacing) + 0.5) * model_spacing  # onto a model voxel centre
    if np.any(centre <= 0) or np.any(centre >= np.asarray(fov)):
        return None
    kind = ORGANS[name].lesion_kinds[rng.integers(len(ORGANS[name].lesion_kinds))]
    if kind == "hypodense":  # in a lung: an air cyst
        hu = organ.hu - rng.uniform(40.0, 70.0) if organ.hu > AIR_HU / 2 else rng.uniform(-1000.0, -960.0)
    else:  # in a lung: a solid nodule
        hu = max(organ.hu, SOFT_TISSUE_HU) + rng.uniform(60.0, 150.0)
    diameter = float(round(2 * radius * float(np.max(aspect))))  # whole mm: the texts' number fixes the class
    ellipsoid = Ellipsoid(tuple(float(c) for c in centre), tuple(float(a) for a in radius * aspect), float(hu))
    return Finding(name, kind, shape, diameter, _size_class(diameter), ellipsoid)


def _conspicuous_finding(rng, name, organ: Ellipsoid, *grid) -> Finding | None:
    """A lesion of at least MIN_CONSPICUOUS_MM (a plain draw, up to 20 times), then, outside the lungs,
    redrawn CONSPICUOUS_HU below or above its organ."""
    for _ in range(20):
        finding = _sample_finding(rng, name, organ, *grid)
        if finding is None or finding.diameter_mm >= MIN_CONSPICUOUS_MM:
            break
    else:
        return None
    if finding is None or organ.hu < AIR_HU / 2:
        return finding
    low, high = CONSPICUOUS_HU[finding.kind]
    step = float(rng.uniform(low, high))
    hu = organ.hu - step if finding.kind == "hypodense" else organ.hu + step
    return dataclasses.replace(finding, ellipsoid=dataclasses.replace(finding.ellipsoid, hu=hu))


def _overlap(a: Ellipsoid, b: Ellipsoid) -> bool:
    distance = np.linalg.norm(np.subtract(a.centre_mm, b.centre_mm))
    return bool(distance <= max(a.semi_axes_mm) + max(b.semi_axes_mm))


# ---------------------------------------------------------------------------------------------------
# Rendering: the same description on any grid, in HU.


def _ellipsoid_mask(centres, ellipsoid: Ellipsoid):
    """The voxels whose centres lie inside `ellipsoid`, as (bounding-box slices, boolean mask)."""
    box, terms = [], []
    for axis, (c, centre, semi) in enumerate(zip(centres, ellipsoid.centre_mm, ellipsoid.semi_axes_mm)):
        lo, hi = np.searchsorted(c, centre - semi, "left"), np.searchsorted(c, centre + semi, "right")
        box.append(slice(int(lo), int(hi)))
        term = ((c[lo:hi] - centre) / semi) ** 2
        terms.append(term.reshape([-1 if a == axis else 1 for a in range(3)]))
    return tuple(box), (terms[0] + terms[1] + terms[2]) <= 1.0


def _slice_range(box, mask) -> tuple[int, int] | None:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    return int(box[0].start + slices[0]), int(box[0].start + slices[-1])


@dataclasses.dataclass(frozen=True)
class Rendering:
    hu: np.ndarray  # (slices, height, width) float32
    finding_slices: tuple[tuple[int, int], ...]  # inclusive, one per finding
    organ_slices: dict[str, tuple[int, int] | None]  # None: the organ is outside the scan


def render(phantom: Phantom, shape, rng: np.random.Generator) -> Rendering:
    """The phantom in HU on a `shape` grid over its field of view, with Gaussian noise inside the body."""
    centres = _voxel_centres(phantom.fov_mm, shape)
    y, x = centres[1][:, None], centres[2][None, :]
    (ay, ax), (cy, cx) = phantom.body_semi_axes_mm, (phantom.fov_mm[1] / 2, phantom.fov_mm[2] / 2)
    radius = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2
    body = radius <= 1.0
    inner = radius <= (1.0 - FAT_THICKNESS) ** 2
    (su, sv), sr, shu = SPINE
    spine = ((y - su * phantom.fov_mm[1]) ** 2 + (x - sv * phantom.fov_mm[2]) ** 2) <= (sr * phantom.fov_mm[1]) ** 2

    section = np.where(inner, SOFT_TISSUE_HU, np.where(body, FAT_HU, AIR_HU)).astype(np.float32)
    section[spine & inner] = shu
    hu = np.broadcast_to(section, tuple(shape)).copy()

    organ_slices = {}
    for name, organ in phantom.organs.items():
        box, mask = _ellipsoid_mask(centres, organ)
        hu[box][mask] = organ.hu
        organ_slices[name] = _slice_range(box, mask)
    finding_slices = []
    for finding in phantom.findings:
        box, mask = _ellipsoid_mask(centres, finding.ellipsoid)
        hu[box][mask] = finding.ellipsoid.hu
        found = _slice_range(box, mask)
        if found is None:
            raise AssertionError(f"lesion {finding} covers no voxel centre of a {tuple(shape)} grid")
        finding_slices.append(found)
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(NOISE_HU)
    hu += np.where(body, noise, np.float32(0.0))
    return Rendering(hu, tuple(finding_slices), organ_slices)


def hu_to_m3d(hu: np.ndarray, window=HU_WINDOW) -> np.ndarray:
    """M3D's stored form: (1, slices, height, width) float32, windowed to [0, 1], then min-max."""
    lo, hi = window
    unit = (np.clip(hu, lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    unit = (unit - unit.min()) / max(float(unit.max() - unit.min()), 1e-8)
    return unit.astype(np.float32)[None]


def nifti_image(hu: np.ndarray, spacing_mm):
    """`hu` (array frame: superior → inferior, anterior → posterior, right → left) as an LPS NIfTI image.

    On disk voxel (i, j, k) = array (slices - 1 - k, j, i): i points Left, j Posterior, k Superior.
    """
    import nibabel as nib

    data = np.transpose(hu, (2, 1, 0))[:, :, ::-1]
    raw = np.clip(np.rint((data - NIFTI_INTERCEPT) / NIFTI_SLOPE), -32768, 32767).astype(np.int16)
    sz, sy, sx = (float(s) for s in spacing_mm)
    shape = raw.shape
    # RAS+ world coordinates; the origin puts the field of view's centre at (0, 0, 0).
    affine = np.array(
        [
            [-sx, 0.0, 0.0, sx * (shape[0] - 1) / 2],
            [0.0, -sy, 0.0, sy * (shape[1] - 1) / 2],
            [0.0, 0.0, sz, -sz * (shape[2] - 1) / 2],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    image = nib.Nifti1Image(raw, affine)
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(NIFTI_SLOPE, NIFTI_INTERCEPT)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


# ---------------------------------------------------------------------------------------------------
# Texts.


def _third(slice_index: int, slices: int) -> int:
    return min(2, 3 * slice_index // slices)


def location_words(slice_range, slices: int) -> str:
    lo, hi = slice_range
    return LOCATIONS[(_third(lo, slices), _third(hi, slices))]


def _describe(finding: Finding, noun: str = "lesion") -> str:
    return f"a {finding.diameter_mm:.0f} mm {finding.kind} {finding.shape} {noun}"


def _envelope(ranges) -> list[int] | None:
    ranges = [r for r in ranges if r is not None]
    if not ranges:
        return None
    return [min(r[0] for r in ranges), max(r[1] for r in ranges)]


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def report_text(phantom: Phantom, rendering: Rendering, slices: int) -> str:
    sentences = []
    for finding, found in zip(phantom.findings, rendering.finding_slices):
        noun = "nodule" if finding.organ.endswith("lung") else "lesion"
        sentence = f"{_describe(finding, noun)} in the {finding.organ}, in {location_words(found, slices)} of the scan."
        sentences.append(sentence[0].upper() + sentence[1:])
    if not phantom.findings:
        sentences.append("No focal lesion is seen.")
    affected = {f.organ for f in phantom.findings}
    normal = [n for n in LESION_ORGANS if n not in affected and rendering.organ_slices[n] is not None]
    missing = [n for n in LESION_ORGANS if rendering.organ_slices[n] is None]
    if normal:
        sentences.append(f"The {_join(normal)} {'is' if len(normal) == 1 else 'are'} unremarkable.")
    if missing:
        sentences.append(f"The {_join(missing)} {'is' if len(missing) == 1 else 'are'} outside the scanned range.")
    return " ".join(sentences)


@dataclasses.dataclass
class _Question:
    """A question before its letters are dealt: `choices[0]` is the correct one."""

    kind: str  # a QUESTION_TYPES key
    text: str
    choices: list[str]
    open_answer: str
    answer_slices: list[int] | None
    open_text: str = ""  # the open form of the question, when it differs
    open_slices: list[int] | None = None  # the open answer's slices, when they differ
    open_differs: bool = False


def questions_for(phantom: Phantom, rendering: Rendering, slices: int, rng: np.random.Generator) -> list[_Question]:
    """The VQA of one phantom: each question has four choices (correct first) and an open answer."""
    findings = list(zip(phantom.findings, rendering.finding_slices))
    visible = [n for n in LESION_ORGANS if rendering.organ_slices[n] is not None]
    affected = sorted({f.organ for f, _ in findings}, key=LESION_ORGANS.index)
    healthy = [n for n in visible if n not in affected]
    questions = []

    if findings and len(healthy) >= 3:
        target = affected[rng.integers(len(affected))]
        distractors = [str(n) for n in rng.choice(healthy, 3, replace=False)]
        questions.append(
            _Question("organ", "Which of the following organs contains a lesion?", [target, *distractors],
                      f"The {_join(affected)}.", _envelope([r for f, r in findings if f.organ == target]),
                      "Which organs contain a lesion?", _envelope([r for _, r in findings]), open_differs=True)
        )
    elif not findings:
        questions.append(_Question("organ", "", [], "None; no lesion is seen.", None, "Which organs contain a lesion?"))

    # Abnormality: an organ with a lesion, when there is one, often enough that "No" is right about half
    # the time over the data set (15 % of phantoms have no lesion).
    pool = affected if (affected and rng.uniform() < 0.6) else healthy
    if pool:
        organ = pool[rng.integers(len(pool))]
        inside = [(f, r) for f, r in findings if f.organ == organ]
        if not inside:
            choice, open_answer, answer_slices = PRESENCE_ANSWERS[0], "No.", list(rendering.organ_slices[organ])
        elif len(inside) == 1:
            finding = inside[0][0]
            choice = PRESENCE_ANSWERS[1 if finding.kind == "hypodense" else 2]
            open_answer, answer_slices = f"Yes, {_describe(finding)}.", list(inside[0][1])
        else:
            choice = PRESENCE_ANSWERS[3]
            open_answer = f"Yes, {len(inside)} lesions: {_join([_describe(f) for f, _ in inside])}."
            answer_slices = _envelope([r for _, r in inside])
        others = [a for a in PRESENCE_ANSWERS if a != choice]
        questions.append(
            _Question("abnormality", f"Is there a lesion in the {organ}?", [choice, *(str(a) for a in rng.permutation(others))],
                      open_answer, answer_slices)
        )

    # Location and size of one lesion that the question can name unambiguously.
    nameable = []
    for finding, found in findings:
        same_organ = [f for f, _ in findings if f.organ == finding.organ]
        if len(same_organ) == 1:
            nameable.append((f"the lesion in the {finding.organ}", finding, found))
        elif sum(f.kind == finding.kind for f in same_organ) == 1:
            nameable.append((f"the {finding.kind} lesion in the {finding.organ}", finding, found))
    if nameable:
        name, finding, found = nameable[rng.integers(len(nameable))]
        where = location_words(found, slices)
        others = [w for w in LOCATIONS.values() if w != where]
        questions.append(
            _Question("location", f"Which part of the scan does {name} span?",
                      [where, *(str(w) for w in rng.choice(others, 3, replace=False))], f"It spans {where} of the scan.", list(found))
        )
        name, finding, found = nameable[rng.integers(len(nameable))]
        sizes = [s for s, _, _ in SIZE_CLASSES]
        others = [s for s in sizes if s != finding.size_class]
        questions.append(
            _Question("size", f"How large is {name}?", [finding.size_class, *(str(s) for s in rng.permutation(others))],
                      f"About {finding.diameter_mm:.0f} mm across.", list(found))
        )
    return questions


def _record(record_id: str, question: str, reply: str, volume: str, **extra) -> dict:
    return dict(
        id=record_id,
        conversations=[
            {"from": "human", "value": f"{IMAGE3D_TOKEN}\n{question}"},
            {"from": "gpt", "value": reply},
        ],
        vision3d=[volume],
        question=question,
        **extra,
    )


def deal_letters(groups_of: Sequence[str], rng: np.random.Generator) -> list[int]:
    """The correct choice's position (0-3) for each closed question, given its group, in a seeded order.

    Groups take consecutive stretches of one cycle A, B, C, D, A, …, so each letter is correct equally
    often (counts differ by at most one) within every group, every run of consecutive groups in sorted
    order (a split, when groups are "split/type"), and overall.
    """
    positions = [0] * len(groups_of)
    groups: dict[str, list[int]] = {}
    for index, group in enumerate(groups_of):
        groups.setdefault(group, []).append(index)
    start = 0
    for group in sorted(groups):
        members = groups[group]
        letters = rng.permutation((start + np.arange(len(members))) % 4)
        for index, letter in zip(members, letters):
            positions[index] = int(letter)
        start += len(members)
    return positions


# Each type's choices in reading order: organs as ORGANS lists them (head to feet), presence before
# kind, the scan's thirds by first then last, sizes ascending.
NATURAL_ORDER = {
    "organ": LESION_ORGANS,
    "abnormality": PRESENCE_ANSWERS,
    "location": tuple(LOCATIONS[key] for key in sorted(LOCATIONS)),
    "size": tuple(name for name, _, _ in SIZE_CLASSES),
}
CHOICE_ORDERS = ("shuffled", "natural")


def closed_record(record_id, question: _Question, position: int | None, volume: str) -> dict:
    """position: the correct choice's letter (0-3) among the distractors in their drawn order; None
    lists all four in NATURAL_ORDER."""
    if position is None:
        choices = sorted(question.choices, key=NATURAL_ORDER[question.kind].index)
        position = choices.index(question.choices[0])
    else:
        choices = list(question.choices[1:])
        choices.insert(position, question.choices[0])
    letter = "ABCD"[position]
    text = f"{question.text} Choices: " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", choices))
    return _record(
        record_id, text, f"{letter}. {question.choices[0]}", volume,
        question_type=QUESTION_TYPES[question.kind], answer=question.choices[0], answer_choice=letter,
        answer_slices=question.answer_slices,
    )


# ---------------------------------------------------------------------------------------------------
# The data set on disk.


def _split_sizes(num: int, fractions=(0.8, 0.1, 0.1)) -> tuple[int, int, int]:
    held_out = [max(1, round(f * num)) if num >= 3 else 0 for f in fractions[1:]]
    return num - sum(held_out), held_out[0], held_out[1]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def generate(
    out: str | os.PathLike,
    *,
    num: int,
    seed: int = 0,
    shape: Sequence[int] = (32, 64, 64),
    source_shape: Sequence[int] | None = None,
    formats: Sequence[str] = ("npy", "nifti"),
    choice_order: str = "shuffled",
    contrast: str = "plain",
) -> dict:
    """Write `num` phantoms with their texts and ground truth under `out`; returns the ground truth.

    `shape` is the model resolution (the `.npy` volumes and every slice index); `source_shape` the
    NIfTI's, by default twice as many slices as `shape` at the same in-plane size. `choice_order`
    (CHOICE_ORDERS) lists closed choices in letters dealt evenly over A-D, or in their natural order;
    `contrast` (CONTRASTS) draws plain or contrast-enhanced organs and subtle or conspicuous lesions.
    """
    shape = tuple(int(s) for s in shape)
    source_shape = tuple(int(s) for s in (source_shape or (2 * shape[0], shape[1], shape[2])))
    formats = tuple(formats)
    if len(shape) != 3 or len(source_shape) != 3 or min(shape + source_shape) < 8:
        raise ValueError(f"shape {shape} and source_shape {source_shape} must be 3 sizes of at least 8 voxels")
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if choice_order not in CHOICE_ORDERS:
        raise ValueError(f"choice_order must be one of {CHOICE_ORDERS}, got {choice_order!r}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    unknown = set(formats) - {"npy", "nifti"}
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of ('npy', 'nifti'), got {formats}")
    out = pathlib.Path(out)
    for fmt in formats:
        (out / fmt).mkdir(parents=True, exist_ok=True)

    sizes = _split_sizes(num)
    order = _rng(seed, 1 << 30).permutation(num)
    split_of = {int(v): SPLITS[int(np.searchsorted(np.cumsum(sizes), rank, "right"))] for rank, v in enumerate(order)}

    volumes, texts = [], []
    for index in range(num):
        volume_id = f"phantom_{index:05d}"
        phantom = sample_phantom(_rng(seed, index, 0), shape=shape, source_shape=source_shape, contrast=contrast)
        model = render(phantom, shape, _rng(seed, index, 1))
        paths = {"npy": f"npy/{volume_id}.npy", "nifti": f"nifti/{volume_id}.nii.gz"}
        if "npy" in formats:
            np.save(out / paths["npy"], hu_to_m3d(model.hu))
        if "nifti" in formats:
            source = render(phantom, source_shape, _rng(seed, index, 2))
            nifti_image(source.hu, _spacing(phantom.fov_mm, source_shape)).to_filename(out / paths["nifti"])
        else:
            source = _ranges_only(phantom, source_shape)
        volumes.append(_ground_truth(volume_id, split_of[index], phantom, model, source, shape, source_shape,
                                     {f: paths[f] for f in formats}))
        texts.append((volume_id, split_of[index], phantom, model, _rng(seed, index, 3)))

    records = {fmt: {(task, split): [] for task in TASKS for split in SPLITS} for fmt in formats}
    closed = []
    for volume_id, split, phantom, model, rng in texts:
        report_q = REPORT_QUESTIONS[rng.integers(len(REPORT_QUESTIONS))]
        report = report_text(phantom, model, shape[0])
        for fmt in formats:
            records[fmt]["report", split].append(
                _record(f"{volume_id}_report", report_q, report, f"{fmt}/{volume_id}{_SUFFIX[fmt]}",
                        question_type=QUESTION_TYPES["report"], answer_slices=_envelope(model.finding_slices),
                        finding_slices=[list(r) for r in model.finding_slices])
            )
        for question in questions_for(phantom, model, shape[0], rng):
            record_id = f"{volume_id}_{question.kind}"
            if question.choices:
                closed.append((f"{split}/{question.kind}", question, record_id, split, volume_id))
            for fmt in formats:
                records[fmt]["vqa_open", split].append(
                    _record(f"{record_id}_open", question.open_text or question.text, question.open_answer,
                            f"{fmt}/{volume_id}{_SUFFIX[fmt]}", question_type=QUESTION_TYPES[question.kind],
                            answer=question.open_answer,
                            answer_slices=question.open_slices if question.open_differs else question.answer_slices)
                )
    if choice_order == "natural":
        positions = [None] * len(closed)
    else:
        positions = deal_letters([group for group, *_ in closed], _rng(seed, 1 << 30, 1))
    for (_, question, record_id, split, volume_id), position in zip(closed, positions):
        for fmt in formats:
            records[fmt]["vqa_closed", split].append(
                closed_record(f"{record_id}_closed", question, position, f"{fmt}/{volume_id}{_SUFFIX[fmt]}")
            )

    for fmt in formats:
        folder = out / "annotations" / fmt
        folder.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            every = []
            for task in TASKS:
                _write_json(folder / f"{task}_{split}.json", records[fmt][task, split])
                every += records[fmt][task, split]
            _write_json(folder / f"{split}.json", every)
            _write_json(folder / f"vqa_{split}.json", records[fmt]["vqa_closed", split] + records[fmt]["vqa_open", split])

    truth = dict(
        seed=seed,
        shape=list(shape),
        source_shape=list(source_shape),
        frame="axis 0 superior->inferior, axis 1 anterior->posterior, axis 2 patient right->left",
        nifti_orientation="LPS (voxel i->Left, j->Posterior, k->Superior); array slice s is nifti k = source_shape[0]-1-s",
        slice_ranges="inclusive [first, last]",
        hu_window=list(HU_WINDOW),
        volumes=volumes,
    )
    _write_json(out / "ground_truth.json", truth)
    return truth


_SUFFIX = {"npy": ".npy", "nifti": ".nii.gz"}


def _ranges_only(phantom: Phantom, shape) -> Rendering:
    """Slice ranges on a grid without rendering its voxels' noise (for the ground truth)."""
    centres = _voxel_centres(phantom.fov_mm, shape)
    findings = tuple(_slice_range(*_ellipsoid_mask(centres, f.ellipsoid)) for f in phantom.findings)
    organs = {n: _slice_range(*_ellipsoid_mask(centres, o)) for n, o in phantom.organs.items()}
    return Rendering(np.empty((0, 0, 0), np.float32), findings, organs)


def _ground_truth(volume_id, split, phantom: Phantom, model: Rendering, source: Rendering, shape, source_shape, files):
    findings = []
    for finding, found, found_source in zip(phantom.findings, model.finding_slices, source.finding_slices):
        e = finding.ellipsoid
        findings.append(
            dict(
                organ=finding.organ,
                kind=finding.kind,
                shape=finding.shape,
                diameter_mm=finding.diameter_mm,
                size_class=finding.size_class,
                hu=round(e.hu, 1),
                centre_mm=[round(c, 2) for c in e.centre_mm],
                semi_axes_mm=[round(a, 2) for a in e.semi_axes_mm],
                slices=list(found),
                location=location_words(found, shape[0]),
                source_slices=list(found_source),
                nifti_k=[source_shape[0] - 1 - found_source[1], source_shape[0] - 1 - found_source[0]],
            )
        )
    return dict(
        id=volume_id,
        split=split,
        files=files,
        fov_mm=[round(f, 3) for f in phantom.fov_mm],
        spacing_mm=[round(float(s), 6) for s in _spacing(phantom.fov_mm, shape)],
        source_spacing_mm=[round(float(s), 6) for s in _spacing(phantom.fov_mm, source_shape)],
        coverage=[round(c, 4) for c in phantom.coverage],
        organ_slices={n: (list(r) if r else None) for n, r in model.organ_slices.items()},
        findings=findings,
    )


def _write_json(path, data) -> None:
    pathlib.Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
