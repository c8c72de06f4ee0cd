"""A very small experiment config and random, valid training batches for it (no tokenizer, no data).

`small_config` shrinks `configs/tiny.py` further so that a jitted training step compiles and runs in
seconds on 2 CPU cores, while keeping every structural feature: two depth groups of slices, TG-IS with
the question branch, a Phi-3 LLM with fused projections, widths that divide by 2 and 4 (so that FSDP and
tensor parallel meshes of 8 devices really split them).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax.config import IGNORE_INDEX, IMAGE3D_TOKEN_ID  # noqa: E402
from med2e3_jax.models.merge import expand_image_placeholder  # noqa: E402
from med2e3_jax.train_config import experiment_config  # noqa: E402

BOS, CLS, SEP = 1, 101, 102


def small_model():
    model = tiny.tiny_model()
    # One layer per tower: compile time, not run time, is what a test of the training step pays for.
    model.vision3d.update(img_size=(8, 32, 32), patch_size=(2, 16, 16), num_layers=1)  # pooled grid (2,1,1)
    model.vision2d.update(image_size=32, num_layers=1)  # 4 tokens per slice
    model.question_encoder.update(vocab_size=128, max_position_embeddings=16)
    model.llm.update(vocab_size=256, num_layers=1, eos_token_id=255, pad_token_id=255)
    model.llm_max_length = 32
    return model


def small_config(stage: str = "finetune", **train):
    config = experiment_config(small_model(), stage)
    config.data.question_max_length = 8
    config.train.update(steps=20, global_batch_size=8, micro_batches=1, learning_rate=1e-3, warmup_ratio=0.1)
    config.train.update(train)
    return config


def random_batch(config, batch_size: int, *, seed: int = 0, answer_lengths=None) -> dict[str, np.ndarray]:
    """A batch like the data pipeline's: a prompt with one `<image3d>`, then a supervised answer + EOS.

    Args:
      answer_lengths: supervised answer tokens per row (EOS is supervised too, so each row has
        length + 1 targets); random in [1, 6] by default.
    """
    model = config.model
    rng = np.random.default_rng(seed)
    vocab, eos = model.llm.vocab_size, model.llm.eos_token_id
    if answer_lengths is None:
        answer_lengths = rng.integers(1, 7, size=batch_size)
    rows, row_labels = [], []
    for answer_length in answer_lengths:
        before, after = rng.integers(3, eos, size=rng.integers(1, 4)), rng.integers(3, eos, size=rng.integers(1, 4))
        answer = rng.integers(3, eos, size=int(answer_length))
        ids = np.concatenate([[BOS], before, [IMAGE3D_TOKEN_ID], after, answer, [eos]])
        labels = np.concatenate([np.full(len(ids) - len(answer) - 1, IGNORE_INDEX), answer, [eos]])
        rows.append(ids)
        row_labels.append(labels)
    width = max(len(r) for r in rows)
    ids = np.full((batch_size, width), eos, np.int64)
    labels = np.full((batch_size, width), IGNORE_INDEX, np.int64)
    mask = np.zeros((batch_size, width), np.int64)
    for b, (r, lab) in enumerate(zip(rows, row_labels)):
        ids[b, : len(r)], labels[b, : len(r)], mask[b, : len(r)] = r, lab, 1
    prompts = expand_image_placeholder(
        ids, mask, labels, num_vision_tokens=config_lib.num_vision_tokens(model),
        max_length=model.llm_max_length, pad_id=eos, pad_to=model.llm_max_length,
    )
    assert vocab > eos
    question_length = config.data.question_max_length
    question_ids = np.zeros((batch_size, question_length), np.int32)
    question_mask = np.zeros((batch_size, question_length), np.int32)
    for b in range(batch_size):
        words = rng.integers(SEP + 1, model.question_encoder.vocab_size,
                             size=rng.integers(1, question_length - 1))
        question = np.concatenate([[CLS], words, [SEP]])
        question_ids[b, : len(question)], question_mask[b, : len(question)] = question, 1
    volume = rng.uniform(size=(batch_size, 1, *model.vision3d.img_size)).astype(np.float32)
    return dict(
        volume=volume,
        input_ids=prompts.input_ids,
        labels=prompts.labels,
        attention_mask=prompts.attention_mask,
        question_ids=question_ids,
        question_mask=question_mask,
        record_index=np.arange(batch_size, dtype=np.int64),
    )


def supervised_tokens(batch) -> np.ndarray:
    """(batch,) number of next-token targets per row (what the loss averages over)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(axis=1)
