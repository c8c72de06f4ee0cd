"""A very small experiment config for the training-step tests (batches: `med2e3_jax.random_batches`).

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
from data_pipelines.image_placeholder import IGNORE_INDEX  # noqa: E402
from med2e3_jax.train_config import experiment_config  # noqa: E402


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


def supervised_tokens(batch) -> np.ndarray:
    """(batch,) number of next-token targets per row (what the loss averages over)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(axis=1)
