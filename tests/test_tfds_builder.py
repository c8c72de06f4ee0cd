"""The TFDS/ArrayRecord store of preprocessed volumes: written and read without TensorFlow, faithful."""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from commands_for_tests import run_command  # noqa: E402
from data_pipelines import synthetic, tfds_builder  # noqa: E402
from data_pipelines.annotations import load_records  # noqa: E402
from data_pipelines.errors import DataError  # noqa: E402
from data_pipelines.preprocess import preprocess_volume  # noqa: E402
from data_pipelines.readers import read_volume  # noqa: E402

SHAPE = (8, 16, 16)
SOURCE_SHAPE = (12, 20, 18)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(out, num=4, seed=2, shape=SHAPE, source_shape=SOURCE_SHAPE)
    return out


def _records(phantoms, fmt="nifti"):
    return {s: load_records(phantoms / f"annotations/{fmt}/{s}.json", phantoms) for s in synthetic.SPLITS}


@pytest.fixture(scope="module")
def built(phantoms, tmp_path_factory) -> dict[str, pathlib.Path]:
    """One store per quantisation, of the NIfTI phantoms, through the pipeline's own preprocessing."""
    stores = {}
    for dtype in ("uint8", "float16", "float32"):
        out = tmp_path_factory.mktemp(f"store_{dtype}")
        tfds_builder.build_preprocessed(_records(phantoms), out, shape=SHAPE, modality="ct", dtype=dtype)
        stores[dtype] = out
    return stores


def test_builds_and_reads_without_importing_tensorflow(phantoms, tmp_path):
    """A fresh interpreter builds a store and reads it back and never imports TensorFlow (installed or not)."""
    script = textwrap.dedent(
        f"""
        import sys
        from data_pipelines import tfds_builder
        from data_pipelines.annotations import load_records
        records = {{"train": load_records({str(phantoms / 'annotations/npy/train.json')!r}, {str(phantoms)!r})}}
        tfds_builder.build_preprocessed(records, {str(tmp_path)!r}, shape={SHAPE!r})
        source = tfds_builder.open_preprocessed({str(tmp_path)!r}, "train")
        assert len(source) == len(records["train"]) and source[0]["record"] == records["train"][0]
        assert "tensorflow" not in sys.modules, "TensorFlow was imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_volumes_come_back_within_their_quantisation(built, phantoms, dtype):
    source = tfds_builder.open_preprocessed(built[dtype], "train")
    expected = _records(phantoms)["train"]
    worst = 0.0
    for index in range(len(source)):
        example = source[index]
        reference = preprocess_volume(read_volume(expected[index]["vision3d"][0]), shape=SHAPE, modality="ct")
        assert example["volume"].dtype == np.float32 and example["volume"].shape == (1, *SHAPE)
        worst = max(worst, float(np.abs(example["volume"] - reference).max()))
    assert worst <= tfds_builder.QUANTISATION_ERROR[dtype] * (1 + 1e-6)
    if dtype == "float32":
        assert worst == 0.0


def test_records_come_back_unchanged_and_in_order(built, phantoms):
    expected = _records(phantoms)
    for split in synthetic.SPLITS:
        source = tfds_builder.open_preprocessed(built["uint8"], split)
        assert len(source) == len(expected[split])
        assert [source[i]["record"] for i in range(len(source))] == expected[split]


def test_each_volume_is_stored_once(built, phantoms):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(built["uint8"] / tfds_builder.VOLUMES_NAME / tfds_builder.VERSION))
    for split, records in _records(phantoms).items():
        distinct = {r["vision3d"][0] for r in records}
        assert builder.info.splits[split].num_examples == len(distinct) < len(records)
    assert builder.info.metadata["dtype"] == "uint8"
    assert builder.info.metadata["shape"] == list(SHAPE)


def test_source_serves_grain_and_pickles_small(built):
    import grain

    source = tfds_builder.open_preprocessed(built["uint8"], "train")
    ids = [source[i]["record"]["id"] for i in range(len(source))]
    shuffled = list(grain.MapDataset.source(source).shuffle(seed=3).map(lambda e: e["record"]["id"]))
    assert sorted(shuffled) == sorted(ids) and shuffled != ids
    payload = pickle.dumps(source)
    assert len(payload) < 2000
    again = pickle.loads(payload)
    np.testing.assert_array_equal(again[1]["volume"], source[1]["volume"])
    with pytest.raises(IndexError):
        source[len(source)]


def test_unknown_split_names_the_ones_present(built):
    with pytest.raises(DataError, match=r"no split 'validation'.*'test', 'train', 'val'"):
        tfds_builder.open_preprocessed(built["uint8"], "validation")
    with pytest.raises(DataError, match="no prepared TFDS dataset"):
        tfds_builder.open_preprocessed(built["uint8"] / "nowhere", "train")


def test_bad_volume_stops_a_strict_build_and_is_skipped_otherwise(phantoms, tmp_path, caplog):
    records = _records(phantoms)["train"]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((phantoms / "nifti/phantom_00000.nii.gz").read_bytes()[:200])
    bad = [dict(records[0], id="bad_record", vision3d=[str(broken)])]
    with pytest.raises(DataError, match="broken.nii.gz"):
        tfds_builder.build_preprocessed({"train": records + bad}, tmp_path / "strict", shape=SHAPE)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.tfds_builder"):
        tfds_builder.build_preprocessed({"train": bad + records}, tmp_path / "lenient", shape=SHAPE, strict=False)
    assert "broken.nii.gz" in caplog.text
    source = tfds_builder.open_preprocessed(tmp_path / "lenient", "train")
    assert [source[i]["record"] for i in range(len(source))] == records


def test_refuses_to_overwrite_unless_asked(phantoms, tmp_path):
    records = {"test": _records(phantoms, "npy")["test"]}
    tfds_builder.build_preprocessed(records, tmp_path, shape=SHAPE)
    with pytest.raises(FileExistsError, match="overwrite"):
        tfds_builder.build_preprocessed(records, tmp_path, shape=SHAPE)
    tfds_builder.build_preprocessed(records, tmp_path, shape=SHAPE, dtype="float32", overwrite=True)
    assert tfds_builder.open_preprocessed(tmp_path, "test").metadata["dtype"] == "float32"


def test_command_builds_from_annotation_files(phantoms, tmp_path):
    result = run_command("build_tfds", "--out", tmp_path, "--image_root", phantoms, "--shape", ",".join(map(str, SHAPE)),
                         "--threads", 2, "--split", f"val={phantoms / 'annotations/npy/val.json'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = load_records(phantoms / "annotations/npy/val.json", phantoms)
    source = tfds_builder.open_preprocessed(tmp_path, "val")
    assert [source[i]["record"] for i in range(len(source))] == expected
    assert json.loads((tmp_path / "med2e3_volumes/1.0.0/metadata.json").read_text())["modality"] == "auto"
