"""The real-CT grounded set: its answers are those of TotalSegmentator's labels, recomputed here with
nibabel, pydicom and torch (not with the code under test), and it runs through the pipeline."""

from __future__ import annotations

import collections
import filecmp
import json
import pathlib
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from commands_for_tests import run_command
from data_pipelines import real_ct
from data_pipelines.annotations import load_records
from data_pipelines.assets import AssetError, asset_path

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLICES = 32
# Thirds of 32 slices, written out: what "upper" / "middle" / "lower third" mean on the model grid.
THIRDS = {0: range(0, 11), 1: range(11, 22), 2: range(22, 32)}
WHERE = {
    (0, 0): "the upper third", (1, 1): "the middle third", (2, 2): "the lower third",
    (0, 1): "the upper and middle thirds", (1, 2): "the middle and lower thirds", (0, 2): "all three thirds",
}


@pytest.fixture(scope="module")
def assets():
    try:
        return {case.id: (asset_path(case.volume), asset_path(case.labels)) for case in real_ct.CASES}
    except AssetError as error:
        pytest.skip(f"TotalSegmentator CTs not fetched: {error}")


@pytest.fixture(scope="module")
def grounded(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_ct")
    return out, real_ct.build_grounded_set(out, seed=0)


def canonical(image: nib.Nifti1Image) -> np.ndarray:
    """A NIfTI image's voxels with axes (superior→inferior, anterior→posterior, right→left), via nibabel's
    RAS canonical form."""
    ras = np.asarray(nib.as_closest_canonical(image).dataobj)
    return ras.transpose(2, 1, 0)[::-1, ::-1, ::-1]


def dicom_hu(directory) -> np.ndarray:
    """The DICOM series in HU, superior slice first, read with pydicom alone. Axial slices whose rows run
    to the patient's left and columns to the posterior are already in the frame above."""
    pydicom = pytest.importorskip("pydicom")
    slices = [pydicom.dcmread(p) for p in sorted(pathlib.Path(directory).iterdir())]
    for ds in slices:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    slices.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])


@pytest.fixture(scope="module")
def truth(assets):
    """Per case: HU and labels in the canonical frame, read independently of the library."""
    volume, labels = assets["totalseg_abdomen"]
    abdomen = (canonical(nib.load(volume)).astype(np.float32), canonical(nib.load(labels)))
    volume, labels = assets["totalseg_dicom"]
    dicom = (dicom_hu(volume), canonical(nib.load(labels)))
    return {"totalseg_abdomen": abdomen, "totalseg_dicom": dicom}


