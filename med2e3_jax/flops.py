"""Matmul FLOPs of a Med-2E3 training step, counted from the config: the numerator of model FLOPs
utilisation (`benchmarks/bench_train_step.py`, `scripts/device_check.py`)."""

from __future__ import annotations

import numpy as np

from data_pipelines.image_placeholder import IGNORE_INDEX
from med2e3_jax import config as config_lib


def model_flops(cfg, batch, trainable) -> float:
    """Matmul FLOPs of one training step, counted from the config: 2 per multiply-add forward, twice
    that again backward for the trainable towers (input and weight gradients); the frozen encoders run
    forward only. The LM head counts on the supervised positions (the only ones whose logits the loss
    needs); attention scores and values count as matmuls."""
    return sum(model_flops_by_part(cfg, batch, trainable).values())


def model_flops_by_part(cfg, batch, trainable) -> dict[str, float]:
    """`model_flops` per part: each tower of `trainable_parts`' names, and `lm_head` apart from `llm`."""
    batch_size, length = batch["input_ids"].shape
    slices = config_lib.num_slices(cfg)

    def encoder(tokens, hidden, mlp, layers, qkv=None):
        """Forward multiply-adds of `layers` pre/post-norm blocks over (sequences, tokens)."""
        sequences, n = tokens
        qkv = qkv or 3 * hidden
        per_token = hidden * qkv + hidden * hidden + 2 * hidden * mlp
        return layers * sequences * (n * per_token + 2 * n * n * hidden)

    v3, v2, q, llm = cfg.vision3d, cfg.vision2d, cfg.question_encoder, cfg.llm
    patches = int(np.prod([s // p for s, p in zip(v3.img_size, v3.patch_size)]))
    pooled = config_lib.pooled_grid(cfg)
    pooled_tokens = int(np.prod(pooled))
    slice_tokens = (v2.image_size // v2.patch_size) ** 2
    embed = llm.hidden_size
    head_dim = llm.head_dim or llm.hidden_size // llm.num_heads
    q_size, kv_size = llm.num_heads * head_dim, llm.num_kv_heads * head_dim
    question_length = batch["question_ids"].shape[1]
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    macs = {
        "vision3d": encoder((batch_size, patches + 1), v3.hidden_size, v3.mlp_dim, v3.num_layers)
        + batch_size * patches * v3.in_channels * int(np.prod(v3.patch_size)) * v3.hidden_size,
        "question_encoder": encoder((batch_size, question_length), q.hidden_size, q.intermediate_size, q.num_layers)
        + batch_size * q.hidden_size**2,
        "vision2d": encoder((batch_size * slices, slice_tokens), v2.hidden_size, v2.intermediate_size, v2.num_layers)
        + batch_size * slices * slice_tokens * v2.num_channels * v2.patch_size**2 * v2.hidden_size,
        "vision3d_connector": batch_size * pooled_tokens * (v3.hidden_size * embed + embed * embed),
        "vision2d_connector": batch_size * slices * slice_tokens * (v2.hidden_size * embed + embed * embed),
        # text_mlp, the slice keys . question, and the score-weighted sum of the slice tokens.
        "tgis": batch_size * (q.hidden_size * embed + slices * embed + slices * slice_tokens * embed),
        "llm": llm.num_layers * batch_size * (
            length * (embed * (q_size + 2 * kv_size) + q_size * embed + 3 * embed * llm.intermediate_size)
            + 2 * length * length * q_size
        ),
        "lm_head": targets * embed * llm.vocab_size,
    }
    return {name: 2 * m * (3 if name in trainable or (name == "lm_head" and "llm" in trainable) else 1)
            for name, m in macs.items()}
