"""The decoder-only LLM against transformers' Phi-3 / Llama / Qwen2, its KV cache, and the config port."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from assets_for_tests import PUBLIC_FIXTURE
from flax import nnx

from data_pipelines.image_placeholder import IGNORE_INDEX
from med2e3_jax.checkpoint.importer import export_pytorch, load_pytorch
from med2e3_jax.checkpoint.llm_port import LLM_TABLE, llm_config_from_hf
from med2e3_jax.checkpoint.port import DictSource
from med2e3_jax.models.decoder import Decoder
from med2e3_jax.models.lm_loss import HeadLayout, summed_token_loss
from med2e3_jax.models.rope import RotaryEmbedding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURE = PUBLIC_FIXTURE
VOCAB = 300
ORIGINAL_MAX = 32  # LongRoPE switch length: small, so that the long regime is cheap to reach


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _common(**overrides):
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides,
    )


def _longrope(rotary_dim):
    rng = np.random.default_rng(0)
    return dict(
        type="longrope",
        short_factor=(1 + rng.random(rotary_dim // 2)).round(4).tolist(),
        long_factor=(2 + 10 * rng.random(rotary_dim // 2)).round(4).tolist(),
    )


def _hf_config(name):
    if name.startswith("phi3"):
        partial = 0.75 if name == "phi3-partial-rotary" else 1.0
        return transformers.Phi3Config(
            **_common(num_key_value_heads=4, tie_word_embeddings=False),
            sliding_window=8 if name == "phi3-sliding-window" else None,
            max_position_embeddings=8 * ORIGINAL_MAX, original_max_position_embeddings=ORIGINAL_MAX,
            rope_parameters=dict(rope_theta=10000.0, partial_rotary_factor=partial, **_longrope(int(16 * partial))),
        )
    if name == "llama-gqa":
        return transformers.LlamaConfig(**_common(num_key_value_heads=2, tie_word_embeddings=False))
    if name == "llama3-rope":
        return transformers.LlamaConfig(
            **_common(num_key_value_heads=2, tie_word_embeddings=False), max_position_embeddings=256,
            rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=ORIGINAL_MAX),
        )
    if name == "qwen2-tied":
        return transformers.Qwen2Config(
            **_common(num_key_value_heads=2, tie_word_embeddings=True), rope_parameters=dict(rope_theta=1e6)
        )
    raise KeyError(name)


def _randomize(model, seed):
    """Draws every weight away from transformers' init (unit norms, zero biases would hide port errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))


def _models(name, seed=0):
    """(transformers model, our Decoder with its weights imported through LLM_TABLE, our config)."""
    hf_config = _hf_config(name)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf_model = getattr(transformers, f"{type(hf_config).__name__[:-6]}ForCausalLM")(hf_config).eval()
    _randomize(hf_model, seed)
    cfg = llm_config_from_hf(hf_config.to_dict())
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    source = DictSource({k: v.numpy() for k, v in hf_model.state_dict().items()})
    model, _ = load_pytorch(abstract, source, LLM_TABLE)
    return hf_model, model, cfg


def _right_padded_batch(lengths, total, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(len(lengths), total))
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask, ids, 0), mask


def _hf_forward(hf_model, ids, mask):
    with torch.no_grad():
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        hidden = hf_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = hf_model(input_ids=ids, attention_mask=mask).logits
    return hidden.numpy(), logits.numpy()


def _forward(model, ids, mask):
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return model(jnp.asarray(ids), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask))


def _max_error(ours, theirs, mask):
    return float(np.abs(np.asarray(ours) - theirs)[mask.astype(bool)].max())


@pytest.mark.parametrize(
    "name, total",
    [
        ("phi3", 20),  # padded length <= original_max_position_embeddings: short factors
        ("phi3", 48),  # > original_max_position_embeddings: long factors
        ("phi3-partial-rotary", 40),
        ("phi3-sliding-window", 20),
        ("llama-gqa", 20),
        ("llama3-rope", 40),
        ("qwen2-tied", 20),
    ],
)
def test_logits_and_hidden_states_match_transformers_on_a_right_padded_batch(name, total):
    hf_model, model, _ = _models(name)
    ids, mask = _right_padded_batch([total, total - 7], total, seed=1)
    hf_hidden, hf_logits = _hf_forward(hf_model, ids, mask)
    out = _forward(model, ids, mask)
    assert out.logits.dtype == jnp.float32
    assert _max_error(out.hidden_states, hf_hidden, mask) < 1e-5
    assert _max_error(out.logits, hf_logits, mask) < 1e-4
    # The training step's head (hidden @ head_kernel) is the same head, tied or not.
    assert _max_error(out.hidden_states @ model.head_kernel(), hf_logits, mask) < 1e-4


