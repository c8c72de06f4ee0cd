"""The shipped experiment configs build, validate and say what is wrong with their options."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import med2e3_m3d, tiny  # noqa: E402
from med2e3_jax.config import validate_model_config  # noqa: E402
from med2e3_jax.train_config import TRAINABLE  # noqa: E402


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_configs_validate_and_train_their_stage(stage):
    for config in (tiny.get_config(stage), med2e3_m3d.get_config(stage)):
        validate_model_config(config.model)
        assert config.train.stage == stage and tuple(config.train.trainable) == TRAINABLE[stage]


def test_tiny_minilm_option_sizes_the_question_encoder_like_the_checkpoint_it_imports():
    plain, minilm = tiny.get_config("finetune"), tiny.get_config("finetune,minilm")
    assert plain.train.components.question_encoder == ""
    assert minilm.train.components.question_encoder.endswith("minilm")
    # all-MiniLM-L6-v2's config.json: hidden 384, 6 layers, 12 heads, intermediate 1536.
    encoder = minilm.model.question_encoder
    assert (encoder.hidden_size, encoder.num_layers, encoder.num_heads, encoder.intermediate_size) == (384, 6, 12, 1536)


def test_tiny_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bert'\]"):
        tiny.get_config("finetune,bert")


def test_tiny_minilm_sizes_equal_the_fetched_checkpoint_config():
    from assets_for_tests import fetched
    from med2e3_jax.checkpoint.med2e3_port import question_encoder_config

    minilm = question_encoder_config(fetched("minilm"))
    ours = tiny.get_config("pretrain,minilm").model.question_encoder
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        assert ours[key] == minilm[key], key


def test_tiny_lora_finetune_lays_out_the_head_like_finetune():
    # The same VQA batches: 16 head slots a row (answers take about 8 tokens), not a quarter of the prompt.
    slots = {stage: tiny.get_config(stage).train.head_slots_per_row for stage in ("finetune", "finetune_lora")}
    assert slots == {"finetune": 16, "finetune_lora": 16}
