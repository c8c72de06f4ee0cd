"""Config values that cannot work are refused before anything is built, naming the key and the value."""

import pytest
from batches_for_tests import small_config, small_model

from med2e3_jax.config import ConfigError, validate_model_config
from med2e3_jax.train_config import validate_experiment_config


@pytest.mark.parametrize("tower, width, heads", [
    ("llm", 130, 8),
    ("vision2d", 30, 4),
    ("vision3d", 50, 4),
    ("question_encoder", 66, 4),
])
def test_a_width_not_divisible_by_the_heads_is_named_in_every_tower(tower, width, heads):
    cfg = small_model()
    cfg[tower].update(hidden_size=width, num_heads=heads)
    with pytest.raises(ConfigError, match=rf"{tower}\.hidden_size={width} is not divisible by {tower}\.num_heads={heads}") \
            as caught:
        validate_model_config(cfg)
    assert caught.value.key == f"{tower}.hidden_size"


def test_an_explicit_llm_head_dim_need_not_divide_the_width():
    cfg = small_model()
    cfg.llm.update(hidden_size=96, num_heads=8, num_kv_heads=8, head_dim=16)
    validate_model_config(cfg)


@pytest.mark.parametrize("tower, key, value", [
    ("llm", "num_kv_heads", 3), ("llm", "num_layers", 0), ("vision2d", "patch_size", -16),
    ("question_encoder", "vocab_size", 0), ("vision3d", "mlp_dim", -1), ("question_encoder", "num_heads", 0),
])
def test_sizes_that_cannot_build_a_tower_are_named(tower, key, value):
    cfg = small_model()
    cfg[tower][key] = value
    with pytest.raises(ConfigError, match=rf"{tower}\.(num_heads|{key})"):
        validate_model_config(cfg)


@pytest.mark.parametrize("key, value", [("temperature", 0.0), ("dropout", 1.0), ("dropout", -0.1), ("pool_stride", 0)])
def test_tgis_values_out_of_range_are_named(key, value):
    cfg = small_model()
    cfg.tgis[key] = value
    with pytest.raises(ConfigError, match=rf"tgis\.{key}"):
        validate_model_config(cfg)


def test_an_llm_max_length_that_the_vision_tokens_fill_is_named():
    cfg = small_model()
    cfg.llm_max_length = 6  # the small model's 2 + 4 vision tokens
    with pytest.raises(ConfigError, match="llm_max_length=6 leaves no room for text: the 6 vision tokens"):
        validate_model_config(cfg)


@pytest.mark.parametrize("key, value, expected", [
    ("steps", -5, "an integer >= 1"),
    ("steps", 0, "an integer >= 1"),
    ("checkpoint_every", 0, "an integer >= 1"),
    ("log_every", 0, "an integer >= 1"),
    ("log_every", -10, "an integer >= 1"),
    ("keep_checkpoints", 0, "None to keep every checkpoint"),
    ("micro_batches", 3, "does not split into train.micro_batches=3"),
    ("learning_rate", float("nan"), r"a finite number in \(0, inf\)"),
    ("learning_rate", 0.0, r"a finite number in \(0, inf\)"),
    ("warmup_ratio", 1.5, r"\[0, 1\]"),
    ("adam_b2", 1.0, r"\[0, 1\)"),
    ("head_slots_per_row", -2, "an integer >= -1"),
    ("transfer_guard", "forbid", "expected one of"),
])
def test_training_values_the_loop_cannot_use_are_named(key, value, expected):
    config = small_config()
    config.train[key] = value
    with pytest.raises(ConfigError, match=rf"train\..*{expected}") as caught:
        validate_experiment_config(config)
    assert caught.value.key == f"train.{key}"


def test_checkpoint_every_zero_stops_a_run_before_it_builds_anything(tmp_path):
    from med2e3_jax.train.loop import train

    config = small_config(checkpoint_every=0)

    def no_data(*args):
        raise AssertionError("the data must not be opened for a config that cannot run")

    with pytest.raises(ConfigError, match="train.checkpoint_every=0"):
        train(config, tmp_path / "run", make_iterator=no_data)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("axis, size", [("fsdp", 0), ("data", -2), ("tensor", -7)])
def test_mesh_sizes_are_named(axis, size):
    config = small_config()
    config.mesh[axis] = size
    with pytest.raises(ConfigError, match=rf"mesh\.{axis}="):
        validate_experiment_config(config)


def test_the_shipped_configs_validate():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs import med2e3_m3d, medium, tiny

    for module in (tiny, medium, med2e3_m3d):
        for stage in ("pretrain", "finetune", "finetune_lora"):
            validate_experiment_config(module.get_config(stage))


def _closed_record(record_id, question, volume, letter="A"):
    return {"id": record_id, "vision3d": [volume], "question_type": 1, "answer_choice": letter,
            "conversations": [{"from": "human", "value": f"<image3d>\n{question} Choices: A. Yes B. No"},
                              {"from": "gpt", "value": f"{letter}. Whatever"}]}


@pytest.mark.parametrize("edit, predicted_again", [
    (lambda r: r["conversations"][0].update(value="<image3d>\nIs the liver enlarged? Choices: A. Yes B. No"), True),
    (lambda r: r.update(vision3d=["other.npy"]), True),
    (lambda r: r.update(answer_choice="B") or r["conversations"][1].update(value="B. Whatever"), False),
    (lambda r: None, False),
])
def test_an_evaluation_rerun_predicts_again_only_the_records_whose_input_changed(tmp_path, edit, predicted_again):
    from med2e3_jax.evaluation import evaluate

    seen = []

    def predict(batch):
        seen.extend(record["id"] for record in batch)
        return [{"prediction": "A. " + record["conversations"][0]["value"][-30:], "slice_scores": None}
                for record in batch]

    records = [_closed_record("r0", "Is there a lesion?", "a.npy"), _closed_record("r1", "Is it axial?", "b.npy")]
    evaluate("m3d_vqa_closed", records, predict, tmp_path, progress=False)
    assert seen == ["r0", "r1"]
    edit(records[1])
    seen.clear()
    evaluate("m3d_vqa_closed", records, predict, tmp_path, progress=False)
    assert seen == (["r1"] if predicted_again else [])
    import json

    stored = {row["id"]: row["prediction"] for row in json.loads((tmp_path / "predictions.json").read_text())}
    assert stored["r1"] == predict([records[1]])[0]["prediction"] or not predicted_again
