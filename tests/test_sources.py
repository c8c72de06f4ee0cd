"""Checkpoint readers, layout detection and writers: exact round trips and errors that name the file."""

import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest

from med2e3_jax.checkpoint import sources
from med2e3_jax.checkpoint.sources import (
    RELEASE_PREFIXES,
    MergedSource,
    PrefixedSource,
    SafetensorsSource,
    ShardedSafetensorsSource,
    ShardedTorchBinSource,
    TorchBinSource,
    iter_tensors,
    open_checkpoint,
)
from med2e3_jax.checkpoint.writers import write_release_layout, write_safetensors, write_sharded_safetensors


def _tensors(seed=0, prefix=""):
    rng = np.random.default_rng(seed)
    return {
        prefix + "proj.weight": rng.standard_normal((3, 4), dtype=np.float32),
        prefix + "proj.bias": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
        prefix + "embed.weight": rng.standard_normal((5, 2)).astype(ml_dtypes.bfloat16),
        prefix + "position_ids": np.arange(5, dtype=np.int64)[None],
    }


def _assert_holds_exactly(source, tensors):
    assert sorted(source.keys()) == sorted(tensors)
    for key, want in tensors.items():
        assert source.shape(key) == want.shape and source.dtype(key) == want.dtype, key
        got = source.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key


def _torch_save(tensors, path):
    torch = pytest.importorskip("torch")
    torch.save({k: sources.numpy_to_torch(v) for k, v in tensors.items()}, path)


def test_safetensors_source_reads_float32_and_bfloat16_bit_exactly(tmp_path):
    tensors = _tensors()
    write_safetensors(tensors, tmp_path / "model.safetensors", metadata={"note": "test"})
    _assert_holds_exactly(SafetensorsSource(tmp_path / "model.safetensors"), tensors)


def test_safetensors_source_gives_shapes_and_dtypes_without_reading_data(tmp_path, monkeypatch):
    tensors = _tensors()
    write_safetensors(tensors, tmp_path / "model.safetensors")
    real_safe_open, reads = sources.safe_open, []

    class CountingFile:
        def __init__(self, path, framework):
            self.file = real_safe_open(path, framework=framework)

        def get_tensor(self, key):
            reads.append(key)
            return self.file.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(sources, "safe_open", CountingFile)
    source = SafetensorsSource(tmp_path / "model.safetensors")
    assert {k: (source.shape(k), source.dtype(k)) for k in source.keys()} == {
        k: (v.shape, v.dtype) for k, v in tensors.items()
    }
    assert reads == []
    source.read("proj.weight")
    assert reads == ["proj.weight"]


def test_write_safetensors_leaves_nothing_behind_when_it_fails(tmp_path):
    with pytest.raises(Exception):
        write_safetensors(_tensors(), tmp_path / "model.safetensors", metadata={"not a string": 1})
    assert os.listdir(tmp_path) == []


def test_sharded_safetensors_round_trip_from_an_iterator(tmp_path):
    tensors = _tensors()
    names = write_sharded_safetensors(iter(tensors.items()), tmp_path, max_shard_bytes=48)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors) and set(index["weight_map"].values()) == set(names)
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["model.safetensors.index.json"])

    source, layout = open_checkpoint(tmp_path)
    assert layout == "hf" and isinstance(source, ShardedSafetensorsSource)
    _assert_holds_exactly(source, tensors)
    assert source.where("proj.weight") == str(tmp_path / index["weight_map"]["proj.weight"])


def test_sharded_safetensors_names_a_missing_shard(tmp_path):
    write_sharded_safetensors(_tensors(), tmp_path, max_shard_bytes=48)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        open_checkpoint(tmp_path)


def test_torch_bin_source_reads_float32_and_bfloat16_bit_exactly(tmp_path):
    tensors = _tensors()
    _torch_save(tensors, tmp_path / "pytorch_model.bin")
    source, layout = open_checkpoint(tmp_path / "pytorch_model.bin")
    assert layout == "file" and isinstance(source, TorchBinSource)
    _assert_holds_exactly(source, tensors)
    assert source.where("proj.bias") == str(tmp_path / "pytorch_model.bin")


