"""Strict import of the authors' checkpoints into the whole model, in every layout, and export back."""

import os
import subprocess
import sys

import numpy as np
import pytest
from assets_for_tests import PUBLIC_FIXTURE
from flax import nnx
from safetensors.numpy import load_file

from med2e3_jax.checkpoint.importer import load_pytorch, params_numpy
from med2e3_jax.checkpoint.loading import export_med2e3, load_med2e3
from med2e3_jax.checkpoint.med2e3_port import FULL_TABLE
from med2e3_jax.checkpoint.orbax_params import restore_params, save_params
from med2e3_jax.checkpoint.port import CheckpointMismatchError, DictSource
from med2e3_jax.checkpoint.writers import write_release_layout, write_safetensors
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.parity import load_fixture_model

REPO = os.path.join(os.path.dirname(__file__), "..")
FIXTURE = str(PUBLIC_FIXTURE)
WEIGHTS = os.path.join(FIXTURE, "model.safetensors")


@pytest.fixture(scope="module")
def fixture_model():
    return load_fixture_model(FIXTURE)[0]


@pytest.fixture(scope="module")
def state_dict():
    return load_file(WEIGHTS)


def _abstract(model):
    return nnx.eval_shape(lambda: Med2E3(model.cfg, rngs=nnx.Rngs(0)))


def _assert_same_params(a, b):
    pa, pb = params_numpy(a), params_numpy(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype and np.array_equal(pa[path], pb[path]), path


def test_unused_tensors_are_exactly_those_the_authors_forward_never_touches(fixture_model, state_dict):
    # keys.txt, written from the authors' forward, marks each tensor used or unused (no loss gradient).
    with open(os.path.join(FIXTURE, "keys.txt"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    unused_by_authors = {key for key, _, _, usage in rows if usage.startswith("unused")}
    _, report = load_pytorch(_abstract(fixture_model), DictSource(state_dict), FULL_TABLE)
    assert set(report.unused) == unused_by_authors
    assert set(report.mapped) == set(state_dict) - unused_by_authors


def test_text_mlp_is_imported_not_dropped(fixture_model, state_dict):
    np.testing.assert_array_equal(
        np.asarray(fixture_model.tgis.text_mlp.kernel[...]), state_dict["vision3d_connector.text_mlp.weight"].T
    )


def test_missing_tensor_is_named(fixture_model, state_dict):
    partial = {k: v for k, v in state_dict.items() if k != "vision3d_connector.text_mlp.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \(1\):\n  tgis\.text_mlp\.kernel .*text_mlp\.weight"):
        load_pytorch(_abstract(fixture_model), DictSource(partial), FULL_TABLE)


def test_unexpected_tensor_is_named(fixture_model, state_dict):
    extra = dict(state_dict, **{"llm.model.layers.0.self_attn.rotary_scale": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors \(1\):\n  llm\.model\.layers\.0\.self_attn\.rotary_scale \[3\]"):
        load_pytorch(_abstract(fixture_model), DictSource(extra), FULL_TABLE)


def test_tensor_of_a_layer_the_model_lacks_is_unexpected(fixture_model, state_dict):
    extra = dict(state_dict)
    extra["llm.model.layers.2.mlp.down_proj.weight"] = state_dict["llm.model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"llm\.model\.layers\.2\.mlp\.down_proj\.weight .*which this model does not have"):
        load_pytorch(_abstract(fixture_model), DictSource(extra), FULL_TABLE)


def test_wrong_shape_names_the_key_and_both_shapes(fixture_model, state_dict):
    bad = dict(state_dict)
    bad["vision2d_connector._connector.0.weight"] = np.zeros((64, 31), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"vision2d_connector\._connector\.0\.weight .*shape \[64, 31\].*expects \[32, 64\]"):
        load_pytorch(_abstract(fixture_model), DictSource(bad), FULL_TABLE)


def test_import_export_import_is_bit_exact(fixture_model, state_dict, tmp_path):
    written = export_med2e3(fixture_model, tmp_path / "exported.safetensors")
    exported = load_file(tmp_path / "exported.safetensors")
    assert set(written) == set(exported)
    for key, value in exported.items():  # export writes the authors' own names, layouts and values
        assert np.array_equal(value, state_dict[key]), key
    again, _ = load_med2e3(fixture_model.cfg, tmp_path / "exported.safetensors")
    _assert_same_params(again, fixture_model)


def test_release_layout_imports_like_the_state_dict(fixture_model, state_dict, tmp_path):
    pytest.importorskip("torch")
    write_release_layout(state_dict, tmp_path / "release")
    assert sorted(os.listdir(tmp_path / "release")) == sorted(
        ["llm", "vision2d_model", "vision2d_connector", "vision3d_model", "vision3d_connector"]
    )
    model, _ = load_med2e3(fixture_model.cfg, tmp_path / "release")
    _assert_same_params(model, fixture_model)


def test_component_checkpoints_fill_their_parts_and_leave_the_rest_initialised(fixture_model, state_dict, tmp_path):
    def strip(prefix):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    write_safetensors(strip("llm."), tmp_path / "llm.safetensors")
    # transformers 5.x SiglipVisionModel names: no `vision_model.` level.
    write_safetensors(strip("vision2d_model.vision2d_encoder.vision_model."), tmp_path / "siglip.safetensors")
    write_safetensors(strip("vision3d_model.vision3d_encoder."), tmp_path / "m3d_clip.safetensors")
    model, reports = load_med2e3(
        fixture_model.cfg,
        components={name: tmp_path / f"{name}.safetensors" for name in ("llm", "siglip", "m3d_clip")},
        seed=3,
    )
    # keys.txt: 15 LLM tensors; 35 used SigLIP ones; 26 ViT + 23 BERT ones.
    assert [len(r.mapped) for r in reports] == [15, 35, 49]
    ours, reference = params_numpy(model), params_numpy(fixture_model)
    for path, value in ours.items():
        same = np.array_equal(value, reference[path])
        from_component = path[0] in ("llm", "vision2d", "vision3d", "question_encoder")
        assert same == from_component, path


def test_orbax_round_trip_restores_every_parameter(fixture_model, tmp_path):
    save_params(fixture_model, tmp_path / "orbax")
    restored = restore_params(tmp_path / "orbax")
    assert restored.cfg.to_json() == fixture_model.cfg.to_json()
    _assert_same_params(restored, fixture_model)


def test_convert_script_goes_to_orbax_and_back(state_dict, tmp_path):
    script = os.path.join(REPO, "scripts", "convert_checkpoint.py")
    common = dict(check=True, capture_output=True, text=True, timeout=300)
    to_orbax = subprocess.run(
        [sys.executable, script, f"--reference_config={FIXTURE}/config.json", f"--checkpoint={WEIGHTS}",
         f"--out={tmp_path}/orbax"], **common,
    )
    assert "mapped 109 tensors" in to_orbax.stdout and "20 deliberately unused" in to_orbax.stdout
    subprocess.run([sys.executable, script, f"--orbax={tmp_path}/orbax", f"--out={tmp_path}/back.safetensors"], **common)
    back = load_file(tmp_path / "back.safetensors")
    assert len(back) == 109
    for key, value in back.items():
        assert np.array_equal(value, state_dict[key]), key
