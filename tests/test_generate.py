"""Decoding strategies of `med2e3_jax.generate` on a random tiny Med-2E3 and a bare tiny decoder.

The comparisons with transformers' `generate` live in test_generate_hf.py (they need torch).
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from data_pipelines.image_placeholder import IMAGE3D_TOKEN_ID, expand_image_placeholder  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax.generate import (  # noqa: E402
    GenerationConfig,
    beam_search,
    decode_texts,
    generate,
    generate_text,
    generate_tokens,
    greedy_or_sample,
)
from med2e3_jax.models.decoder import Decoder  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402

NEW_TOKENS = 5
VOCAB = 96


@pytest.fixture(scope="module")
def med2e3():
    """A random tiny Med-2E3, two prompts of different lengths, their volumes and TG-IS questions."""
    cfg = tiny.tiny_model()
    cfg.llm.vocab_size = VOCAB
    model = nnx.jit(lambda: Med2E3(cfg, rngs=nnx.Rngs(0)))()  # compiled init: faster than op by op
    rng = np.random.default_rng(0)
    volume = rng.uniform(size=(2, 1, *cfg.vision3d.img_size)).astype(np.float32)
    ids = np.array([[1, 5, IMAGE3D_TOKEN_ID, 7, 8, 9], [1, IMAGE3D_TOKEN_ID, 4, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    prompts = expand_image_placeholder(ids, mask, None, num_vision_tokens=config_lib.num_vision_tokens(cfg),
                                       max_length=cfg.llm_max_length, pad_id=0)
    questions = np.array([[101, 7, 8, 102], [101, 9, 102, 0]])
    return model, (volume, prompts.input_ids, prompts.attention_mask, questions, (questions > 0).astype(np.int32))


@pytest.fixture(scope="module")
def decoder():
    """A bare tiny Phi-3 decoder (LongRoPE) with logits far from flat, and a ragged right-padded batch."""
    cfg = tiny.tiny_model().llm
    cfg.update(vocab_size=VOCAB, initializer_range=0.5)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    ids = np.random.default_rng(1).integers(3, VOCAB, (3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [4], [6]])).astype(np.int32)
    return model, jnp.asarray(ids * mask), jnp.asarray(mask)


_run_med2e3 = nnx.jit(generate_tokens, static_argnames="config")
_run_text = nnx.jit(generate_text, static_argnames="config")


def test_greedy_generation_with_cache_equals_recomputing_the_full_forward(med2e3):
    model, (volume, ids, mask, questions, question_mask) = med2e3
    got = _run_med2e3(model, volume, ids, mask, questions, question_mask,
                      config=GenerationConfig(max_new_tokens=NEW_TOKENS))

    # One padded width for every step (causality makes the padding after a row's end invisible to it).
    forward = nnx.jit(lambda m, *a: m(*a))
    width = ids.shape[1] + NEW_TOKENS
    for row in range(2):
        length = int(mask[row].sum())
        row_ids = list(ids[row, :length])
        for _ in range(NEW_TOKENS):
            padded = np.zeros((1, width), np.int32)
            padded[0, :len(row_ids)] = row_ids
            row_mask = (np.arange(width) < len(row_ids)).astype(np.int32)[None]
            out = forward(model, volume[row:row + 1], padded, row_mask,
                          None, questions[row:row + 1], question_mask[row:row + 1])
            row_ids.append(int(jnp.argmax(out.logits[0, len(row_ids) - 1])))
        np.testing.assert_array_equal(got.tokens[row], row_ids[length:])
        np.testing.assert_allclose(got.slice_scores[row], out.slice_scores[0], atol=1e-6)
    np.testing.assert_array_equal(got.lengths, [NEW_TOKENS, NEW_TOKENS])


def test_rows_stop_at_eos_and_pad_after_it(med2e3):
    model, inputs = med2e3
    free = _run_med2e3(model, *inputs, config=GenerationConfig(max_new_tokens=NEW_TOKENS))
    eos = int(free.tokens[0, 1])  # make the second token of row 0 the end
    stopped = _run_med2e3(model, *inputs, config=GenerationConfig(max_new_tokens=NEW_TOKENS, eos_ids=eos, pad_id=-7))
    row = np.asarray(stopped.tokens[0]).tolist()
    assert row[:2] == np.asarray(free.tokens[0, :2]).tolist()
    assert row[2:] == [-7] * (NEW_TOKENS - 2)
    assert int(stopped.lengths[0]) == 2


def test_sampling_with_a_fixed_key_is_reproducible_and_other_keys_differ(decoder):
    model, ids, mask = decoder
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=2.0, top_k=0)
    first = _run_text(model, ids, mask, config=config, rng=jax.random.key(0))
    again = _run_text(model, ids, mask, config=config, rng=jax.random.key(0))
    other = _run_text(model, ids, mask, config=config, rng=jax.random.key(1))
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


def test_sampling_restricted_to_the_top_token_is_greedy(decoder):
    model, ids, mask = decoder
    greedy = _run_text(model, ids, mask, config=GenerationConfig(max_new_tokens=6))
    for warper in (dict(top_k=1), dict(top_k=0, top_p=1e-6)):
        config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=3.0, **warper)
        sampled = _run_text(model, ids, mask, config=config, rng=jax.random.key(3))
        np.testing.assert_array_equal(sampled.tokens, greedy.tokens, err_msg=str(warper))


def test_sampling_without_a_key_is_refused(decoder):
    model, ids, mask = decoder
    with pytest.raises(ValueError, match="PRNG key"):
        generate_text(model, ids, mask, config=GenerationConfig(max_new_tokens=2, do_sample=True))


def test_beam_search_with_one_beam_equals_greedy(decoder):
    """With one beam and early_stopping=True the first finished hypothesis ends the search: greedy,
    EOS included. (`num_beams=1` in `generate` dispatches to greedy, as transformers does.)"""
    model, ids, mask = decoder
    free = _run_text(model, ids, mask, config=GenerationConfig(max_new_tokens=7))
    config = GenerationConfig(max_new_tokens=7, eos_ids=int(free.tokens[1, 2]), pad_id=0, early_stopping=True)
    greedy = nnx.jit(greedy_or_sample, static_argnames="config")(model, model.embed(ids), mask, config=config)
    beams = nnx.jit(beam_search, static_argnames="config")(model, model.embed(ids), mask, config=config)
    np.testing.assert_array_equal(beams.tokens, greedy.tokens)
    np.testing.assert_array_equal(beams.lengths, greedy.lengths)
    assert int(greedy.lengths[1]) == 3
    # Scores: beam search divides the summed log-probability by the length (length_penalty 1).
    np.testing.assert_allclose(beams.scores, greedy.scores / greedy.lengths, rtol=1e-5)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(decoder):
    model, ids, mask = decoder
    greedy = _run_text(model, ids, mask, config=GenerationConfig(max_new_tokens=6))
    beams = _run_text(model, ids, mask, config=GenerationConfig(max_new_tokens=6, num_beams=4))
    assert beams.tokens.shape == greedy.tokens.shape
    assert np.all(np.asarray(beams.scores) * 6 >= np.asarray(greedy.scores) - 1e-4)


def test_decoding_across_the_longrope_switch_equals_recomputing_the_full_forward(decoder):
    """Past `original_max_position_embeddings` every key must carry the long factors: the loop recomputes
    the cache at the crossing, so that the tokens are those of full forwards (here the switch is moved
    to 10 and the longest prompt has 9 tokens)."""
    _, ids, mask = decoder
    cfg = tiny.tiny_model().llm
    cfg.update(vocab_size=VOCAB, initializer_range=0.5)
    cfg.rope_scaling.original_max_position_embeddings = 10
    switched = Decoder(cfg, rngs=nnx.Rngs(1))
    got = _run_text(switched, ids, mask, config=GenerationConfig(max_new_tokens=6))

    forward = nnx.jit(lambda m, ids, positions, mask: m(ids, positions=positions, attention_mask=mask).logits)
    sequences = [list(np.asarray(ids[row, :int(mask[row].sum())])) for row in range(3)]
    longest = max(len(s) for s in sequences)
    width = longest + 6  # padding positions are 0: the regime follows the longest row, as in the loop
    for _ in range(6):
        batch = np.zeros((3, width), np.int32)
        batch_mask = np.zeros((3, width), np.int32)
        for row, seq in enumerate(sequences):
            batch[row, :len(seq)], batch_mask[row, :len(seq)] = seq, 1
        positions = np.broadcast_to(np.arange(width), batch.shape) * batch_mask
        logits = forward(switched, jnp.asarray(batch), jnp.asarray(positions), jnp.asarray(batch_mask))
        for row, seq in enumerate(sequences):
            seq.append(int(jnp.argmax(logits[row, len(seq) - 1])))
    lengths = [int(m) for m in np.asarray(mask.sum(1))]
    np.testing.assert_array_equal(got.tokens, [seq[n:] for seq, n in zip(sequences, lengths)])


class _Tokenizer:
    """The part of an HF tokenizer that `generate` uses."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def test_generate_returns_texts_and_slice_scores_per_sample(med2e3):
    model, inputs = med2e3
    out = generate(model, *inputs, config=GenerationConfig(max_new_tokens=3), tokenizer=_Tokenizer())
    assert isinstance(out.tokens, np.ndarray) and out.slice_scores.shape == (2, 32)
    np.testing.assert_allclose(out.slice_scores.sum(axis=1), 1.0, rtol=1e-5)
    assert out.texts == tuple(" ".join(f"t{t}" for t in row) for row in out.tokens)


def test_texts_end_before_the_eos_and_ignore_the_padding():
    tokens = np.array([[5, 6, 2, 0], [7, 8, 9, 3]])
    texts = decode_texts(tokens, np.array([3, 4]), _Tokenizer(), eos_ids=(2, 3))
    assert texts == ("t5 t6", "t7 t8 t9")


def test_generation_config_names_what_it_refuses():
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationConfig(num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="early_stopping"):
        GenerationConfig(early_stopping="sometimes")
    assert GenerationConfig(eos_ids=5).eos_ids == (5,)
    llm = tiny.tiny_model().llm
    assert dataclasses.asdict(GenerationConfig.for_llm(llm, max_new_tokens=3))["eos_ids"] == (llm.eos_token_id,)