def test_longrope_switches_from_short_to_long_factors_past_the_original_length():
    _, model, cfg = _models("phi3")
    rope = model.rope
    short = np.asarray(rope.cos_sin(jnp.arange(ORIGINAL_MAX)[None])[0])
    long = np.asarray(rope.cos_sin(jnp.arange(ORIGINAL_MAX + 1)[None])[0])
    expected_factor = math.sqrt(1 + math.log(8) / math.log(ORIGINAL_MAX))
    inv_short = 1 / (np.asarray(cfg.rope_scaling.short_factor) * 10000.0 ** (np.arange(0, 16, 2) / 16))
    inv_long = 1 / (np.asarray(cfg.rope_scaling.long_factor) * 10000.0 ** (np.arange(0, 16, 2) / 16))
    np.testing.assert_allclose(short[0, 5, :8], expected_factor * np.cos(5 * inv_short), atol=1e-6)
    np.testing.assert_allclose(long[0, 5, :8], expected_factor * np.cos(5 * inv_long), atol=1e-6)


@pytest.mark.parametrize("name", ["phi3", "llama-gqa", "qwen2-tied"])
def test_exported_weights_equal_the_transformers_state_dict(name):
    hf_model, model, cfg = _models(name)
    exported = export_pytorch(model, LLM_TABLE)
    expected = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def _decode_step(model, cache, ids, positions, mask):
    return model(ids, positions=positions, attention_mask=mask, cache=cache)


@pytest.mark.parametrize("name", ["phi3", "llama-gqa", "qwen2-tied"])
def test_kv_cache_decoding_of_a_ragged_batch_equals_the_full_forward(name):
    _, model, _ = _models(name)
    prompt_lengths, steps, max_len = np.array([5, 9]), 6, 16
    full_ids, _ = _right_padded_batch([15, 15], 15, seed=2)
    full_lengths = prompt_lengths + steps
    full_mask = (np.arange(15)[None] < full_lengths[:, None]).astype(np.int64)
    full = _forward(model, np.where(full_mask, full_ids, 0), full_mask)

    step = nnx.jit(_decode_step)
    cache = model.init_cache(batch=2, max_len=max_len)
    prompt_mask = (np.arange(9)[None] < prompt_lengths[:, None]).astype(np.int64)
    prompt_ids = np.where(prompt_mask, full_ids[:, :9], 0)
    out = step(model, cache, jnp.asarray(prompt_ids), jnp.broadcast_to(jnp.arange(9), (2, 9)),
               jnp.asarray(prompt_mask))
    assert _max_error(out.logits, np.asarray(full.logits[:, :9]), prompt_mask) < 1e-4
    rows = np.arange(2)
    for s in range(steps):
        positions = prompt_lengths + s
        out = step(model, out.cache, jnp.asarray(full_ids[rows, positions][:, None]),
                   jnp.asarray(positions[:, None]), jnp.ones((2, 1), jnp.int32))
        expected = np.asarray(full.logits)[rows, positions]
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), expected, atol=1e-4, err_msg=f"step {s}")
    np.testing.assert_array_equal(np.asarray(out.cache.key_valid), np.arange(max_len)[None] < full_lengths[:, None])


