"""Hostile and broken checkpoints: every importer and restorer fails with one of our errors, naming the
file, key or parameter and what was expected, never allocating what a header merely promises."""

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from assets_for_tests import PUBLIC_FIXTURE
from batches_for_tests import small_model
from flax import nnx
from safetensors.numpy import load_file, save_file

from med2e3_jax.checkpoint import errors
from med2e3_jax.checkpoint.limits import CheckpointLimits
from med2e3_jax.checkpoint.loading import load_med2e3
from med2e3_jax.checkpoint.med2e3_port import config_from_reference
from med2e3_jax.checkpoint.orbax_params import restore_params, save_params
from med2e3_jax.checkpoint.port import DictSource, PortTable, Rule, import_tensors
from med2e3_jax.checkpoint.sources import SafetensorsSource, open_checkpoint
from med2e3_jax.models.med2e3 import Med2E3

REPO = os.path.join(os.path.dirname(__file__), "..")


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"proj.weight": rng.standard_normal((6, 5)).astype(np.float32),
            "proj.bias": rng.standard_normal(5).astype(np.float32),
            "norm.weight": rng.standard_normal(7).astype(ml_dtypes.bfloat16)}


# --- PyTorch-side readers --------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1, -37])
def test_truncated_safetensors_is_named_as_corrupt(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save_file(_weights(), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(errors.CorruptCheckpointError, match=r"model\.safetensors") as caught:
        open_checkpoint(path)
    assert caught.value.path == str(path)


@pytest.mark.parametrize("claimed", [2**20 + 1, 2**40, 2**64 - 1])
def test_safetensors_header_longer_than_the_limit_is_refused_before_it_is_read(tmp_path, claimed):
    path = tmp_path / "big_header.safetensors"
    path.write_bytes(struct.pack("<Q", claimed) + b"{}")
    with pytest.raises(errors.CheckpointTooLargeError, match=rf"{claimed:,} bytes.*max_header_bytes"):
        SafetensorsSource(path, CheckpointLimits(max_header_bytes=2**20))


def test_a_real_header_over_a_configured_limit_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({f"layer{i}.weight": np.zeros(2, np.float32) for i in range(40)}, path)
    assert sorted(SafetensorsSource(path).keys())[0] == "layer0.weight"  # the default limit reads it
    with pytest.raises(errors.CheckpointTooLargeError, match="safetensors header"):
        open_checkpoint(path, CheckpointLimits(max_header_bytes=256))


class _RunsCode:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("call", [os.system, eval, subprocess.getoutput])
def test_pickled_bin_that_would_run_code_is_refused_without_running_it(tmp_path, call):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w')" if call is eval else f"touch {marker}"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"proj.weight": torch.ones(2), "extra": _RunsCode(call, payload)}, path)
    with pytest.raises(errors.UnsafeCheckpointError, match=r"pytorch_model\.bin: refused") as caught:
        open_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(caught.value)  # torch's advice to run the pickle anyway is not passed on


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_plain_pickle_named_pt_is_refused_too(tmp_path, protocol):
    pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": _RunsCode(os.system, f"touch {marker}")}, protocol=protocol))
    # Protocol 2 reaches the call (refused as code); 4 opens with a frame torch's unpickler does not read.
    refusal = errors.UnsafeCheckpointError if protocol == 2 else errors.CorruptCheckpointError
    with pytest.raises(refusal, match=r"model\.pt: (refused|not a state dict)"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "list"])
def test_broken_bin_is_named_as_corrupt(tmp_path, damage):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pytorch_model.bin"
    if damage == "list":
        torch.save([torch.ones(3)], path)
    else:
        torch.save({"proj.weight": torch.ones(64, 64)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x80not a checkpoint" * 9)
    with pytest.raises(errors.CorruptCheckpointError, match=r"pytorch_model\.bin"):
        open_checkpoint(path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_sharded_index_cannot_point_outside_its_folder(tmp_path, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(_weights(), tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"proj.weight": shard}}))
    with pytest.raises(errors.UnsafeCheckpointError, match="outside the index's folder"):
        open_checkpoint(folder)


@pytest.mark.parametrize("index", ['{"weight_map": [1, 2]}', '{"weight_map": {"a": 3}}', "[]", "{not json"])
def test_malformed_sharded_index_is_named(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(errors.CorruptCheckpointError, match=r"model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)


def test_oversized_sharded_index_is_refused_before_it_is_parsed(tmp_path):
    weight_map = {f"layers.{i}.weight": "model-00001-of-00001.safetensors" for i in range(5000)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(errors.CheckpointTooLargeError, match="sharded checkpoint index"):
        open_checkpoint(tmp_path, CheckpointLimits(max_header_bytes=100_000))


# --- values at import ------------------------------------------------------------------------------

TABLE = PortTable((Rule("proj.weight", "proj.kernel"), Rule("proj.bias", "proj.bias"),
                   Rule("norm.weight", "norm.scale")))


def _expected(dtype):
    return {("proj", "kernel"): ((6, 5), np.dtype(dtype)), ("proj", "bias"): ((5,), np.dtype(dtype)),
            ("norm", "scale"): ((7,), np.dtype(dtype))}


@pytest.mark.parametrize("key, index, value, file_dtype, model_dtype, what", [
    ("proj.weight", (2, 3), np.nan, np.float32, np.float32, "nan in the file"),
    ("proj.bias", (4,), np.inf, np.float32, np.float32, "inf in the file"),
    ("norm.weight", (0,), -np.inf, ml_dtypes.bfloat16, np.float32, "-inf in the file"),
    ("proj.weight", (5, 0), 1e300, np.float64, np.float32, "1e\\+300 in the file, beyond float32's range"),
    ("proj.bias", (1,), -4e38, np.float64, ml_dtypes.bfloat16, "-4e\\+38 in the file, beyond bfloat16's range"),
    ("norm.weight", (6,), 7e4, np.float32, np.float16, "70000 in the file, beyond float16's range"),
])
def test_non_finite_or_out_of_range_weight_is_refused_naming_the_key(key, index, value, file_dtype, model_dtype, what):
    tensors = {k: v.astype(file_dtype) for k, v in _weights(seed=len(key)).items()}
    tensors[key][index] = value
    with pytest.raises(errors.NonFiniteWeightError, match=rf"{key} in <state dict>: 1 of .* index {re.escape(str(index))}.*{what}"):
        import_tensors(_expected(model_dtype), DictSource(tensors), TABLE)


def test_float64_weights_within_float32s_range_import():
    tensors = {k: v.astype(np.float64) * 1e30 for k, v in _weights().items()}
    arrays, _ = import_tensors(_expected(np.float32), DictSource(tensors), TABLE)
    np.testing.assert_array_equal(arrays[("proj", "kernel")], tensors["proj.weight"].astype(np.float32))


def test_nan_in_a_component_checkpoint_stops_the_conversion_naming_key_and_file(tmp_path):
    # The golden fixture's LLM as an HF checkpoint, one weight poisoned: refused before any seeded init.
    with open(PUBLIC_FIXTURE / "config.json", encoding="utf-8") as f:
        cfg = config_from_reference(json.load(f))
    weights = load_file(PUBLIC_FIXTURE / "model.safetensors")
    llm = {key[len("llm."):]: value for key, value in weights.items() if key.startswith("llm.")}
    llm["model.layers.1.mlp.down_proj.weight"][3, 1] = np.nan
    save_file(llm, tmp_path / "llm.safetensors")
    with pytest.raises(errors.NonFiniteWeightError, match=r"model\.layers\.1\.mlp\.down_proj\.weight in .*llm\.safetensors"):
        load_med2e3(cfg, components={"llm": tmp_path / "llm.safetensors"})


# --- Orbax restores --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    # Random values from numpy in the model's shapes: what is restored does not matter here, and the
    # seeded init would cost seconds of per-op compilation.
    directory = tmp_path_factory.mktemp("orbax") / "model"
    model = nnx.eval_shape(lambda: Med2E3(small_model(), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    save_params(nnx.merge(graphdef, params), directory)
    return directory


def _damaged_copy(orbax_dir, tmp_path, parameter, damage):
    copy = tmp_path / "copy"
    shutil.copytree(orbax_dir, copy)
    array = copy / "params" / f"{parameter}.value"
    chunk = next(p for p in sorted(array.iterdir()) if not p.name.startswith("."))
    if damage == "chunk missing":
        chunk.unlink()
    elif damage == "metadata missing":
        (array / ".zarray").unlink()
    elif damage == "chunk truncated":
        chunk.write_bytes(chunk.read_bytes()[:9])
    elif damage == "chunk garbage":
        chunk.write_bytes(b"\x00garbage" * 4)
    return copy


@pytest.mark.parametrize("parameter, damage, names", [
    ("llm.layers.0.self_attn.o_proj.kernel", "chunk missing", "chunk file .*o_proj.kernel.value/0.0 is missing"),
    ("vision2d_connector.linear_in.bias", "chunk missing", "vision2d_connector/linear_in/bias.*is missing"),
    ("tgis.text_mlp.kernel", "metadata missing", r"tgis.text_mlp.kernel has no .*\.zarray"),
    ("llm.embed_tokens.embedding", "chunk truncated", "embed_tokens.embedding.value/0.0"),
    ("vision3d.blocks.0.attn.qkv.kernel", "chunk garbage", "blocks.0.attn.qkv.kernel.value/0.0"),
])
def test_damaged_orbax_checkpoint_fails_in_one_error_naming_the_parameter(orbax_dir, tmp_path, parameter, damage,
                                                                          names):
    copy = _damaged_copy(orbax_dir, tmp_path, parameter, damage)
    with pytest.raises(errors.CorruptCheckpointError, match=names) as caught:
        restore_params(copy)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, parameter, saved, wanted", [
    (("llm", "intermediate_size", 96), "llm/layers/0/mlp/down_proj/kernel", (128, 64), (96, 64)),
    (("question_encoder", "hidden_size", 32), "question_encoder/embeddings/word_embeddings/embedding", (128, 64),
     (128, 32)),
])
def test_restoring_with_another_config_names_the_parameter_both_shapes_and_the_config_key(orbax_dir, change,
                                                                                           parameter, saved, wanted):
    tower, key, value = change
    cfg = small_model()
    cfg[tower][key] = value
    with pytest.raises(errors.CheckpointMismatchError) as caught:
        restore_params(orbax_dir, cfg)
    message = str(caught.value)
    assert f"{parameter}/value: saved {saved}, the model expects {wanted}" in message
    assert f"{tower}.{key} (saved {small_model()[tower][key]!r}, given {value!r})" in message


def test_a_saved_config_promising_a_huge_model_is_refused_before_allocating(orbax_dir, tmp_path):
    copy = tmp_path / "huge"
    shutil.copytree(orbax_dir, copy)
    saved = json.loads((copy / "model_config.json").read_text())
    saved["llm"]["vocab_size"] = 1_000_000_000  # embedding and LM head: 0.5 TB of float32
    (copy / "model_config.json").write_text(json.dumps(saved))
    script = textwrap.dedent(
        """
        import resource, sys
        import jax
        jax.devices()
        from med2e3_jax.checkpoint import errors
        from med2e3_jax.checkpoint.limits import CheckpointLimits
        from med2e3_jax.checkpoint.orbax_params import restore_params
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30),) * 2)
        for limits in (CheckpointLimits(), CheckpointLimits(max_parameter_bytes=10**11)):
            try:
                restore_params(sys.argv[1], limits=limits)
                print("restored")
            except errors.CheckpointTooLargeError as error:
                print("refused:", error)
        """)
    result = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused:") for line in lines), result.stdout
    assert "model_config.json" in lines[0] and "GB of parameters" in lines[0]
    assert "100.00 GB allowed" in lines[1]


def test_a_saved_config_that_is_not_json_is_named(orbax_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(orbax_dir, copy)
    (copy / "model_config.json").write_text('{"llm": {"vocab_size": 12,')
    with pytest.raises(errors.CorruptCheckpointError, match=r"model_config\.json: not valid JSON"):
        restore_params(copy)