def test_torch_bin_source_memory_maps_the_file_instead_of_loading_it(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    _torch_save(_tensors(), tmp_path / "pytorch_model.bin")
    calls = []
    real_load = torch.load
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    TorchBinSource(tmp_path / "pytorch_model.bin").read("proj.weight")
    assert calls == [{"map_location": "cpu", "mmap": True, "weights_only": True}]


def test_torch_bin_source_still_reads_the_legacy_format(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = _tensors()
    state = {k: sources.numpy_to_torch(v) for k, v in tensors.items()}
    torch.save(state, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    _assert_holds_exactly(TorchBinSource(tmp_path / "old.bin"), tensors)


def test_torch_bin_source_asks_for_the_torch_extra_when_torch_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install med2e3-jax\[torch\]"):
        TorchBinSource(tmp_path / "pytorch_model.bin")


def test_sharded_torch_bin_index_is_read_as_hf_layout(tmp_path):
    tensors = _tensors()
    first, second = dict(list(tensors.items())[:2]), dict(list(tensors.items())[2:])
    _torch_save(first, tmp_path / "pytorch_model-00001-of-00002.bin")
    _torch_save(second, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in first}
    weight_map |= {k: "pytorch_model-00002-of-00002.bin" for k in second}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source, layout = open_checkpoint(tmp_path)
    assert layout == "hf" and isinstance(source, ShardedTorchBinSource)
    _assert_holds_exactly(source, tensors)


def test_hf_directory_prefers_safetensors_over_bin(tmp_path):
    _torch_save(_tensors(seed=1), tmp_path / "pytorch_model.bin")
    write_safetensors(_tensors(seed=2), tmp_path / "model.safetensors")
    source, layout = open_checkpoint(tmp_path)
    assert layout == "hf" and isinstance(source, SafetensorsSource)
    _assert_holds_exactly(source, _tensors(seed=2))


def _module_path_tensors():
    tensors = {}
    for seed, prefix in enumerate(RELEASE_PREFIXES.values()):
        tensors |= _tensors(seed, prefix)
    return tensors


def test_release_layout_round_trip_restores_module_path_prefixes(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = _module_path_tensors()
    assert write_release_layout(tensors, tmp_path) == list(RELEASE_PREFIXES)
    stored = torch.load(tmp_path / "vision2d_model" / "pytorch_model.bin", weights_only=True)
    assert sorted(stored) == sorted(_tensors())
    source, layout = open_checkpoint(tmp_path)
    assert layout == "release"
    _assert_holds_exactly(source, tensors)
    where = source.where("vision3d_connector.proj.weight")
    assert where == str(tmp_path / "vision3d_connector" / "pytorch_model.bin")


def test_release_layout_may_hold_only_some_folders_and_casts_floats(tmp_path):
    pytest.importorskip("torch")
    tensors = _tensors(prefix="llm.") | _tensors(prefix="vision3d_connector.")
    assert write_release_layout(tensors, tmp_path, torch_dtype="bfloat16") == ["llm", "vision3d_connector"]
    source, layout = open_checkpoint(tmp_path)
    assert layout == "release"
    cast = {k: v if v.dtype == np.int64 else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    _assert_holds_exactly(source, cast)


def test_release_writer_rejects_keys_outside_the_release_prefixes(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="vision2d_model.other.weight"):
        write_release_layout({"vision2d_model.other.weight": np.zeros(2, np.float32)}, tmp_path)


def test_release_folder_without_a_checkpoint_is_named(tmp_path):
    (tmp_path / "llm").mkdir()
    with pytest.raises(FileNotFoundError, match=r"llm holds none of model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_unknown_directory_error_lists_what_was_looked_for(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        open_checkpoint(tmp_path)
    for name in ["model.safetensors", "pytorch_model.bin.index.json", *RELEASE_PREFIXES]:
        assert name in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_merged_source_names_both_files_holding_a_duplicate_key(tmp_path):
    write_safetensors(_tensors(seed=1), tmp_path / "a.safetensors")
    clashing = _tensors(seed=2, prefix="x.") | {"proj.bias": np.zeros(1, np.float32)}
    write_safetensors(clashing, tmp_path / "b.safetensors")
    first, second = (SafetensorsSource(tmp_path / name) for name in ("a.safetensors", "b.safetensors"))
    with pytest.raises(ValueError, match=r"'proj.bias'.*a\.safetensors.*b\.safetensors"):
        MergedSource([first, second])


def test_prefixed_source_strips_and_adds_prefixes(tmp_path):
    write_safetensors(_tensors(prefix="model."), tmp_path / "m.safetensors")
    inner = SafetensorsSource(tmp_path / "m.safetensors")
    source = PrefixedSource(inner, add_prefix="llm.model.", strip_prefix="model.")
    _assert_holds_exactly(source, _tensors(prefix="llm.model."))
    with pytest.raises(KeyError, match="model.proj.weight"):
        source.read("model.proj.weight")
    with pytest.raises(ValueError, match=r"m\.safetensors lack it, e\.g\. \['model\."):
        PrefixedSource(inner, strip_prefix="vision_model.")


def test_iter_tensors_reshards_a_checkpoint(tmp_path):
    tensors = _tensors()
    (tmp_path / "one").mkdir()
    write_safetensors(tensors, tmp_path / "one" / "model.safetensors")
    source, _ = open_checkpoint(tmp_path / "one")
    write_sharded_safetensors(iter_tensors(source), tmp_path / "many", max_shard_bytes=1)
    _assert_holds_exactly(open_checkpoint(tmp_path / "many")[0], tensors)
