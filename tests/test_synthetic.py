"""The phantom CT set: deterministic, its ground truth matches its voxels, its answers are balanced."""

from __future__ import annotations

import collections
import dataclasses
import filecmp
import json
import pathlib
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from commands_for_tests import run_command
from data_pipelines import synthetic
from data_pipelines.annotations import load_records

SHAPE = (16, 32, 32)
SOURCE_SHAPE = (24, 40, 36)  # finer, non-square and not a multiple of SHAPE: readers must resample


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(out, num=12, seed=7, shape=SHAPE, source_shape=SOURCE_SHAPE)
    return out


def _truth(out):
    return json.loads((out / "ground_truth.json").read_text())


def _files(folder: pathlib.Path):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _nifti_in_array_frame(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    return np.transpose(data[:, :, ::-1], (2, 1, 0)), image  # LPS (i, j, k) -> (superior-first slice, row, column)


def _ellipsoid_voxels(finding, spacing, shape) -> np.ndarray:
    """The voxels of `shape` whose centres lie inside the finding's ellipsoid, computed afresh."""
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    grid = np.meshgrid(*centres, indexing="ij")
    distance = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, finding["centre_mm"], finding["semi_axes_mm"]))
    return distance <= 1.0


def test_same_seed_writes_identical_bytes(phantoms, tmp_path):
    synthetic.generate(tmp_path, num=12, seed=7, shape=SHAPE, source_shape=SOURCE_SHAPE)
    assert _files(tmp_path) == _files(phantoms)
    _, mismatch, errors = filecmp.cmpfiles(phantoms, tmp_path, [str(p) for p in _files(phantoms)], shallow=False)
    assert not mismatch and not errors


def test_other_seed_gives_other_phantoms(phantoms, tmp_path):
    synthetic.generate(tmp_path, num=2, seed=8, shape=SHAPE, source_shape=SOURCE_SHAPE, formats=("npy",))
    assert not np.array_equal(np.load(tmp_path / "npy/phantom_00000.npy"), np.load(phantoms / "npy/phantom_00000.npy"))


def test_volume_depends_only_on_seed_and_index(phantoms, tmp_path):
    synthetic.generate(tmp_path, num=3, seed=7, shape=SHAPE, source_shape=SOURCE_SHAPE)
    for name in ("npy/phantom_00002.npy", "nifti/phantom_00002.nii.gz"):
        assert (tmp_path / name).read_bytes() == (phantoms / name).read_bytes()


def test_npy_is_m3d_style_unit_volume(phantoms):
    for volume in _truth(phantoms)["volumes"]:
        array = np.load(phantoms / volume["files"]["npy"])
        assert array.shape == (1, *SHAPE) and array.dtype == np.float32
        assert array.min() == 0.0 and array.max() == 1.0


def test_nifti_is_lps_int16_hu_with_spacing(phantoms):
    for volume in _truth(phantoms)["volumes"]:
        path = phantoms / volume["files"]["nifti"]
        image = nib.load(path)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        assert image.get_data_dtype() == np.int16
        assert image.shape == SOURCE_SHAPE[::-1]
        sz, sy, sx = volume["source_spacing_mm"]
        np.testing.assert_allclose(image.header.get_zooms(), (sx, sy, sz), rtol=1e-5)
        np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), (sx, sy, sz), rtol=1e-5)
        assert (image.dataobj.slope, image.dataobj.inter) == (1.0, -1024.0)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        hu = image.get_fdata()
        assert hu[0, 0, 0] == hu[-1, -1, -1] == -1024.0  # air outside the body
        assert hu.min() > -1100.0  # the lungs' air cysts are noisy
        assert 350.0 < hu.max() < 1200.0  # bone, hyperdense lesions and noise stay in CT range


