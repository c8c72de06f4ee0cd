"""LoRA and QLoRA through qwix (med2e3_jax/lora.py): the start equals the base, merging is exact, and
adapters travel to and from peft in PyTorch with equal logits."""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches_for_tests import small_config
from flax import nnx

from med2e3_jax import lora
from med2e3_jax.checkpoint.importer import load_pytorch
from med2e3_jax.checkpoint.llm_port import LLM_TABLE, llm_config_from_hf
from med2e3_jax.checkpoint.port import CheckpointMismatchError, DictSource
from med2e3_jax.models.decoder import Decoder
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.random_batches import random_batch
from med2e3_jax.train.step import MODEL_INPUTS

try:  # the peft tests need PyTorch; the rest runs without it (the suite's Python 3.12 half)
    import peft
    import torch
    import transformers
except ImportError:
    peft = torch = transformers = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs torch and peft (the test extra)")

DECODER_MODULES = r"layers/\d+/(self_attn|mlp)/.*"


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _lora_cfg(**overrides):
    cfg = lora.lora_config()
    cfg.update(rank=4, alpha=8.0, **overrides)
    return cfg


def _randomize_adapters(model, seed):
    """Gives `b` (zero at the start) and `a` random values, so that the adapters change the output."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))


def _med2e3():
    config = small_config("finetune")
    batch = random_batch(config, 2, seed=3)
    inputs = tuple(jnp.asarray(batch[k]) for k in MODEL_INPUTS)
    return config, Med2E3(config.model, rngs=nnx.Rngs(0)), inputs


def test_at_the_start_the_lora_model_is_its_base_to_the_bit():
    config, model, inputs = _med2e3()
    base = model(*inputs)
    adapted = lora.apply_lora(model, _lora_cfg(), *lora.example_inputs(config.model))
    out = adapted(*inputs)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(base.logits))
    assert float(out.loss) == float(base.loss)
    modules = ["/".join(map(str, p)) for p in lora.lora_paths(adapted)]
    assert modules == ["llm/layers/0/mlp/down_proj", "llm/layers/0/mlp/gate_up_proj", "llm/layers/0/self_attn/o_proj",
                       "llm/layers/0/self_attn/qkv_proj"]


def test_adapters_carry_their_kernels_logical_axes():
    config, model, _ = _med2e3()
    adapted = lora.apply_lora(model, _lora_cfg(), *lora.example_inputs(config.model))
    qkv = adapted.llm.layers[0].self_attn.qkv_proj
    kernel_axes = qkv.kernel.get_metadata()["out_sharding"]
    assert qkv.kernel_lora_a.get_metadata()["out_sharding"] == (kernel_axes[0], None)
    assert qkv.kernel_lora_b.get_metadata()["out_sharding"] == (None, kernel_axes[1])


def test_merged_weights_give_the_logits_of_base_plus_adapters():
    config, model, inputs = _med2e3()
    adapted = lora.apply_lora(model, _lora_cfg(), *lora.example_inputs(config.model))
    _randomize_adapters(adapted, 1)
    with_adapters = np.asarray(adapted(*inputs).logits)
    merged = lora.merge_lora(adapted, _lora_cfg(), Med2E3(config.model, rngs=nnx.Rngs(9)))
    assert not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(np.asarray(merged(*inputs).logits), with_adapters, rtol=1e-5, atol=1e-5)
    assert np.abs(with_adapters - np.asarray(model(*inputs).logits)).max() > 1e-3  # the adapters matter


def test_a_module_path_that_matches_nothing_is_refused():
    config, model, _ = _med2e3()
    with pytest.raises(ValueError, match="matches no matmul"):
        lora.apply_lora(model, _lora_cfg(module_path="llm/nothing_here/.*"), *lora.example_inputs(config.model))


@pytest.mark.parametrize("qtype, bound", [("int8", 0.05), ("nf4", 0.5)])
def test_a_quantized_base_stays_near_the_float_one(qtype, bound):
    config, model, inputs = _med2e3()
    base = np.asarray(model(*inputs).logits)
    quantized = lora.apply_lora(model, _lora_cfg(base_qtype=qtype), *lora.example_inputs(config.model))
    logits = np.asarray(quantized(*inputs).logits)
    error = np.abs(logits - base).max() / np.abs(base).max()
    assert 0 < error < bound, f"{qtype}: relative logit error {error:.4f}"
    abstract = nnx.eval_shape(lambda: Med2E3(config.model, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="quantized and the base given to merge into holds no float weights"):
        lora.merge_lora(quantized, _lora_cfg(base_qtype=qtype), abstract)
    # Into the float base, the quantized LoRA model's adapters merge as into the float weights.
    _randomize_adapters(quantized, 3)
    merged = lora.merge_lora(quantized, _lora_cfg(base_qtype=qtype), copy.deepcopy(model))
    expected = lora.merge_lora(_with_adapters_of(quantized, model, config), _lora_cfg(),
                               Med2E3(config.model, rngs=nnx.Rngs(5)))
    np.testing.assert_array_equal(np.asarray(merged(*inputs).logits), np.asarray(expected(*inputs).logits))


def _with_adapters_of(quantized, float_model, config):
    """`float_model` with float adapters holding the values of `quantized`'s."""
    adapted = lora.apply_lora(copy.deepcopy(float_model), _lora_cfg(), *lora.example_inputs(config.model))
    nnx.update(adapted, nnx.state(quantized, nnx.LoRAParam))
    return adapted