def model_range(hu: np.ndarray, mask: np.ndarray) -> tuple[int, int] | None:
    """The organ's slices among 32 after the pipeline's crop and depth resize.

    The crop keeps the box of HU > -1000 (the window's floor; every case goes below it, so min-max maps
    it to 0); slice k of the trilinear resize (torch, align_corners=False) shows the organ when at least
    half of its weight lies on slices holding the organ.
    """
    assert hu.min() <= -1000
    body = hu > -1000
    depth, rows, cols = (np.flatnonzero(body.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
    cropped = mask[depth[0] : depth[-1] + 1, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    profile = torch.tensor(cropped.any(axis=(1, 2)), dtype=torch.float64)[None, None]
    weight = torch.nn.functional.interpolate(profile, size=SLICES, mode="linear", align_corners=False)[0, 0]
    shown = np.flatnonzero(weight.numpy() >= 0.5)
    return (int(shown[0]), int(shown[-1])) if shown.size else None


def third(k: int) -> int:
    return next(t for t, ks in THIRDS.items() if k in ks)


def choices_of(record) -> dict[str, str]:
    found = re.search(r"Choices: A\. (.*) B\. (.*) C\. (.*) D\. (.*)$", record["conversations"][0]["value"])
    return dict(zip("ABCD", found.groups()))


def records_of(paths, name):
    return json.loads(pathlib.Path(paths[name]).read_text())


def case_of(record) -> str:
    return next(case.id for case in real_ct.CASES if record["id"].startswith(case.id + "_"))


# ---------------------------------------------------------------------------------------------------


def test_answers_and_slice_ranges_follow_the_labels(grounded, truth):
    _, paths = grounded
    records = records_of(paths, "test")
    checked = collections.Counter()
    for record in records:
        hu, labels = truth[case_of(record)]
        voxel_ml = {"totalseg_abdomen": 27.0, "totalseg_dicom": 2.0 * 0.9765625**2}[case_of(record)] / 1000
        answer = record["conversations"][1]["value"]
        if "organ" in record:
            mask = labels == real_ct.ORGANS[record["organ"]][0]
            expected = model_range(hu, mask)
            if mask.any():
                assert mask.sum() * voxel_ml >= 1.0, record["id"]  # stray voxels are asked about nowhere
            assert record["answer_slices"] == (list(expected) if expected else None), record["id"]
            if "_location_" in record["id"]:
                where = WHERE[third(expected[0]), third(expected[1])] if expected else "not in the scan"
                if record["id"].endswith("_closed"):
                    assert choices_of(record)[record["answer_choice"]] == where, record["id"]
                    assert answer == f"{record['answer_choice']}. {where}"
                else:
                    assert where in answer
            else:
                assert answer == ("Yes." if mask.any() else "No."), record["id"]
        else:
            sizes = {name: int((labels == real_ct.ORGANS[name][0]).sum()) for name in record["organs"]}
            largest, second = sorted(sizes, key=sizes.get, reverse=True)[:2]
            assert sizes[largest] >= 1.25 * sizes[second]
            words = real_ct.ORGANS[largest][1]
            expected = model_range(hu, labels == real_ct.ORGANS[largest][0])
            assert record["answer_slices"] == list(expected), record["id"]
            if record["id"].endswith("_closed"):
                assert choices_of(record)[record["answer_choice"]] == words
                assert sorted(choices_of(record).values()) == sorted(real_ct.ORGANS[n][1] for n in record["organs"])
            else:
                assert answer == f"The {words}."
        checked[record["id"].split("_")[2]] += 1
    # Every kind, in both cases, and absent organs too.
    assert checked["location"] >= 20 and checked["largest"] >= 8 and checked["presence"] >= 20
    assert any(r["answer"] == "No." for r in records) and any(r["answer_slices"] is None for r in records)


def test_slice_ranges_lie_on_the_model_grid(grounded):
    _, paths = grounded
    ranges = [r["answer_slices"] for r in records_of(paths, "test") if r["answer_slices"] is not None]
    assert ranges
    for first, last in ranges:
        assert 0 <= first <= last < SLICES


def test_closed_letters_are_balanced_and_files_partition_the_records(grounded):
    _, paths = grounded
    closed, opened, every = (records_of(paths, name) for name in ("vqa_closed_test", "vqa_open_test", "test"))
    assert {r["id"] for r in closed} | {r["id"] for r in opened} == {r["id"] for r in every}
    assert len(closed) + len(opened) == len(every)
    counts = collections.Counter(r["answer_choice"] for r in closed)
    assert set(counts) == set("ABCD") and max(counts.values()) - min(counts.values()) <= 1


def test_same_seed_writes_identical_files(grounded, tmp_path):
    out, paths = grounded
    again = real_ct.build_grounded_set(tmp_path, seed=0)
    for name, path in paths.items():
        assert filecmp.cmp(path, again[name], shallow=False), name
    other = real_ct.build_grounded_set(tmp_path / "other", seed=1)
    assert records_of(other, "vqa_closed_test") != records_of(paths, "vqa_closed_test")


def test_records_load_and_run_through_the_pipeline_in_eval_mode(grounded):
    pytest.importorskip("grain")
    from data_pipelines import pipeline
    from data_pipelines.preprocess import preprocess_volume
    from data_pipelines.readers import read_volume
    from data_pipelines.templates import load_tokenizer
    from med2e3_jax.data_config import data_config

    out, paths = grounded
    records = load_records(paths["test"], out)
    # One record per case and kind keeps the DICOM decoding short.
    picked = list({(case_of(r), r["id"].split("_")[2], "answer_choice" in r): r
                   for r in records}.values())
    assert len(picked) >= 8
    cfg = data_config()
    cfg.update(volume_shape=(32, 64, 64), max_length=96, num_vision_tokens=4, question_max_length=32, batch_size=4,
               shuffle=False, augment=False, strict=True, drop_remainder=False, read_threads=1)
    try:
        tokenizer, question_tokenizer = (load_tokenizer(asset_path(name)) for name in ("tokenizers/phi3", "minilm"))
    except AssetError as error:
        pytest.skip(f"tokenizers not fetched: {error}")
    iterator = iter(pipeline.make_dataset(picked, cfg, train=False, tokenizer=tokenizer,
                                          question_tokenizer=question_tokenizer))
    batches = list(iterator)
    iterator.close()
    indices = np.concatenate([b["record_index"] for b in batches])
    np.testing.assert_array_equal(indices, np.arange(len(picked)))
    volumes = np.concatenate([b["volume"] for b in batches])
    expected = {}
    for record, volume in zip(picked, volumes):
        path = record["vision3d"][0]
        if path not in expected:
            # NIfTI and CT DICOM are read in HU: "auto" must have chosen the CT window.
            expected[path] = preprocess_volume(read_volume(path), shape=(32, 64, 64), modality="ct")
        np.testing.assert_array_equal(volume, expected[path])
    assert len(expected) == 2
    assert all((b["labels"] != -100).any(axis=1).all() for b in batches)


def test_label_ids_are_totalsegmentators_named_masks(assets):
    # example_seg.nii.gz (a label map) and example_seg_fast/<organ>.nii.gz (one file per organ, by name)
    # segment the same scan with two TotalSegmentator models: each id must pick out its named organ.
    labels = np.asarray(nib.load(assets["totalseg_abdomen"][1]).dataobj)
    named = pathlib.Path(asset_path("totalsegmentator/example_seg_fast"))
    compared = 0
    for name, (label, _) in real_ct.ORGANS.items():
        mask = np.asarray(nib.load(named / f"{name}.nii.gz").dataobj) > 0
        ours = labels == label
        if mask.sum() < 100 and ours.sum() < 100:
            continue
        dice = 2 * (mask & ours).sum() / (mask.sum() + ours.sum())
        assert dice > 0.75, (name, label, dice)
        compared += 1
    assert compared >= 15


def test_labels_lie_on_the_tissue_they_name(assets):
    # In the frame of the library's readers, the organs have their HU: the label maps fit their volumes.
    for case in real_ct.CASES:
        volume, labels = real_ct.read_case(case)
        hu = volume.array

        def mean(name):
            return float(hu[labels == real_ct.ORGANS[name][0]].mean())

        assert 20 < mean("liver") < 150 and 20 < mean("spleen") < 150, case.id
        assert mean("colon") < -300, case.id  # gas-filled
    assert real_ct.read_case(real_ct.CASES[0])[0].array.shape == (30, 101, 122)


def test_a_label_map_on_another_volume_is_refused(assets, tmp_path):
    # example_seg shares example_ct's affine but not its slices: the shapes give it away.
    wrong = real_ct.Case("wrong", "totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg.nii.gz", "nifti")
    refusal = r"example_seg\.nii\.gz.*\(30, 101, 122\).*example_ct\.nii\.gz"
    with pytest.raises(real_ct.MaskAlignmentError, match=refusal):
        real_ct.read_case(wrong)
    # Same shape, shifted by one voxel in the world: the affines give it away.
    folder = tmp_path / "totalsegmentator"
    folder.mkdir()
    shutil.copy(assets["totalseg_abdomen"][0], folder / "example_ct_sm.nii.gz")
    image = nib.load(assets["totalseg_abdomen"][1])
    shifted = image.affine.copy()
    shifted[2, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), str(folder / "example_seg.nii.gz"))
    with pytest.raises(real_ct.MaskAlignmentError, match="affine"):
        real_ct.read_case(real_ct.CASES[0], cache=str(tmp_path))


def test_command_writes_the_set(assets, tmp_path):
    result = run_command("real_ct", "--out", tmp_path, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "about 2 real CTs" in result.stdout
    for name in ("annotations/source/test.json", "ground_truth.json", "nifti/totalseg_abdomen.nii.gz"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "dicom/totalseg_dicom").iterdir())) == 20
