"""Random, valid training batches for an experiment config: no tokenizer, no data.

For the tests, the step benchmark and the device check, which need batches shaped like the data
pipeline's (one `<image3d>` expanded to the config's vision tokens, a supervised answer, static
shapes) without reading volumes or loading a tokenizer.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID, expand_image_placeholder
from med2e3_jax import config as config_lib

BOS, CLS, SEP = 1, 101, 102


def random_batch(config, batch_size: int, *, seed: int = 0, answer_lengths=None) -> dict[str, np.ndarray]:
    """A batch like the data pipeline's: a prompt with one `<image3d>`, then a supervised answer + EOS,
    padded to `llm_max_length`.

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


def benchmark_batch(config, batch_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch whose answers run 8 to 23 tokens, as VQA answers and captions do: what a timed
    step should see, since the supervised positions set the LM head's work."""
    answers = np.random.default_rng(seed).integers(8, 24, size=batch_size)
    return random_batch(config, batch_size, seed=seed, answer_lengths=answers)