# peft on a tiny transformers LLM.


def _hf_llm(name, seed=0):
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if name == "phi3":
        hf_config = transformers.Phi3Config(**common, num_key_value_heads=4, max_position_embeddings=64)
        targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    else:
        hf_config = transformers.LlamaConfig(**common, num_key_value_heads=2)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf_model = getattr(transformers, f"{type(hf_config).__name__[:-6]}ForCausalLM")(hf_config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape) / math.sqrt(param.shape[-1]))
    cfg = llm_config_from_hf(hf_config.to_dict())
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    ours, _ = load_pytorch(abstract, DictSource({k: v.numpy() for k, v in hf_model.state_dict().items()}), LLM_TABLE)
    return hf_model, ours, targets


def _ids(seed=4, shape=(2, 12)):
    return np.random.default_rng(seed).integers(3, 128, size=shape)


def _our_logits(model, ids):
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    out = model(jnp.asarray(ids), positions=jnp.asarray(positions), attention_mask=jnp.ones(ids.shape, jnp.int32))
    return np.asarray(out.logits if hasattr(out, "logits") else out)


def _decoder_lora(model, lora_cfg):
    ids = jnp.zeros((1, 4), jnp.int32)
    return lora.apply_lora(model, lora_cfg, ids, positions=jnp.zeros((1, 4), jnp.int32),
                           attention_mask=jnp.ones((1, 4), jnp.int32))


@needs_peft
@pytest.mark.parametrize("name", ["phi3", "llama"])
def test_exported_adapters_load_in_peft_and_give_our_logits(name, tmp_path):
    hf_model, ours, targets = _hf_llm(name)
    lora_cfg = _lora_cfg(module_path=DECODER_MODULES)
    adapted = _decoder_lora(ours, lora_cfg)
    _randomize_adapters(adapted, 2)
    lora.export_peft(adapted, lora_cfg, tmp_path / "adapter", LLM_TABLE)
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    ids = _ids()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_our_logits(adapted, ids), theirs, rtol=1e-4, atol=1e-4)
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(targets)


@needs_peft
@pytest.mark.parametrize("name", ["phi3", "llama"])
def test_adapters_made_by_peft_import_with_equal_logits(name, tmp_path):
    hf_model, ours, targets = _hf_llm(name, seed=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), config).eval()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    adapted = _decoder_lora(ours, _lora_cfg(module_path=DECODER_MODULES))
    lora.import_peft(adapted, tmp_path / "theirs", LLM_TABLE)
    ids = _ids(seed=5)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_our_logits(adapted, ids), theirs, rtol=1e-4, atol=1e-4)


@needs_peft
def test_an_adapter_of_another_rank_or_module_set_fails_naming_the_key_and_shapes(tmp_path):
    hf_model, ours, targets = _hf_llm("phi3")
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(hf_model), config).save_pretrained(str(tmp_path / "rank8"))
    adapted = _decoder_lora(ours, _lora_cfg(module_path=DECODER_MODULES))
    with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.mlp\.down_proj\.lora_A\.weight has shape \(8, 48\); "
                                                       r"the model's adapter is \(4, 48\)"):
        lora.import_peft(adapted, tmp_path / "rank8", LLM_TABLE)
    fewer = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(hf_model), fewer).save_pretrained(str(tmp_path / "fewer"))
    with pytest.raises(CheckpointMismatchError, match=r"missing \['base_model\.model\.model\.layers\.0\.mlp\.down_proj"):
        lora.import_peft(adapted, tmp_path / "fewer", LLM_TABLE)