def test_nifti_anatomy_is_where_its_affine_says(phantoms):
    """In RAS+ (nibabel's canonical) the lungs are superior, the liver on the right, the spine posterior."""
    for volume in _truth(phantoms)["volumes"]:
        canonical = nib.as_closest_canonical(nib.load(phantoms / volume["files"]["nifti"]))
        hu = canonical.get_fdata()
        _, y, z = (np.arange(n) for n in hu.shape)
        lung = (hu < -600) & (hu != synthetic.AIR_HU)
        bone = hu > 300
        body = hu > -900
        if lung.sum() > 50:
            assert np.mean(z[np.nonzero(lung)[2]]) > np.mean(z[np.nonzero(body)[2]])
        assert np.mean(y[np.nonzero(bone)[1]]) < np.mean(y[np.nonzero(body)[1]])  # bone: spine at the back
        liver = volume["organ_slices"]["liver"]
        if liver is not None:
            ratio = SOURCE_SHAPE[0] / SHAPE[0]
            first, last = int(liver[0] * ratio), int(np.ceil((liver[1] + 1) * ratio)) - 1  # source slices
            slab = hu[:, :, SOURCE_SHAPE[0] - 1 - last : SOURCE_SHAPE[0] - first]  # RAS+: k runs the other way
            liver_like = (slab > 50) & (slab < 75)
            left, right = liver_like[: hu.shape[0] // 2].sum(), liver_like[hu.shape[0] // 2 :].sum()
            assert right > left  # RAS+: the first axis points to the patient's right


@pytest.mark.parametrize("fmt", ["npy", "nifti"])
def test_lesion_voxels_lie_in_their_stored_slice_range(phantoms, fmt):
    truth = _truth(phantoms)
    seen = 0
    for volume in truth["volumes"]:
        if fmt == "npy":
            unit = np.load(phantoms / volume["files"]["npy"])[0]
            image, shape, spacing, key = unit, SHAPE, volume["spacing_mm"], "slices"
        else:
            image, _ = _nifti_in_array_frame(phantoms / volume["files"]["nifti"])
            shape, spacing, key = SOURCE_SHAPE, volume["source_spacing_mm"], "source_slices"
        for finding in volume["findings"]:
            mask = _ellipsoid_voxels(finding, spacing, shape)
            slices = np.flatnonzero(mask.any(axis=(1, 2)))
            assert [slices[0], slices[-1]] == finding[key]  # the range is tight: first and last slices hold voxels
            # The voxels really are the lesion: brighter or darker than the ring of organ around them.
            ring = _dilate(mask) & ~mask
            inside, around = np.median(image[mask]), np.median(image[ring])
            assert (inside > around) == (finding["kind"] == "hyperdense"), finding
            if fmt == "nifti":
                assert abs(np.mean(image[mask]) - finding["hu"]) < 4 * synthetic.NOISE_HU
            seen += 1
    assert seen >= 10


def _dilate(mask, steps=2):
    return ndimage.binary_dilation(mask, iterations=steps)


def test_slice_ranges_agree_across_resolutions(phantoms):
    """A lesion's model-resolution slices and its source slices cover the same stretch of the body."""
    for volume in _truth(phantoms)["volumes"]:
        model_mm, source_mm = volume["spacing_mm"][0], volume["source_spacing_mm"][0]
        for finding in volume["findings"]:
            (lo, hi), (slo, shi) = finding["slices"], finding["source_slices"]
            assert abs((lo + hi + 1) / 2 * model_mm - (slo + shi + 1) / 2 * source_mm) <= model_mm
            assert finding["nifti_k"] == [SOURCE_SHAPE[0] - 1 - shi, SOURCE_SHAPE[0] - 1 - slo]


def test_records_are_valid_annotations_with_in_range_slices(phantoms):
    truth = _truth(phantoms)
    slices = {v["id"]: [f["slices"] for f in v["findings"]] for v in truth["volumes"]}
    for fmt in ("npy", "nifti"):
        total = 0
        for split in synthetic.SPLITS:
            records = load_records(phantoms / f"annotations/{fmt}/{split}.json", phantoms)
            per_task = sum(len(load_records(phantoms / f"annotations/{fmt}/{t}_{split}.json")) for t in synthetic.TASKS)
            assert len(records) == per_task
            for record in records:
                assert pathlib.Path(record["vision3d"][0]).exists()
                assert record["conversations"][0]["value"].startswith("<image3d>\n")
                answer_slices = record["answer_slices"]
                if answer_slices is not None:
                    assert 0 <= answer_slices[0] <= answer_slices[1] < SHAPE[0]
                if record["question_type"] == synthetic.QUESTION_TYPES["location"]:
                    assert answer_slices in slices[record["id"][: len("phantom_00000")]]
            total += len(records)
        assert total > 5 * len(truth["volumes"])


def test_splits_partition_the_volumes(phantoms):
    truth = _truth(phantoms)
    by_split = collections.defaultdict(set)
    for volume in truth["volumes"]:
        by_split[volume["split"]].add(volume["id"])
    assert sorted(len(v) for v in by_split.values()) == [1, 1, 10]
    for split in synthetic.SPLITS:
        records = json.loads((phantoms / f"annotations/npy/{split}.json").read_text())
        assert {r["id"][: len("phantom_00000")] for r in records} == by_split[split]
        vqa = json.loads((phantoms / f"annotations/npy/vqa_{split}.json").read_text())
        assert sorted(r["id"] for r in vqa) == sorted(r["id"] for r in records if r["question_type"] != 0)


def test_closed_answers_are_balanced_over_letters(tmp_path):
    synthetic.generate(tmp_path, num=60, seed=3, shape=SHAPE, source_shape=SOURCE_SHAPE, formats=("npy",))
    letters = collections.Counter()
    for split in synthetic.SPLITS:
        in_split = collections.Counter()
        by_type = collections.defaultdict(collections.Counter)
        for record in json.loads((tmp_path / f"annotations/npy/vqa_closed_{split}.json").read_text()):
            letter = record["answer_choice"]
            question = record["conversations"][0]["value"]
            assert record["conversations"][1]["value"] == f"{letter}. {record['answer']}"
            assert f"{letter}. {record['answer']}" in question
            assert question.count(f". {record['answer']}") == 1  # the answer is one of the four choices, once
            by_type[record["question_type"]][letter] += 1
            in_split[letter] += 1
        for counts in [*by_type.values(), in_split]:
            assert max(counts[c] for c in "ABCD") - min(counts[c] for c in "ABCD") <= 1
        letters += in_split
    assert max(letters.values()) - min(letters.values()) <= 1
    assert sum(letters.values()) > 150


# Written out, not read from synthetic.NATURAL_ORDER: the orders a reader of the questions sees.
READING_ORDER = {
    4: ("No", "Yes, a single hypodense lesion", "Yes, a single hyperdense lesion", "Yes, several lesions"),
    5: ("the upper third", "the upper and middle thirds", "all three thirds", "the middle third",
        "the middle and lower thirds", "the lower third"),
    6: ("under 2 cm", "2 to 3 cm", "3 to 5 cm", "over 5 cm"),
}


def test_natural_choice_order_lists_choices_in_reading_order(tmp_path):
    synthetic.generate(tmp_path, num=40, seed=3, shape=SHAPE, source_shape=SOURCE_SHAPE, formats=("npy",),
                       choice_order="natural")
    organs = json.loads((tmp_path / "ground_truth.json").read_text())["volumes"][0]["organ_slices"]
    seen = collections.Counter()
    for record in json.loads((tmp_path / "annotations/npy/vqa_closed_train.json").read_text()):
        question = record["conversations"][0]["value"]
        listed = re.split(r" [A-D]\. ", " " + question.split("Choices:")[1])[1:]
        assert len(listed) == 4 and record["answer"] in listed
        letter = "ABCD"[listed.index(record["answer"])]
        assert record["answer_choice"] == letter and record["conversations"][1]["value"] == f"{letter}. {record['answer']}"
        # Organs in the ground truth's head-to-feet listing; the other types in READING_ORDER.
        order = [n for n in organs if n in listed] if record["question_type"] == 3 else READING_ORDER[record["question_type"]]
        assert sorted(listed, key=list(order).index) == listed, question
        seen[record["question_type"]] += 1
    assert set(seen) == {3, 4, 5, 6}
    with pytest.raises(ValueError, match="choice_order"):
        synthetic.generate(tmp_path, num=3, choice_order="alphabetical")


def test_answers_follow_the_ground_truth(tmp_path):
    truth = synthetic.generate(tmp_path, num=30, seed=5, shape=SHAPE, source_shape=SOURCE_SHAPE, formats=("npy",))
    volumes = {v["id"]: v for v in truth["volumes"]}
    for split in synthetic.SPLITS:
        for record in json.loads((tmp_path / f"annotations/npy/vqa_closed_{split}.json").read_text()):
            volume = volumes[record["id"][: len("phantom_00000")]]
            organs = {f["organ"] for f in volume["findings"]}
            kind = record["question_type"]
            if kind == synthetic.QUESTION_TYPES["organ"]:
                choices = [c for c in synthetic.LESION_ORGANS if f". {c} " in record["question"] + " "]
                assert record["answer"] in organs and len(set(choices) & organs) == 1
                ranges = [f["slices"] for f in volume["findings"] if f["organ"] == record["answer"]]
                assert record["answer_slices"] == [min(r[0] for r in ranges), max(r[1] for r in ranges)]
            elif kind == synthetic.QUESTION_TYPES["abnormality"]:
                organ = record["question"].split("lesion in the ")[1].split("?")[0]
                found = [f for f in volume["findings"] if f["organ"] == organ]
                expected = ("No" if not found else "Yes, several lesions" if len(found) > 1
                            else f"Yes, a single {found[0]['kind']} lesion")
                assert record["answer"] == expected
            elif kind == synthetic.QUESTION_TYPES["location"]:
                finding = next(f for f in volume["findings"] if f["slices"] == record["answer_slices"])
                assert record["answer"] == finding["location"]
            elif kind == synthetic.QUESTION_TYPES["size"]:
                assert record["answer"] in {f["size_class"] for f in volume["findings"]}


def test_command_writes_one_format(tmp_path):
    result = run_command("phantoms", "--out", tmp_path, "--num", 3, "--seed", 1, "--shape", "8,16,16",
                         "--format", "nifti", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 phantoms" in result.stdout
    assert not (tmp_path / "npy").exists()
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 3
    assert (tmp_path / "annotations/nifti/train.json").exists()
    assert nib.load(tmp_path / "nifti/phantom_00000.nii.gz").shape == (16, 16, 16)


def test_rejects_shapes_too_small_for_lesions(tmp_path):
    with pytest.raises(ValueError, match="at least 8"):
        synthetic.generate(tmp_path, num=1, shape=(4, 32, 32))


def test_readers_see_the_phantom_in_its_array_frame(phantoms):
    from data_pipelines.readers import read_volume

    for volume in _truth(phantoms)["volumes"][:3]:
        nifti = read_volume(phantoms / volume["files"]["nifti"])
        expected, _ = _nifti_in_array_frame(phantoms / volume["files"]["nifti"])
        np.testing.assert_array_equal(nifti.array, expected)
        np.testing.assert_allclose(nifti.spacing, volume["source_spacing_mm"], rtol=1e-5)
        npy = read_volume(phantoms / volume["files"]["npy"])
        np.testing.assert_array_equal(npy.array, np.load(phantoms / volume["files"]["npy"])[0])


def test_answer_slices_hold_after_preprocessing_the_nifti(tmp_path):
    """Reading the NIfTI and preprocessing it to the model resolution keeps each lesion in its slices.

    Each lesion is isolated as the difference between the phantom and the same phantom (same noise)
    without it, both written, read and preprocessed as the pipeline does.
    """
    from data_pipelines.preprocess import preprocess_volume
    from data_pipelines.readers import read_volume

    def preprocessed(phantom, name):
        source = synthetic.render(phantom, SOURCE_SHAPE, np.random.default_rng(0))
        spacing = np.asarray(phantom.fov_mm) / SOURCE_SHAPE
        nib.save(synthetic.nifti_image(source.hu, spacing), tmp_path / name)
        return preprocess_volume(read_volume(tmp_path / name), shape=SHAPE, modality="ct")[0]

    checked = 0
    for index in range(6):
        phantom = synthetic.sample_phantom(np.random.default_rng([1, index]), shape=SHAPE, source_shape=SOURCE_SHAPE)
        model = synthetic.render(phantom, SHAPE, np.random.default_rng(0))
        full = preprocessed(phantom, "full.nii.gz")
        for number, (finding, (lo, hi)) in enumerate(zip(phantom.findings, model.finding_slices)):
            others = tuple(f for f in phantom.findings if f is not finding)
            without = preprocessed(dataclasses.replace(phantom, findings=others), f"without_{number}.nii.gz")
            mass = np.abs(full - without).sum(axis=(1, 2))
            touched = np.flatnonzero(mass > 0)
            assert lo <= int(np.argmax(mass)) <= hi
            assert lo - 1 <= touched[0] and touched[-1] <= hi + 1
            assert mass[lo : hi + 1].sum() >= 0.6 * mass.sum()  # 0.74 at worst over 58 lesions
            checked += 1
    assert checked >= 5


def test_enhanced_contrast_draws_enhanced_organs_and_conspicuous_lesions():
    enhanced_hu = {"heart": 150.0, "liver": 110.0, "spleen": 120.0, "right kidney": 160.0, "left kidney": 160.0}
    plain_hu = {"right lung": -820.0, "left lung": -820.0, "heart": 40.0, "liver": 60.0, "spleen": 50.0,
                "right kidney": 30.0, "left kidney": 30.0, "bladder": 10.0}
    lesions = collections.Counter()
    for index in range(40):
        plain, enhanced = (synthetic.sample_phantom(np.random.default_rng([1, index]), shape=(32, 64, 64),
                                                    source_shape=(64, 64, 64), contrast=contrast)
                           for contrast in ("plain", "enhanced"))
        for name, hu in plain_hu.items():
            assert abs(plain.organs[name].hu - hu) <= 5
            assert abs(enhanced.organs[name].hu - enhanced_hu.get(name, hu)) <= 5
        for finding in enhanced.findings:
            assert finding.diameter_mm >= 20
            if finding.organ.endswith("lung"):
                continue
            step = finding.ellipsoid.hu - enhanced.organs[finding.organ].hu
            if finding.kind == "hypodense":
                assert -500 <= step <= -300
            else:
                assert 400 <= step <= 600
            lesions[finding.kind] += 1
    assert min(lesions.values()) >= 10 and len(lesions) == 2
    with pytest.raises(ValueError, match=r"contrast must be one of \('plain', 'enhanced'\)"):
        synthetic.generate("/nonexistent", num=1, contrast="arterial")
