"""scripts/generate.py end to end: a phantom NIfTI and a random tiny model (loaded with nf4 LLM
projections) in, an answer and a PNG out."""

import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402
from data_pipelines import synthetic  # noqa: E402
from data_pipelines.assets import AssetError, asset_path  # noqa: E402
from med2e3_jax.checkpoint.orbax_params import save_params  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers():
    try:
        return asset_path("tokenizers/phi3"), asset_path("minilm")
    except AssetError as error:
        pytest.skip(f"tokenizer assets not fetched: {error}")


def test_generate_script_answers_a_phantom_nifti_and_writes_the_slice_figure(tmp_path, tokenizers):
    synthetic.generate(tmp_path / "data", num=1, seed=0, shape=(32, 64, 64), formats=("nifti",))
    (volume,) = sorted((tmp_path / "data" / "nifti").glob("*.nii.gz"))
    save_params(Med2E3(tiny.tiny_model(), rngs=nnx.Rngs(0)), tmp_path / "model")

    command = [sys.executable, str(ROOT / "scripts" / "generate.py"), f"--volume={volume}",
               "--question=Which organ shows a lesion?", f"--checkpoint={tmp_path / 'model'}",
               f"--tokenizer={tokenizers[0]}", f"--question_tokenizer={tokenizers[1]}", "--max_new_tokens=3",
               "--quantize=nf4"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figure = volume.with_name(volume.name[: -len(".nii.gz")] + "_slices.png")
    assert figure.stat().st_size > 10_000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result.stdout.splitlines()) == 1  # one question, one answer (random weights: any text)
    assert "quantized 8 Linear kernels to nf4" in result.stderr
