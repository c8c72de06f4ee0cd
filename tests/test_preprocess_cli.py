"""`med2e3-preprocess` writes what the evaluation pipeline feeds the model."""

import pathlib

import numpy as np
import pytest

from commands_for_tests import run_command
from data_pipelines import synthetic
from data_pipelines.assets import AssetError, asset_path
from data_pipelines.preprocess import preprocess_volume
from data_pipelines.readers import read_volume

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (8, 16, 16)


def run_cli(*args):
    return run_command("preprocess", *args, cwd=ROOT.parent, timeout=120)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    synthetic.generate(out, num=1, seed=4, shape=SHAPE, source_shape=(12, 20, 20))
    return out


@pytest.mark.parametrize("name, modality", [("nifti/phantom_00000.nii.gz", "ct"), ("npy/phantom_00000.npy", "unit")])
def test_cli_writes_the_pipelines_evaluation_volume_of_a_phantom(phantom, tmp_path, name, modality):
    out = tmp_path / "volume.npy"
    result = run_cli("--input", phantom / name, "--output", out, "--shape", ",".join(map(str, SHAPE)))
    assert result.returncode == 0, result.stderr
    written = np.load(out)
    # The pipeline's default modality is "auto": the file's hint decides.
    expected = preprocess_volume(read_volume(phantom / name), shape=SHAPE, modality=modality)
    assert written.dtype == np.float32 and written.shape == (1, *SHAPE)
    np.testing.assert_array_equal(written, expected)
    source = read_volume(phantom / name)
    assert f"shape (depth, height, width): {source.array.shape}" in result.stdout
    low, high = float(source.array.min()), float(source.array.max())
    assert f"values {low:g} .. {high:g} (read as {modality})" in result.stdout


def test_cli_modality_mr_skips_the_hu_window(phantom, tmp_path):
    path = phantom / "nifti/phantom_00000.nii.gz"
    result = run_cli("--input", path, "--output", tmp_path / "mr.npy", "--shape", ",".join(map(str, SHAPE)), "--modality", "mr")
    assert result.returncode == 0, result.stderr
    mr = np.load(tmp_path / "mr.npy")
    np.testing.assert_array_equal(mr, preprocess_volume(read_volume(path), shape=SHAPE, modality="mr"))
    assert not np.array_equal(mr, preprocess_volume(read_volume(path), shape=SHAPE, modality="ct"))


def test_cli_reports_a_missing_input_by_name_and_fails(tmp_path):
    missing = tmp_path / "absent.nii.gz"
    result = run_cli("--input", missing, "--output", tmp_path / "x.npy")
    assert result.returncode == 1
    assert "MissingFileError" in result.stderr and str(missing) in result.stderr
    assert not (tmp_path / "x.npy").exists()


def _asset(name):
    try:
        return asset_path(name)
    except AssetError as error:
        pytest.skip(f"{error}")


@pytest.mark.parametrize("name", ["totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_ct_dicom"])
def test_cli_on_the_real_ct_at_the_model_size(tmp_path, name):
    path = _asset(name)
    out = tmp_path / "real.npy"
    result = run_cli("--input", path, "--output", out)
    assert result.returncode == 0, result.stderr
    written = np.load(out)
    assert written.dtype == np.float32 and written.shape == (1, 32, 256, 256)
    np.testing.assert_array_equal(written, preprocess_volume(read_volume(path), modality="ct"))
    assert "(read as ct)" in result.stdout
    spacing = "3 x 3 x 3 mm" if name.endswith(".nii.gz") else "2 x 0.976562 x 0.976562 mm"
    assert spacing in result.stdout
