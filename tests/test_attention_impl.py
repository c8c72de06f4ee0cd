"""`model.attention_impl`: `cudnn` falls back to XLA's attention where cuDNN rejects the call (here:
no cuDNN on CPU), with one warning per shape, and gives the same numbers; unknown names are refused."""

import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from batches_for_tests import small_config  # noqa: E402

from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax import sharding  # noqa: E402
from med2e3_jax.models import attention  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402
from med2e3_jax.random_batches import random_batch  # noqa: E402

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def _qkv(dtype, *, batch=2, length=16, heads=4, kv_heads=2, head_dim=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    key = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    value = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    return query, key, value


def _reference(query, key, value, mask):
    """Softmax attention written out in numpy (float64), grouped-query heads repeated."""
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_request_falls_back_to_xla_with_one_warning_naming_the_shape(dtype, masked, caplog):
    query, key, value = _qkv(dtype, seed=int(masked))
    length = query.shape[1]
    mask = attention.causal_mask(*(jnp.broadcast_to(jnp.arange(length), (2, length)),) * 2,
                                 jnp.ones((2, length), bool)) if masked else None
    attention._warned.clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        cudnn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, implementation="cudnn"))
        out = cudnn(query, key, value)
        jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, implementation="cudnn") * 1)(
            query, key, value)  # the same shape traced again: no second warning
    xla = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, implementation="xla"))(
        query, key, value)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(xla, np.float32))
    expected = _reference(query.astype(jnp.float32), key.astype(jnp.float32), value.astype(jnp.float32),
                          np.ones((1, 1, 1, 1), bool) if mask is None else np.asarray(mask))
    tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=tolerance, rtol=tolerance)
    warnings = [r.getMessage() for r in caplog.records if "cuDNN rejected" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert str(tuple(query.shape)) in warnings[0] and jnp.dtype(dtype).name in warnings[0]


def test_a_model_asking_for_cudnn_computes_what_xla_computes():
    config = small_config()
    batch = random_batch(config, 2)
    outputs = {}
    for impl in ("xla", "cudnn"):
        config.model.attention_impl = impl
        model = Med2E3(config.model, rngs=nnx.Rngs(0))
        outputs[impl] = model(batch["volume"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                              batch["question_ids"], batch["question_mask"])
    np.testing.assert_array_equal(outputs["cudnn"].logits, outputs["xla"].logits)
    np.testing.assert_array_equal(outputs["cudnn"].loss, outputs["xla"].loss)


def test_unknown_implementations_are_refused_naming_the_options():
    query, key, value = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"one of \('xla', 'cudnn'\), got 'flash'"):
        attention.dot_product_attention(query, key, value, implementation="flash")
    model_cfg = small_config().model
    model_cfg.attention_impl = "flash"
    with pytest.raises(ValueError, match=r"attention_impl must be one of \('xla', 'cudnn'\), got 'flash'"):
        config_lib.validate_model_config(model_cfg)


@needs_8_devices
def test_attention_pins_batch_and_heads_to_the_mesh_and_cudnn_leaves_split_heads_to_xla(caplog):
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    query, key, value = (jax.device_put(x, NamedSharding(mesh, P())) for x in _qkv(jnp.bfloat16, batch=4))
    attention._warned.clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cudnn"))(
            query, key, value)
    # Replicated inputs, yet the output is split by batch (fsdp) and heads (tensor): the layout pinned.
    assert out.sharding.spec == P("fsdp", None, "tensor")
    assert any("tensor axis" in r.getMessage() for r in caplog.records)
    expected = _reference(*(np.asarray(x, np.float32) for x in (query, key, value)), np.ones((1, 1, 1, 1), bool))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=5e-2, rtol=5e-2)


def test_constrain_leaves_arrays_off_a_mesh_alone():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("batch", "embed")) is x
