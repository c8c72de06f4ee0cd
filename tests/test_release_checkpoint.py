"""A random checkpoint in the authors' release layout, converted to Orbax and read back; the full model's
parameter counts against the published ones; readers that give back the file pages they read."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from configs import med2e3_m3d
from med2e3_jax.checkpoint.importer import export_pytorch, param_counts
from med2e3_jax.checkpoint.llm_port import llm_config_from_hf
from med2e3_jax.checkpoint.med2e3_port import FULL_TABLE
from med2e3_jax.checkpoint.orbax_params import load_config, restore_params
from med2e3_jax.checkpoint.sources import RELEASE_PREFIXES, SafetensorsSource, TorchBinSource
from med2e3_jax.checkpoint.writers import write_safetensors
from med2e3_jax.models.med2e3 import Med2E3

torch = pytest.importorskip("torch")

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MAKE = os.path.join(REPO, "benchmarks", "make_release_checkpoint.py")
CONVERT = os.path.join(REPO, "scripts", "convert_checkpoint.py")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """benchmarks/make_release_checkpoint.py on the tiny config, then scripts/convert_checkpoint.py to Orbax
    in bf16: the full-size pipeline at test size."""
    out = tmp_path_factory.mktemp("made")
    common = dict(check=True, capture_output=True, text=True, timeout=300, cwd=REPO)
    subprocess.run([sys.executable, MAKE, "--config=configs/tiny.py", f"--out={out}", "--seed=3"], **common)
    subprocess.run([sys.executable, CONVERT, "--config=configs/tiny.py", "--config.model.param_dtype=bfloat16",
                    f"--checkpoint={out}/release", f"--out={out}/orbax"], **common)
    return out


def _written(made):
    """Module-path key -> torch tensor of every tensor in the release folders, read with plain torch.load."""
    tensors = {}
    for folder, prefix in RELEASE_PREFIXES.items():
        state = torch.load(made / "release" / folder / "pytorch_model.bin", weights_only=True)
        assert not any(key.startswith(prefix) for key in state), f"{folder}: prefix {prefix!r} not stripped"
        tensors.update({prefix + key: value for key, value in state.items()})
    return tensors


def _bits(array: np.ndarray) -> np.ndarray:
    assert array.dtype == ml_dtypes.bfloat16, array.dtype
    return array.view(np.int16)


def test_release_layout_is_five_bf16_folders_with_the_unused_tensors_included(made):
    assert sorted(os.listdir(made / "release")) == sorted(RELEASE_PREFIXES)
    written = _written(made)
    assert {value.dtype for value in written.values()} == {torch.bfloat16}
    unused = sorted(key for key in written if FULL_TABLE.target_for(key) is None)
    assert all(FULL_TABLE.is_unused(key) for key in unused)
    assert len(unused) == 20  # SigLIP post_layernorm (2) and MAP head (11); M3D norm (2), mm_*_proj (4), logit_scale
    assert "vision2d_model.vision2d_encoder.vision_model.head.probe" in unused
    assert "vision3d_model.vision3d_encoder.logit_scale" in unused


def test_converted_orbax_params_equal_the_written_tensors_bit_for_bit(made):
    restored = restore_params(made / "orbax")
    assert load_config(made / "orbax").param_dtype == "bfloat16"
    exported = export_pytorch(restored, FULL_TABLE)  # torch key -> torch-layout numpy array
    written = _written(made)
    assert sorted(exported) == sorted(key for key in written if FULL_TABLE.target_for(key) is not None)
    for key, value in exported.items():
        want = written[key].view(torch.int16).numpy()
        assert value.shape == want.shape and np.array_equal(_bits(value), want), key


def test_sharded_llm_loads_into_transformers_phi3_with_the_release_tensors(made):
    transformers = pytest.importorskip("transformers")
    index = json.loads((made / "llm_hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    model = transformers.Phi3ForCausalLM.from_pretrained(made / "llm_hf", dtype=torch.bfloat16)
    release_llm = torch.load(made / "release" / "llm" / "pytorch_model.bin", weights_only=True)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(release_llm)
    for key, value in release_llm.items():
        assert loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], value), key

    tiny = load_config(made / "orbax").llm
    hf = llm_config_from_hf(model.config.to_dict())
    for field in ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert hf[field] == tiny[field], field
    for field in ("short_factor", "long_factor", "original_max_position_embeddings"):
        assert hf.rope_scaling[field] == tiny.rope_scaling[field], field


def test_full_model_parameter_counts_match_the_published_models():
    cfg = med2e3_m3d.get_config().model
    counts = param_counts(nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(0))))
    assert round(counts["llm"] / 1e6) == 3821  # Phi-3-mini-128k-instruct: 3,821M
    assert round(counts["vision2d"] / 1e6) == 303  # siglip-large-patch16-256 vision tower, no MAP head: ~303M
    assert round(counts["vision3d"] / 1e5) == 874  # M3D-CLIP ViT-B/(4,16,16): 87.4M
    assert round(counts["question_encoder"] / 1e6) == 109  # bert-base-uncased with pooler: 109M
    # Connectors Linear(in, 3072) -> GELU -> Linear(3072, 3072); TG-IS's text_mlp Linear(768, 3072).
    assert counts["vision3d_connector"] == 768 * 3072 + 3072 + 3072 * 3072 + 3072
    assert counts["vision2d_connector"] == 1024 * 3072 + 3072 + 3072 * 3072 + 3072
    assert counts["tgis"] == 768 * 3072 + 3072
    assert len(counts) == 7


def _resident_file_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        line = next(line for line in f if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's")
@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_readers_give_back_the_file_pages_they_read(tmp_path, kind):
    # 8 tensors of 8 MB: mapped pages kept resident would show as 64 MB more RssFile after reading them.
    tensors = {f"t{i}": np.full((2048, 1024), i, np.float32) for i in range(8)}
    if kind == "bin":
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "model.bin")
        source = TorchBinSource(tmp_path / "model.bin")
    else:
        write_safetensors(tensors, tmp_path / "model.safetensors")
        source = SafetensorsSource(tmp_path / "model.safetensors")
    before = _resident_file_bytes()
    for key, want in tensors.items():
        assert np.array_equal(source.read(key), want), key
    assert _resident_file_bytes() - before < 16 * 2**20
