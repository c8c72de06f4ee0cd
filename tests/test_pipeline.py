"""The Grain pipeline: static batches, resumable, sharded across hosts, skipping bad input within a budget."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("transformers")

from data_pipelines import pipeline, shm_slots, synthetic  # noqa: E402
from data_pipelines.annotations import load_records  # noqa: E402
from data_pipelines.errors import CorruptFileError, RecordError  # noqa: E402
from data_pipelines.tiny_tokenizers import bert_like, phi_like  # noqa: E402
from med2e3_jax.data_config import data_config  # noqa: E402

SHAPE = (8, 16, 16)
SOURCE_SHAPE = (12, 20, 20)
# 512 KiB a volume: batches of two reach SHARED_MEMORY_MIN_BYTES and cross from workers in slots.
LARGE_SHAPE = (32, 64, 64)
ROOT = pathlib.Path(__file__).resolve().parents[1]
SHM_DIR = pathlib.Path("/dev/shm")
needs_dev_shm = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="lists POSIX shared memory in /dev/shm (Linux)")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(out, num=5, seed=1, shape=SHAPE, source_shape=SOURCE_SHAPE)
    return out


def _records(phantoms, fmt: str) -> list[dict]:
    return [r for s in synthetic.SPLITS for r in load_records(phantoms / f"annotations/{fmt}/{s}.json", phantoms)]


@pytest.fixture(scope="module")
def records(phantoms) -> list[dict]:
    """NIfTI (HU) and M3D-style .npy records together, so both readers and both modalities run."""
    return _records(phantoms, "nifti") + _records(phantoms, "npy")


@pytest.fixture(scope="module")
def large_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("large_phantoms")
    synthetic.generate(out, num=2, seed=2, shape=LARGE_SHAPE, formats=("npy",))
    records = _records(out, "npy")
    assert 2 * np.prod(LARGE_SHAPE) * 4 >= pipeline.SHARED_MEMORY_MIN_BYTES
    return records


@pytest.fixture(scope="module")
def tokenizers():
    return phi_like(), bert_like()


def _cfg(**overrides):
    cfg = data_config()
    cfg.update(
        volume_shape=SHAPE, modality="auto", max_length=96, num_vision_tokens=4, question_max_length=16,
        batch_size=2, seed=3, num_epochs=1, read_threads=2, prefetch_buffer_size=2,
    )
    cfg.update(overrides)
    return cfg


def _iterator(records, cfg, tokenizers, *, train=True, **kwargs):
    tokenizer, question_tokenizer = tokenizers
    return iter(pipeline.make_dataset(records, cfg, train=train, tokenizer=tokenizer,
                                      question_tokenizer=question_tokenizer, **kwargs))


def _batches(records, cfg, tokenizers, *, train=True, **kwargs) -> list[dict]:
    iterator = _iterator(records, cfg, tokenizers, train=train, **kwargs)
    batches = list(iterator)
    iterator.close()
    return batches


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        for key in e:
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def test_batches_have_the_model_shapes_and_dtypes(records, tokenizers):
    batch = _batches(records[:4], _cfg(), tokenizers)[0]
    expected = {
        "volume": ((2, 1, *SHAPE), np.float32), "input_ids": ((2, 96), np.int32), "labels": ((2, 96), np.int32),
        "attention_mask": ((2, 96), np.int32), "question_ids": ((2, 16), np.int32),
        "question_mask": ((2, 16), np.int32), "record_index": ((2,), np.int64),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    assert all(type(v) is np.ndarray for v in batch.values())


def test_every_epoch_visits_each_record_once_in_a_new_seeded_order(records, tokenizers):
    cfg = _cfg(num_epochs=2, batch_size=1, augment=False)
    order = np.concatenate([b["record_index"] for b in _batches(records[:10], cfg, tokenizers)])
    first, second = order[:10], order[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    again = np.concatenate([b["record_index"] for b in _batches(records[:10], cfg, tokenizers)])
    np.testing.assert_array_equal(order, again)
    other_cfg = _cfg(num_epochs=2, batch_size=1, augment=False, seed=4)
    other_seed = np.concatenate([b["record_index"] for b in _batches(records[:10], other_cfg, tokenizers)])
    assert not np.array_equal(order, other_seed)


def test_augmentation_depends_on_the_epoch_and_is_off_in_evaluation(records, tokenizers):
    cfg = _cfg(num_epochs=2, batch_size=1, shuffle=False)
    train = _batches(records[:6], cfg, tokenizers, train=True)
    evaluation = _batches(records[:6], cfg, tokenizers, train=False)
    assert any(not np.array_equal(a["volume"], b["volume"]) for a, b in zip(train[:6], train[6:]))
    for a, b in zip(evaluation[:6], evaluation[6:]):
        np.testing.assert_array_equal(a["volume"], b["volume"])


def _resume_script(tmp_path, records, cfg, state, *, restart_after: int = 0) -> pathlib.Path:
    """A script that restores `state` in a new process and saves the batches to the end of the data;
    with `restart_after`, it first reads that many batches and restores `state` again."""
    (tmp_path / "records.json").write_text(json.dumps(records))
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    (tmp_path / "state.json").write_text(json.dumps(state))
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(
        f"""
        import json
        import ml_collections, numpy as np
        from data_pipelines import pipeline
        from data_pipelines.tiny_tokenizers import bert_like, phi_like

        if __name__ == "__main__":
            folder = {str(tmp_path)!r}
            records = json.load(open(folder + "/records.json"))
            cfg = ml_collections.ConfigDict(json.load(open(folder + "/cfg.json")))
            dataset = pipeline.make_dataset(records, cfg, train=True, tokenizer=phi_like(), question_tokenizer=bert_like())
            iterator = iter(dataset)
            state = json.load(open(folder + "/state.json"))
            iterator.set_state(state)
            if {restart_after}:
                [next(iterator) for _ in range({restart_after})]
                iterator.set_state(state)
            batches = list(iterator)
            np.savez(folder + "/resumed.npz", **{{f"{{i}}/{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
        """
    ))
    return script


def _load_resumed(path) -> list[dict]:
    stored = np.load(path)
    batches: dict[int, dict] = {}
    for name in stored.files:
        index, key = name.split("/")
        batches.setdefault(int(index), {})[key] = stored[name]
    return [batches[i] for i in sorted(batches)]


def test_resumed_in_a_new_process_the_iterator_continues_with_the_same_batches(records, tokenizers, tmp_path):
    bad = dict(records[1], vision3d=[str(tmp_path / "missing.npy")])
    data = records[:7] + [bad] + records[7:12]
    cfg = _cfg(num_epochs=2, max_skip_fraction=0.5)
    iterator = _iterator(data, cfg, tokenizers)
    first = [next(iterator) for _ in range(3)]
    state = json.loads(json.dumps(iterator.get_state()))
    rest = list(iterator)
    assert len(first) + len(rest) == (2 * len(data) - 2) // 2  # the bad record is skipped in each epoch
    assert state == dict(next_index=6 + (state["skipped"]), skipped=state["skipped"], num_records=13, seed=3,
                         shuffle=True, num_epochs=2, process_index=0, process_count=1)

    script = _resume_script(tmp_path, data, cfg, state)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_batches(_load_resumed(tmp_path / "resumed.npz"), rest)


def test_two_processes_each_see_a_disjoint_half_of_every_global_batch(records, tokenizers):
    data = records[:13]
    single = _batches(data, _cfg(batch_size=4, num_epochs=2), tokenizers)
    halves = [
        _batches(data, _cfg(batch_size=2, num_epochs=2), tokenizers, process_index=p, process_count=2) for p in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1]) == len(single) == 6
    for whole, *parts in zip(single, *halves):
        indices = [set(part["record_index"].tolist()) for part in parts]
        assert not indices[0] & indices[1]
        joined = {k: np.concatenate([part[k] for part in parts]) for k in whole}
        order = np.argsort(joined["record_index"], kind="stable")
        reference = np.argsort(whole["record_index"], kind="stable")
        for key in whole:
            np.testing.assert_array_equal(joined[key][order], whole[key][reference], err_msg=key)


def test_worker_processes_give_the_batches_of_the_main_process_and_a_portable_state(records, tokenizers, tmp_path):
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY not really")
    data = records[:9] + [dict(records[0], vision3d=[str(corrupt)])] + records[9:14]
    cfg = _cfg(num_epochs=2, max_skip_fraction=0.5)
    inline = _batches(data, cfg, tokenizers)

    workers = _iterator(data, _cfg(num_epochs=2, max_skip_fraction=0.5, worker_count=2), tokenizers)
    first = [next(workers) for _ in range(5)]
    state = workers.get_state()
    rest = list(workers)
    workers.close()
    _assert_same_batches(first + rest, inline)

    # A state saved with two workers resumes without any.
    resumed = _iterator(data, cfg, tokenizers)
    resumed.set_state(state)
    _assert_same_batches(list(resumed), inline[5:])


def _run_segments(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))


@needs_dev_shm
def test_worker_slots_are_recycled_never_overwritten_in_use_and_unlinked_on_close(large_records, tokenizers):
    cfg = _cfg(volume_shape=LARGE_SHAPE, num_epochs=4)
    inline = _batches(large_records, cfg, tokenizers)
    workers = _iterator(large_records, _cfg(volume_shape=LARGE_SHAPE, num_epochs=4, worker_count=2), tokenizers)
    first = [next(workers) for _ in range(30)]
    slots = workers._slots
    segments, taken_from = _run_segments(slots.prefix), slots.names
    workers.close()  # mid-stream: chunks in flight whose slots the main process never saw

    # Compared only once all 30 are read: a slot rewritten while its batch was still in use shows here.
    _assert_same_batches(first, inline[:30])
    assert [list(batch) for batch in first] == [list(batch) for batch in inline[:30]]
    assert taken_from and taken_from <= set(segments)
    # Bounded by the chunks in flight, not by the 30 batches that crossed. A worker's: its read-ahead
    # buffer, one per read thread, one in its queue, one waiting to be put, one in the main process.
    in_flight_per_worker = cfg.prefetch_buffer_size + cfg.read_threads + 3
    assert len(segments) <= 2 * in_flight_per_worker < len(first)
    assert _run_segments(slots.prefix) == []


def test_workers_restored_mid_stream_leave_no_shared_memory_behind(large_records, tokenizers, tmp_path):
    cfg = _cfg(volume_shape=LARGE_SHAPE, num_epochs=2)
    iterator = _iterator(large_records, cfg, tokenizers)
    [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    rest = list(iterator)

    # Workers restarted mid-stream (their slots in flight dropped), then run to the end, never closed.
    workers_cfg = _cfg(volume_shape=LARGE_SHAPE, num_epochs=2, worker_count=1)
    script = _resume_script(tmp_path, large_records, workers_cfg, state, restart_after=4)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_batches(_load_resumed(tmp_path / "resumed.npz"), rest)
    # The resource tracker warns at exit about segments never unlinked, and prints a KeyError for
    # one unregistered twice.
    assert "leaked" not in result.stderr and "KeyError" not in result.stderr, result.stderr[-3000:]


@needs_dev_shm
def test_a_stale_slot_descriptor_is_refused_with_its_segment():
    reader = shm_slots.SlotReader()
    writer = reader.writer
    volumes = [np.full((1, 4, 8, 8), value, np.float32) for value in (1.0, 2.0)]
    try:
        first = writer.stack(volumes)
        while_busy = writer.stack(volumes[::-1])  # a worker never waits: the pool grows
        assert while_busy.name != first.name
        np.testing.assert_array_equal(reader.take(first), np.stack(volumes))
        np.testing.assert_array_equal(reader.take(while_busy), np.stack(volumes[::-1]))

        reused = writer.stack(volumes[:1])
        assert reused.name in (first.name, while_busy.name)
        with pytest.raises(shm_slots.StaleSlotError, match=rf"slot {reused.name}: the descriptor is of generation "
                           rf"{reused.generation - 1} but the slot is BUSY at generation {reused.generation}"):
            reader.take(dataclasses.replace(reused, generation=reused.generation - 1))
        np.testing.assert_array_equal(reader.take(reused), np.stack(volumes[:1]))
        with pytest.raises(shm_slots.StaleSlotError, match=rf"slot {reused.name}: .* the slot is FREE"):
            reader.take(reused)  # taken twice

        bigger = writer.stack([np.zeros((1, 8, 8, 8), np.float32)] * 2)  # free slots too small make room
        assert _run_segments(reader.prefix) == [bigger.name]
        reader.take(bigger)
    finally:
        reader.close()
    assert _run_segments(reader.prefix) == []


def test_tfds_store_yields_the_batches_of_the_source_files(phantoms, records, tokenizers, tmp_path):
    tfds_builder = pytest.importorskip("data_pipelines.tfds_builder")
    pytest.importorskip("tensorflow_datasets")
    cfg = _cfg(modality="ct", batch_size=3)
    nifti = _records(phantoms, "nifti")
    tfds_builder.build_preprocessed({"train": nifti}, tmp_path, shape=SHAPE, modality=cfg.modality,
                                    window=cfg.hu_window, dtype="uint8")
    from_files = _batches(nifti, cfg, tokenizers, train=False)
    from_store = _batches(tfds_builder.open_preprocessed(tmp_path, "train"), cfg, tokenizers, train=False)
    assert len(from_store) == len(from_files) > 0
    worst = 0.0
    for stored, read in zip(from_store, from_files):
        for key in read:
            if key != "volume":
                np.testing.assert_array_equal(stored[key], read[key], err_msg=key)
        worst = max(worst, float(np.abs(stored["volume"] - read["volume"]).max()))
    assert worst <= tfds_builder.QUANTISATION_ERROR["uint8"] * (1 + 1e-6)


@pytest.fixture
def with_bad_inputs(records, tmp_path):
    """Ten good records, a truncated .npy, and a record whose conversation lost its <image3d>."""
    corrupt = tmp_path / "truncated_volume.npy"
    corrupt.write_bytes(pathlib.Path(records[-1]["vision3d"][0]).read_bytes()[:100])
    no_image = dict(records[2], id="no_image_record")
    no_image["conversations"] = [dict(t, value=t["value"].replace("<image3d>", "")) for t in records[2]["conversations"]]
    return records[:5] + [dict(records[3], vision3d=[str(corrupt)])] + records[5:10] + [no_image], str(corrupt)


def test_bad_input_is_skipped_counted_and_logged_with_its_file(with_bad_inputs, tokenizers, caplog):
    data, corrupt = with_bad_inputs
    cfg = _cfg(batch_size=1, max_skip_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        iterator = _iterator(data, cfg, tokenizers)
        indices = sorted(int(b["record_index"][0]) for b in iterator)
    assert indices == [i for i in range(12) if i not in (5, 11)]
    state = iterator.get_state()
    assert (state["next_index"], state["skipped"]) == (12, 2)
    assert corrupt in caplog.text and "CorruptFileError" in caplog.text
    assert "no_image_record" in caplog.text and "RecordError" in caplog.text


@pytest.mark.parametrize("bad_index, error", [(5, CorruptFileError), (11, RecordError)])
def test_strict_mode_raises_the_specific_error(with_bad_inputs, tokenizers, bad_index, error):
    data, corrupt = with_bad_inputs
    with pytest.raises(error, match=corrupt if error is CorruptFileError else "no_image_record"):
        _batches(data[bad_index:], _cfg(strict=True, shuffle=False), tokenizers)


def test_skips_past_the_budget_abort_with_a_clear_message(with_bad_inputs, tokenizers):
    data, _ = with_bad_inputs
    data = data * 2  # 24 records, 4 bad: 17%
    with pytest.raises(pipeline.TooManySkipsError, match=r"skipped \d+ of \d+ examples .* max_skip_fraction=0.1"):
        _batches(data, _cfg(max_skip_fraction=0.1), tokenizers)
    assert len(_batches(data, _cfg(max_skip_fraction=0.2, batch_size=1), tokenizers)) == 20


def test_a_small_set_that_ends_over_the_budget_still_aborts(with_bad_inputs, tokenizers):
    data, _ = with_bad_inputs
    with pytest.raises(pipeline.TooManySkipsError, match="skipped 2 of 12"):
        _batches(data, _cfg(max_skip_fraction=0.1), tokenizers)


def test_process_index_outside_the_count_is_refused(records, tokenizers):
    with pytest.raises(ValueError, match="process_index 2"):
        _batches(records[:4], _cfg(), tokenizers, process_index=2, process_count=2)


def test_a_state_from_another_data_stream_is_refused(records, tokenizers):
    def make(**kw):
        return _iterator(records[:6], _cfg(**kw), tokenizers)

    state = make(seed=3).get_state()
    with pytest.raises(ValueError, match="another data stream.*seed=3 vs 4"):
        make(seed=4).set_state(state)
    make(seed=3, batch_size=3, worker_count=1).set_state(state)  # batching and workers may change


def test_batches_are_the_good_examples_in_visit_order_cut_to_size(with_bad_inputs, tokenizers):
    data, _ = with_bad_inputs
    one_by_one = _batches(data, _cfg(batch_size=1, num_epochs=2, max_skip_fraction=0.2), tokenizers)
    threes_cfg = _cfg(batch_size=3, num_epochs=2, max_skip_fraction=0.2, drop_remainder=False)
    threes = _batches(data, threes_cfg, tokenizers)
    assert [len(b["record_index"]) for b in threes] == [3] * 6 + [2]
    for key in one_by_one[0]:
        np.testing.assert_array_equal(np.concatenate([b[key] for b in threes]),
                                      np.concatenate([b[key] for b in one_by_one]), err_msg=key)


def test_without_a_question_tokenizer_the_batches_have_no_question(records, tokenizers):
    batch = _batches(records[:4], _cfg(), (tokenizers[0], None))[0]
    assert list(batch) == ["volume", "input_ids", "labels", "attention_mask", "record_index"]