def test_kv_cache_decoding_across_the_longrope_switch_matches_transformers_generation():
    # Keys cached before the switch keep their short-factor rotation, as in transformers' DynamicCache,
    # so this differs from a full forward and is pinned against transformers' cached decoding.
    hf_model, model, _ = _models("phi3")
    ids, _ = _right_padded_batch([36, 36], 36, seed=3)
    prompt = ORIGINAL_MAX - 2
    with torch.no_grad():
        hf_out = hf_model(input_ids=torch.from_numpy(ids[:, :prompt]), use_cache=True)
        hf_logits, hf_cache = [hf_out.logits[:, -1].numpy()], hf_out.cache
        for t in range(prompt, ids.shape[1]):
            hf_out = hf_model(input_ids=torch.from_numpy(ids[:, t:t + 1]), cache=hf_cache, use_cache=True)
            hf_logits.append(hf_out.logits[:, -1].numpy())
            hf_cache = hf_out.cache

    step = nnx.jit(_decode_step)
    cache = model.init_cache(batch=2, max_len=40)
    out = step(model, cache, jnp.asarray(ids[:, :prompt]), jnp.broadcast_to(jnp.arange(prompt), (2, prompt)),
               jnp.ones((2, prompt), jnp.int32))
    logits = [np.asarray(out.logits[:, -1])]
    for t in range(prompt, ids.shape[1]):
        out = step(model, out.cache, jnp.asarray(ids[:, t:t + 1]), jnp.full((2, 1), t), jnp.ones((2, 1), jnp.int32))
        logits.append(np.asarray(out.logits[:, -1]))
    np.testing.assert_allclose(np.stack(logits), np.stack(hf_logits), atol=1e-4)


def test_config_from_hf_converts_the_fixture_phi3_config_in_both_transformers_forms():
    hf4 = json.loads((FIXTURE / "config.json").read_text())["llm_config"]
    cfg = llm_config_from_hf(hf4)
    assert (cfg.family, cfg.fused_qkv, cfg.fused_gate_up, cfg.qkv_bias, cfg.tie_word_embeddings) == (
        "phi3", True, True, False, False)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (320, 64, 2, 4, 4)
    assert cfg.rope_scaling.type == "longrope"
    assert cfg.rope_scaling.short_factor == hf4["rope_scaling"]["short_factor"]
    assert cfg.rope_scaling.long_factor == hf4["rope_scaling"]["long_factor"]
    assert cfg.rope_scaling.original_max_position_embeddings == 256
    assert RotaryEmbedding.from_config(cfg).attention_factor == pytest.approx(
        math.sqrt(1 + math.log(8192 / 256) / math.log(256)))

    hf5 = transformers.Phi3Config(**hf4).to_dict()
    assert "rope_parameters" in hf5
    assert llm_config_from_hf(hf5).to_dict() == cfg.to_dict()


def test_decoder_reproduces_the_fixture_llm_logits_from_its_merged_embeddings():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    hf = json.loads((FIXTURE / "config.json").read_text())["llm_config"]
    cfg = llm_config_from_hf(hf)
    tensors = safetensors_numpy.load_file(str(FIXTURE / "model.safetensors"))
    source = DictSource({k: v for k, v in tensors.items() if k.startswith("llm.")})
    model, _ = load_pytorch(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), source,
                            LLM_TABLE.prefixed("llm.", ""))
    outputs = np.load(FIXTURE / "outputs.npz")
    mask = outputs["merged_attention_mask"]
    positions = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)
    out = model(inputs_embeds=jnp.asarray(outputs["inputs_embeds"]), positions=jnp.asarray(positions),
                attention_mask=jnp.asarray(mask))
    assert _max_error(out.logits, outputs["logits"], mask) < 1e-4


# Every LM-head layout the trainer can take: every position; the targets first with room for all of them;
# fewer slots than targets (the rest in chunks under a cond); chunked with and without slots; two groups.
HEAD_LAYOUTS = [HeadLayout(), HeadLayout(slots=40), HeadLayout(slots=8), HeadLayout(slots=8, chunk=3),
                HeadLayout(chunk=7), HeadLayout(groups=2, slots=6, chunk=4)]


@pytest.mark.parametrize("name", ["phi3", "llama-gqa"])
def test_loss_equals_transformers_causal_lm_loss_for_every_head_layout(name):
    hf_model, model, _ = _models(name)
    ids, mask = _right_padded_batch([20, 13, 17, 9], 20, seed=3)
    labels = np.where(mask > 0, ids, IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX  # a prompt, as in Med-2E3: only the answers are supervised
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        labels=torch.from_numpy(labels)).loss.item()
    hidden = _forward(model, ids, mask).hidden_states
    kernel = model.head_kernel()
    for layout in HEAD_LAYOUTS:
        total, count = jax.jit(lambda k, h, lay=layout: summed_token_loss(k, h, jnp.asarray(labels), lay))(kernel, hidden)
        assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
        np.testing.assert_allclose(float(total) / int(count), want, rtol=1e-5, err_msg=str(layout))
