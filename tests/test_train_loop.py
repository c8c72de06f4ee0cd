"""The training loop: metrics, NaN handling, preemption (SIGTERM), the two-stage hand-over."""

import glob
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from assets_for_tests import fetched
from training_runs import (
    compilation_cache,
    device_reads_forbidden_between_log_points,
    launch,
    loop_config,
    shared_cache_dir,
    synthetic_iterator,
    tail,
    wait_for,
)

from med2e3_jax import sharding
from med2e3_jax.train import loop
from med2e3_jax.train.checkpointing import CHECKPOINT_DIR, TrainCheckpointer
from med2e3_jax.train.metrics import read_metrics

METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time", "slice_score_entropy")


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(shared_cache_dir(tmp_path_factory)):
        yield


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    result = loop.train(loop_config(steps=2, checkpoint_every=2), tmp_path, make_iterator=synthetic_iterator())
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert set(METRICS) <= set(record), sorted(record)
        assert all(np.isfinite(record[k]) for k in METRICS)
    assert records[-1]["loss"] == pytest.approx(result.metrics["loss"])
    events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1
    with open(events[0], "rb") as f:
        content = f.read()
    assert all(f"train/{name}".encode() in content for name in METRICS)


def test_loop_reads_nothing_from_the_devices_between_log_points(tmp_path):
    with device_reads_forbidden_between_log_points():
        from med2e3_jax.train import (
            loop as guarded,  # the guard wraps loop._between_log_points
        )

        with guarded._between_log_points("allow"), pytest.raises(AssertionError, match="between two log points"):
            float(jnp.ones(()))  # the guard has teeth: a read inside the section fails
        result = loop.train(loop_config(steps=6, log_every=3, checkpoint_every=6), tmp_path,
                            make_iterator=synthetic_iterator())
    assert result.step == 6
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 6]


def test_thirty_steps_on_phantoms_with_answers_of_varying_length_compile_the_step_once(tmp_path):
    from configs import tiny
    from data_pipelines import synthetic
    from data_pipelines.annotations import load_records

    for name in ("tokenizers/phi3", "minilm"):
        fetched(name)
    synthetic.generate(tmp_path / "data", num=20, seed=0, shape=(32, 64, 64), formats=("npy",))
    annotations = tmp_path / "data" / "annotations" / "npy" / "vqa_train.json"
    answers = {len(r["conversations"][1]["value"].split()) for r in load_records(annotations, None, validate=False)}
    assert len(answers) > 3, answers  # closed letters and open phrases: the batches' target counts vary
    config = tiny.get_config("finetune")
    config.data.update(annotation_file=str(annotations), image_root=str(tmp_path / "data"), worker_count=0)
    config.train.update(steps=30, log_every=10, checkpoint_every=30, export_model=False)
    compiles = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling jit(_train_step)"):
                compiles.append(record.getMessage())

    handler = Compiles()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            result = loop.train(config, tmp_path / "run")
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert result.step == 30
    targets = [r["target_tokens"] for r in read_metrics(tmp_path / "run")]
    assert len(compiles) == 1, (len(compiles), targets)


