"""Quantized inference (med2e3_jax/quantize.py): int8 and nf4 kernels through qwix, used by every code
path of generation, within a stated bound of float32, and the memory they take."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from data_pipelines.image_placeholder import IMAGE3D_TOKEN_ID, expand_image_placeholder  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax import quantize as Q  # noqa: E402
from med2e3_jax.generate import GenerationConfig, generate_tokens  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402

VOCAB = 96
# The NF4 code book (QLoRA, appendix E): the widest gap between two codes, halved, bounds the rounding
# of a value already scaled into [-1, 1].
NF4_CODES = np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                      0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
NF4_HALF_GAP = float(np.max(np.diff(NF4_CODES))) / 2
# The bounds this file pins on the random tiny model (docs/generation_evaluation.md): the largest logit
# change against the largest float32 logit.
LOGIT_BOUND = {"int8": 0.02, "nf4": 0.25}


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def med2e3():
    """A random tiny Med-2E3 (vocabulary of 96), a prompt batch of two rows of different lengths."""
    cfg = tiny.tiny_model()
    cfg.llm.vocab_size = VOCAB
    model = nnx.jit(lambda: Med2E3(cfg, rngs=nnx.Rngs(0)))()
    rng = np.random.default_rng(0)
    volume = rng.uniform(size=(2, 1, *cfg.vision3d.img_size)).astype(np.float32)
    ids = np.array([[1, 5, IMAGE3D_TOKEN_ID, 7, 8, 9, 10, 11], [1, IMAGE3D_TOKEN_ID, 4, 5, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int32)
    prompts = expand_image_placeholder(ids, mask, None, num_vision_tokens=config_lib.num_vision_tokens(cfg),
                                       max_length=cfg.llm_max_length, pad_id=0)
    questions = np.array([[101, 7, 8, 102], [101, 9, 102, 0]])
    return model, (volume, prompts.input_ids, prompts.attention_mask, questions, (questions > 0).astype(np.int32))


def _quantized(model, qtype, **overrides):
    return Q.quantize_weights(model, Q.quantize_config(qtype=qtype, **overrides))


def _float_kernels(model):
    return {Q.module_name(path): np.asarray(m.kernel.get_value()) for path, m in nnx.iter_modules(model)
            if isinstance(m, nnx.Linear)}


def _with_dequantized_kernels(model, quantized):
    """`model` (float) with each kernel replaced by what its quantized counterpart multiplies by."""
    model = nnx.clone(model)
    for name, qarray in Q.quantized_kernels(quantized).items():
        linear = model
        for key in name.split("/"):
            linear = linear[int(key)] if key.isdigit() else getattr(linear, key)
        linear.kernel.set_value(Q.dequantized_kernel(qarray).astype(linear.kernel.get_value().dtype))
    return model


_forward = nnx.jit(lambda model, volume, ids, mask, q, qm: model(volume, ids, mask, None, q, qm).logits)
_generate = nnx.jit(generate_tokens, static_argnames="config")


def test_the_llm_projections_are_quantized_and_nothing_else(med2e3):
    model, _ = med2e3
    quantized = _quantized(model, "int8")
    names = sorted(Q.quantized_kernels(quantized))
    assert names == sorted(f"llm/layers/{i}/{m}" for i in range(2) for m in
                           ("self_attn/qkv_proj", "self_attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj"))
    # The float model is untouched: quantize_weights returns a new object.
    assert not Q.quantized_kernels(model)
    assert isinstance(quantized.llm.lm_head.kernel.get_value(), jax.Array)


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_each_quantized_kernel_is_within_half_a_step_of_the_float_kernel(med2e3, qtype):
    model, _ = med2e3
    quantized = _quantized(model, qtype)
    floats = _float_kernels(model)
    for name, qarray in Q.quantized_kernels(quantized).items():
        w = floats[name].astype(np.float64)
        got = np.asarray(Q.dequantized_kernel(qarray), np.float64)
        rows, cols = w.shape
        if qtype == "int8":
            assert qarray.qvalue.dtype == jnp.int8
            # Symmetric absmax over each output channel: 255 steps span [-absmax, absmax].
            step = np.abs(w).max(axis=0, keepdims=True) / 127.5
            bound = np.broadcast_to(step / 2, w.shape)
        else:
            assert qarray.qvalue.dtype == jnp.uint4
            # 64 input rows share a scale: the tile's absmax maps to the code 1.
            absmax = np.abs(w.reshape(rows // 64, 64, cols)).max(axis=1, keepdims=True)
            bound = np.broadcast_to(absmax * NF4_HALF_GAP, (rows // 64, 64, cols)).reshape(rows, cols)
        error = np.abs(got - w)
        assert np.all(error <= bound * (1 + 1e-4)), name  # float32 rounding of w / scale
        assert error.max() > 0, name  # really rounded


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_quantized_logits_are_those_of_the_rounded_kernels_and_within_the_stated_bound(med2e3, qtype):
    model, inputs = med2e3
    quantized = _quantized(model, qtype)
    got = np.asarray(_forward(quantized, *inputs))
    # The matmuls multiply by the quantized kernels (dequantized in the compute dtype), nothing else.
    rounded = _forward(_with_dequantized_kernels(model, quantized), *inputs)
    np.testing.assert_allclose(got, np.asarray(rounded), rtol=1e-5, atol=1e-6)
    reference = np.asarray(_forward(model, *inputs))
    change = np.abs(got - reference).max() / np.abs(reference).max()
    assert 0 < change <= LOGIT_BOUND[qtype], change


def test_generation_runs_every_step_on_the_quantized_kernels(med2e3):
    # Prefill, decode steps and the LM head are called outside Med2E3.__call__: the tokens and scores
    # equal those of a float model holding the dequantized kernels.
    model, inputs = med2e3
    quantized = _quantized(model, "nf4")
    config = GenerationConfig(max_new_tokens=6)
    got = _generate(quantized, *inputs, config=config)
    expected = _generate(_with_dequantized_kernels(model, quantized), *inputs, config=config)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(expected.scores), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.slice_scores), np.asarray(expected.slice_scores))


def test_weight_memory_counts_values_and_scales(med2e3):
    model, _ = med2e3
    shapes = [k.shape for name, k in _float_kernels(model).items() if name.startswith("llm/layers/")]
    float_bytes = sum(4 * r * c for r, c in shapes)
    total = sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expected = {"int8": sum(r * c + 4 * c for r, c in shapes),  # int8 values, a float32 scale per column
                "nf4": sum(r * c // 2 + 4 * (r // 64) * c for r, c in shapes)}  # 4 bits, a scale per 64 rows
    assert Q.weight_memory(model).total_bytes == total
    for qtype, quantized_bytes in expected.items():
        memory = Q.weight_memory(_quantized(model, qtype))
        assert memory.quantized_modules == len(shapes) == 8
        assert memory.quantized_bytes == quantized_bytes
        assert memory.quantized_float_bytes == float_bytes
        assert memory.total_bytes == total - float_bytes + quantized_bytes
        assert memory.float_total_bytes == total


def test_bad_quantization_settings_name_the_key_and_what_was_expected(med2e3):
    model, _ = med2e3
    with pytest.raises(ValueError, match="quantize.qtype must be '' or one of .*'int4'"):
        _quantized(model, "int4")
    with pytest.raises(ValueError, match=r"quantize.module_path 'vision9/.\*' matches no nnx.Linear.*llm/"):
        _quantized(model, "int8", module_path="vision9/.*")
    with pytest.raises(ValueError, match=r"llm/layers/0/mlp/down_proj: kernel \(128, 64\) has 128 input rows.*tile_size=48"):
        _quantized(model, "nf4", tile_size=48)
    assert Q.quantize_weights(model, Q.quantize_config()) is model  # no qtype: the model as loaded


def test_quantized_evaluation_runs_end_to_end_on_phantoms(tmp_path, med2e3):
    from assets_for_tests import fetched

    from data_pipelines import synthetic
    from data_pipelines.templates import load_tokenizer
    from med2e3_jax.checkpoint.orbax_params import save_params
    from med2e3_jax.cli.evaluate import Predictor, eval_config, load_model
    from med2e3_jax.evaluation import evaluate, load_task_records

    tokenizer, question_tokenizer = (load_tokenizer(fetched(name)) for name in ("tokenizers/phi3", "minilm"))
    synthetic.generate(tmp_path / "data", num=2, seed=0, shape=(32, 64, 64), formats=("npy",))
    save_params(Med2E3(tiny.tiny_model(), rngs=nnx.Rngs(0)), tmp_path / "model")
    config = eval_config()
    config.update(checkpoint=str(tmp_path / "model"), image_root=str(tmp_path / "data"), batch_size=2,
                  max_new_tokens=3, question_max_length=16, progress=False)
    config.quantize.qtype = "nf4"
    model = load_model(config)
    assert len(Q.quantized_kernels(model)) == 8
    # Two phantoms all fall in the training split.
    records = load_task_records(tmp_path / "data" / "annotations" / "npy" / "vqa_closed_train.json",
                                image_root=config.image_root, limit=4)
    summary = evaluate("m3d_vqa_closed", records, Predictor(model, config, tokenizer, question_tokenizer),
                       tmp_path / "eval", batch_size=2, progress=False)
    assert summary["overall"]["count"] == len(records) == 4
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert all(len(p["slice_scores"]) == 32 for p in predictions)

    config.quantize.qtype = "int3"
    with pytest.raises(app.UsageError, match="--config.quantize.qtype"):
        load_model(config)
