"""Greedy decoding with the KV cache against recomputing the whole forward for every new token."""

import sys
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax.config import IMAGE3D_TOKEN_ID  # noqa: E402
from med2e3_jax.generate import greedy_generate  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402
from med2e3_jax.models.merge import expand_image_placeholder  # noqa: E402

NEW_TOKENS = 5


def _model_and_inputs():
    cfg = tiny.tiny_model()
    cfg.llm.vocab_size = 96
    model = Med2E3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    volume = rng.uniform(size=(2, 1, *cfg.vision3d.img_size)).astype(np.float32)
    ids = np.array([[1, 5, IMAGE3D_TOKEN_ID, 7, 8, 9], [1, IMAGE3D_TOKEN_ID, 4, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    prompts = expand_image_placeholder(ids, mask, None, num_vision_tokens=config_lib.num_vision_tokens(cfg),
                                       max_length=cfg.llm_max_length, pad_id=0)
    questions = np.array([[101, 7, 8, 102], [101, 9, 102, 0]])
    return model, volume, prompts, questions, (questions > 0).astype(np.int32)


def test_greedy_generation_with_cache_equals_recomputing_the_full_forward():
    model, volume, prompts, questions, question_mask = _model_and_inputs()
    generate = nnx.jit(greedy_generate, static_argnames=("max_new_tokens", "eos_id", "pad_id"))
    got = generate(model, jnp.asarray(volume), jnp.asarray(prompts.input_ids), jnp.asarray(prompts.attention_mask),
                   jnp.asarray(questions), jnp.asarray(question_mask), max_new_tokens=NEW_TOKENS, eos_id=-1, pad_id=0)

    forward = nnx.jit(lambda m, *a: m(*a).logits)
    for row in range(2):
        length = int(prompts.attention_mask[row].sum())
        ids = list(prompts.input_ids[row, :length])
        for _ in range(NEW_TOKENS):
            logits = forward(model, volume[row:row + 1], jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                             None, questions[row:row + 1], question_mask[row:row + 1])
            ids.append(int(jnp.argmax(logits[0, -1])))
        np.testing.assert_array_equal(got.tokens[row], ids[length:])


def test_rows_stop_at_eos_and_pad_after_it():
    model, volume, prompts, questions, question_mask = _model_and_inputs()
    generate = nnx.jit(greedy_generate, static_argnames=("max_new_tokens", "eos_id", "pad_id"))
    free = generate(model, volume, prompts.input_ids, prompts.attention_mask, questions, question_mask,
                    max_new_tokens=NEW_TOKENS, eos_id=-1, pad_id=0)
    eos = int(free.tokens[0, 1])  # make the second token of row 0 the end
    stopped = generate(model, volume, prompts.input_ids, prompts.attention_mask, questions, question_mask,
                       max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=-7)
    row = list(np.asarray(stopped.tokens[0]))
    assert row[:2] == list(np.asarray(free.tokens[0, :2]))
    assert row[2:] == [-7] * (NEW_TOKENS - 2)