def test_nan_loss_stops_with_clear_message_and_last_good_checkpoint_intact(tmp_path):
    # Batch 2 (step 3) is NaN; checkpoints every 2 steps, logs only every 5: the check before the save
    # of step 4 must catch it, and the checkpoint of step 2 must stay the latest.
    config = loop_config(steps=6, checkpoint_every=2, log_every=5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss=nan.* at step 3.*last good checkpoint is step 2"):
        loop.train(config, tmp_path, make_iterator=synthetic_iterator(nan_at=2))
    with TrainCheckpointer(tmp_path / CHECKPOINT_DIR) as checkpointer:
        assert checkpointer.all_steps() == [2]
        params = checkpointer.manager.restore(2).params  # as saved, no target needed
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # And the run resumes from it once the data is fixed.
    resumed = loop.train(config, tmp_path, make_iterator=synthetic_iterator())
    assert resumed.step == 6 and np.isfinite(resumed.metrics["loss"])


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    workdir, marker, result, log = (str(tmp_path / n) for n in ("run", "started", "result.json", "log.txt"))
    process = launch(["--workdir", workdir, "--steps", "1000", "--checkpoint_every", "1000",
                      "--marker", marker, "--marker_at_batch", "2", "--result", result], log_path=log)
    try:
        wait_for(lambda: os.path.exists(marker), timeout=300, process=process, log_path=log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, tail(log)
    finally:
        if process.poll() is None:
            process.kill()
    with open(result) as f:
        summary = json.load(f)
    assert summary["preempted"] and 2 <= summary["step"] < 1000
    with TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR)) as checkpointer:
        assert checkpointer.all_steps() == [summary["step"]]
    # The batch fetched when the signal was seen was not trained on: a resumed run reads it again.
    with open(os.path.join(workdir, CHECKPOINT_DIR, str(summary["step"]), "data_iterator", "process_0-of-1.json")) as f:
        assert json.load(f) == {"next_index": summary["step"]}


def test_run_stops_with_a_checkpoint_when_the_data_runs_out(tmp_path):
    result = loop.train(loop_config(steps=5, checkpoint_every=100), tmp_path,
                        make_iterator=synthetic_iterator(num_batches=3))
    assert result.step == 3 and not result.preempted
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with TrainCheckpointer(tmp_path / CHECKPOINT_DIR) as checkpointer:
        assert checkpointer.all_steps() == [3]


def test_finetune_starts_from_pretrain_weights(tmp_path):
    pretrain = loop.train(loop_config("pretrain", steps=2, checkpoint_every=2), tmp_path / "pretrain",
                          make_iterator=synthetic_iterator())
    config = loop.per_process_config(loop_config("finetune", init_from=str(tmp_path / "pretrain")), 1)
    mesh = sharding.make_mesh(config.mesh)
    model = loop.build_model(config, mesh)
    trained, fresh = pretrain.model, loop.build_model(loop.per_process_config(loop_config("finetune"), 1), mesh)
    np.testing.assert_array_equal(model.tgis.text_mlp.kernel[...], trained.tgis.text_mlp.kernel[...])
    assert not np.array_equal(model.tgis.text_mlp.kernel[...], fresh.tgis.text_mlp.kernel[...])
    # The LLM was frozen in pretraining: it still holds the seeded init.
    np.testing.assert_array_equal(model.llm.lm_head.kernel[...], fresh.llm.lm_head.kernel[...])


def test_components_are_imported_over_the_seeded_init_and_stay_frozen(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = loop_config(steps=2, checkpoint_every=2)
    encoder = config.model.question_encoder
    hf_config = transformers.BertConfig(
        vocab_size=encoder.vocab_size, hidden_size=encoder.hidden_size, num_hidden_layers=encoder.num_layers,
        num_attention_heads=encoder.num_heads, intermediate_size=encoder.intermediate_size,
        max_position_embeddings=encoder.max_position_embeddings, type_vocab_size=encoder.type_vocab_size,
    )
    torch.manual_seed(0)
    transformers.BertModel(hf_config).save_pretrained(tmp_path / "bert")
    written = transformers.BertModel.from_pretrained(tmp_path / "bert").state_dict()
    config.train.components.question_encoder = str(tmp_path / "bert")

    result = loop.train(config, tmp_path / "run", make_iterator=synthetic_iterator())
    ours = result.model.question_encoder
    np.testing.assert_array_equal(np.asarray(ours.embeddings.word_embeddings.embedding),
                                  written["embeddings.word_embeddings.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(ours.pooler.dense.kernel), written["pooler.dense.weight"].numpy().T)

    config.train.base_checkpoint = str(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="base_checkpoint and config.train.components"):
        loop.train(config, tmp_path / "both", make_iterator=synthetic_iterator())
