"""Token ids of our generator against transformers' `generate` on tiny Phi-3 (LongRoPE) and Llama models.

Both sides hold the same weights (imported through LLM_TABLE). transformers gets the batch left-padded (its
requirement for decoder-only models); ours gets it right-padded, as the Med-2E3 merge produces it, so the
comparison also pins that positions follow the real tokens, not the padding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from med2e3_jax.checkpoint.importer import load_pytorch
from med2e3_jax.checkpoint.llm_port import LLM_TABLE, llm_config_from_hf
from med2e3_jax.checkpoint.port import DictSource
from med2e3_jax.generate import GenerationConfig, generate_text, warp_logits
from med2e3_jax.models.decoder import Decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300
PAD = 0
ORIGINAL_MAX = 32  # LongRoPE switch: small, so that decoding crosses it


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _hf_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False)
    if family == "phi3":
        rng = np.random.default_rng(0)
        return transformers.Phi3Config(
            **common, num_key_value_heads=4, max_position_embeddings=8 * ORIGINAL_MAX,
            original_max_position_embeddings=ORIGINAL_MAX,
            rope_parameters=dict(rope_theta=10000.0, type="longrope",
                                 short_factor=(1 + rng.random(8)).round(4).tolist(),
                                 long_factor=(2 + 10 * rng.random(8)).round(4).tolist()),
        )
    return transformers.LlamaConfig(**common, num_key_value_heads=2)


@pytest.fixture(scope="module", params=["phi3", "llama"])
def models(request):
    """(transformers model, our Decoder with the same weights)."""
    hf_config = _hf_config(request.param)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = getattr(transformers, f"{type(hf_config).__name__[:-6]}ForCausalLM")(hf_config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights far from the init, so that the logits are not flat
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else
                        noise if "embed_tokens" in name else noise / math.sqrt(param.shape[1]))
    cfg = llm_config_from_hf(hf_config.to_dict())
    source = DictSource({k: v.numpy() for k, v in hf_model.state_dict().items()})
    model, _ = load_pytorch(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), source, LLM_TABLE)
    return hf_model, model


def _prompts(lengths, seed=0):
    """Right-padded and left-padded copies of the same prompts: (ids, mask) twice."""
    rng = np.random.default_rng(seed)
    total = max(lengths)
    right_ids, left_ids = np.full((2, len(lengths), total), PAD, np.int64)
    right_mask, left_mask = np.zeros((2, len(lengths), total), np.int64)
    for row, length in enumerate(lengths):
        ids = rng.integers(3, VOCAB, length)
        right_ids[row, :length], right_mask[row, :length] = ids, 1
        left_ids[row, total - length:], left_mask[row, total - length:] = ids, 1
    return (right_ids, right_mask), (left_ids, left_mask)


def _ours(model, config, ids=None, mask=None, embeds=None):
    run = nnx.jit(generate_text, static_argnames="config")
    out = run(model, None if ids is None else jnp.asarray(ids), jnp.asarray(mask),
              inputs_embeds=None if embeds is None else jnp.asarray(embeds), config=config)
    return np.asarray(out.tokens), np.asarray(out.lengths)


def _hf_generate(hf_model, new_tokens, eos, generation=None, **inputs):
    kwargs = dict(max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=PAD, do_sample=False, **(generation or {}))
    with torch.no_grad():
        out = hf_model.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **kwargs).numpy()
    if "input_ids" in inputs:
        out = out[:, inputs["input_ids"].shape[1]:]
    return np.pad(out, ((0, 0), (0, new_tokens - out.shape[1])), constant_values=PAD)


def _eos_inside(hf_model, new_tokens, row, at, **inputs):
    """An id that a greedy row emits mid-way (transformers' run, cheap to repeat), made the EOS so that
    stopping at EOS and padding after it are exercised."""
    free = _hf_generate(hf_model, new_tokens, eos=VOCAB - 1, **inputs)
    return int(free[row, at])


def _upto_eos(tokens, eos):
    """Each row cut after its first EOS (transformers fills the rest with PAD or, in beam search, EOS)."""
    rows = []
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        rows.append(row[: hits[0] + 1].tolist() if hits.size else row.tolist())
    return rows


# Lengths 27 and 19 with 12 new tokens: the longest row crosses the Phi-3 LongRoPE switch (32) at step 6.
TEXT_LENGTHS, TEXT_NEW = (27, 19, 24), 12


def test_greedy_token_ids_equal_transformers_generate_on_token_prompts(models):
    hf_model, model = models
    (right_ids, right_mask), (left_ids, left_mask) = _prompts(TEXT_LENGTHS)
    eos = _eos_inside(hf_model, TEXT_NEW, 0, 3, input_ids=left_ids, attention_mask=left_mask)
    config = GenerationConfig(max_new_tokens=TEXT_NEW, eos_ids=eos, pad_id=PAD)

    ours, lengths = _ours(model, config, right_ids, right_mask)
    theirs = _hf_generate(hf_model, TEXT_NEW, eos, input_ids=left_ids, attention_mask=left_mask)
    np.testing.assert_array_equal(ours, theirs)
    assert lengths[0] == 4 and ours[0, 3] == eos and (ours[0, 4:] == PAD).all()

    # Left padding gives the same tokens: positions follow the real tokens.
    ours_left, _ = _ours(model, config, left_ids, left_mask)
    np.testing.assert_array_equal(ours_left, theirs)


def test_greedy_token_ids_equal_transformers_generate_on_inputs_embeds(models):
    """As Med-2E3 generates: the prompt goes in as embeddings (here the token embeddings plus noise, so that
    they are not any token's). Kept under the LongRoPE switch: transformers decides the Phi-3 cache
    recomputation from the generated length alone when given inputs_embeds."""
    hf_model, model = models
    (right_ids, right_mask), (_, left_mask) = _prompts((14, 9), seed=1)
    noise = np.random.default_rng(2).normal(0, 0.5, right_ids.shape + (64,)).astype(np.float32)
    table = hf_model.get_input_embeddings().weight.detach().numpy()
    right_embeds = ((table[right_ids] + noise) * right_mask[..., None]).astype(np.float32)
    shift = np.argmax(left_mask, axis=1)  # the same embeddings, moved to the left-padded layout
    left_embeds = np.stack([np.roll(e, s, axis=0) for e, s in zip(right_embeds, shift)])
    new_tokens = 10
    eos = _eos_inside(hf_model, new_tokens, 1, 5, inputs_embeds=left_embeds, attention_mask=left_mask)
    config = GenerationConfig(max_new_tokens=new_tokens, eos_ids=eos, pad_id=PAD)

    ours, _ = _ours(model, config, mask=right_mask, embeds=right_embeds)
    theirs = _hf_generate(hf_model, new_tokens, eos, inputs_embeds=left_embeds, attention_mask=left_mask)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_token_ids_equal_transformers_beam_search(models, early_stopping):
    hf_model, model = models
    (right_ids, right_mask), (left_ids, left_mask) = _prompts((12, 7), seed=3)
    new_tokens, beams = 8, 3
    # The EOS: a token of the best beam without one, so that a hypothesis ending in it competes.
    free = _hf_generate(hf_model, new_tokens, VOCAB - 1, generation=dict(num_beams=beams),
                        input_ids=left_ids, attention_mask=left_mask)
    eos = int(free[0, 4])
    config = GenerationConfig(max_new_tokens=new_tokens, eos_ids=eos, pad_id=PAD, num_beams=beams,
                              early_stopping=early_stopping)

    ours, lengths = _ours(model, config, right_ids, right_mask)
    theirs = _hf_generate(hf_model, new_tokens, eos, generation=dict(num_beams=beams, early_stopping=early_stopping),
                          input_ids=left_ids, attention_mask=left_mask)
    assert _upto_eos(ours, eos) == _upto_eos(theirs, eos)
    assert lengths.tolist() == [len(row) for row in _upto_eos(theirs, eos)]
    assert lengths.min() < new_tokens  # a finished hypothesis won somewhere


@pytest.mark.parametrize("warper", [dict(temperature=0.7, top_k=5, top_p=1.0), dict(temperature=1.3, top_k=0, top_p=0.8),
                                    dict(temperature=1.0, top_k=20, top_p=0.5)])
def test_sampling_warpers_equal_transformers_warpers(warper):
    from transformers.generation import logits_process as lp

    logits = np.random.default_rng(4).normal(0, 3, (3, 50)).astype(np.float32)
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary are kept, as transformers keeps them
    processors = [lp.TemperatureLogitsWarper(warper["temperature"])]
    if warper["top_k"]:
        processors.append(lp.TopKLogitsWarper(warper["top_k"]))
    if warper["top_p"] < 1:
        processors.append(lp.TopPLogitsWarper(warper["top_p"]))
    theirs = lp.LogitsProcessorList(processors)(None, torch.from_numpy(logits)).numpy()
    ours = np.asarray(warp_logits(jnp.asarray(logits), GenerationConfig(do_sample=True, **warper)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)
