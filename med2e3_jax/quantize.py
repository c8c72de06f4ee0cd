"""Inference with a quantized base: the kernels of chosen `nnx.Linear`s stored as int8 or nf4 through qwix.

    model = restore_params(checkpoint)                            # float weights
    model = quantize_weights(model, quantize_config(qtype="nf4"))  # the LLM's projections in 4 bits
    weight_memory(model)                                          # bytes stored, before and after

qwix's post-training quantization (`qwix.PtqProvider`, weight-only: activations stay in the compute
dtype) intercepts the matmuls of the method `qwix.quantize_model` wraps, and only of that one method.
Generation calls the model's parts (`encode_vision`, the decoder's prefill and decode steps, the LM head)
rather than `Med2E3.__call__`, so the wrapped method here is each matched Linear's own `__call__`: every
code path that reaches the layer multiplies by the quantized kernel, whichever model method called it.

Each kernel (in, out) becomes a `QArray` (values int8 or uint4 nf4 codes, float32 scales), with a scale
per output channel and, when `tile_size` is set, per `tile_size` rows of the input (bitsandbytes' 4-bit
block of 64 by default for nf4). The matmul dequantizes the kernel to the compute dtype and multiplies in
it (XLA fuses the two): the saving is weight memory and the bandwidth of reading it, not FLOPs.

The embedding table and the LM head stay in their float dtype unless `module_path` names them
(bitsandbytes keeps `lm_head` in float too); a quantized `llm/lm_head` serves generation but not the
training loss, which reads the kernel itself (`Decoder.head_kernel`).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

logger = logging.getLogger(__name__)

QTYPES = ("int8", "nf4")
# The LLM's attention and MLP projections: 3.6 of the released model's 4.3 B parameters.
LLM_PROJECTIONS = r"llm/layers/\d+/(self_attn|mlp)/.*"
# Rows of the kernel sharing one scale: bitsandbytes' 4-bit block; int8 scales each output channel whole.
DEFAULT_TILE = {"nf4": 64, "int8": 0}
_FOUR_BIT = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def quantize_config(**overrides) -> ml_collections.ConfigDict:
    """How `med2e3-generate` and `med2e3-evaluate` load the base (`--config.quantize.*` in evaluate)."""
    cfg = ml_collections.ConfigDict(dict(
        qtype="",  # '' (the weights as stored), 'int8' or 'nf4'
        module_path=LLM_PROJECTIONS,  # regex on module paths such as 'llm/layers/0/mlp/down_proj'
        tile_size=-1,  # input rows per scale; 0: one scale per output channel; -1: the qtype's default
    ))
    cfg.update(overrides)
    return cfg


def check_quantize_config(cfg) -> None:
    if cfg.qtype not in ("", *QTYPES):
        raise ValueError(f"quantize.qtype must be '' or one of {QTYPES}, got {cfg.qtype!r}")
    if int(cfg.tile_size) < -1:
        raise ValueError(f"quantize.tile_size must be -1 (the qtype's default), 0 (per channel) or a row count, "
                         f"got {cfg.tile_size}")
    try:
        re.compile(cfg.module_path)
    except re.error as error:
        raise ValueError(f"quantize.module_path {cfg.module_path!r} is not a regular expression: {error}") from None


def tile_size(cfg) -> int | None:
    """The kernel rows per scale for `cfg` (None: a scale per output channel)."""
    size = int(cfg.tile_size)
    if size < 0:
        size = DEFAULT_TILE[cfg.qtype]
    return size or None


def module_name(path) -> str:
    return "/".join(map(str, path))


def quantizable_modules(model: nnx.Module, module_path: str) -> list[tuple]:
    """The paths of the `nnx.Linear`s whose path (`llm/layers/0/mlp/down_proj`) matches `module_path`
    whole, in model order."""
    pattern = re.compile(module_path)
    return [path for path, module in nnx.iter_modules(model)
            if isinstance(module, nnx.Linear) and pattern.fullmatch(module_name(path))]


def quantize_weights(model: nnx.Module, cfg) -> nnx.Module:
    """`model` with the kernels of the Linears `cfg.module_path` names quantized to `cfg.qtype`: a new
    object sharing every other weight with `model` (drop `model` to free the float kernels). With an empty
    `qtype`, `model` itself.

    Raises:
      ValueError: an unknown qtype, or a `module_path` that matches no Linear (with examples of paths).
    """
    import qwix

    check_quantize_config(cfg)
    if not cfg.qtype:
        return model
    paths = quantizable_modules(model, cfg.module_path)
    if not paths:
        linears = [module_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
        raise ValueError(f"quantize.module_path {cfg.module_path!r} matches no nnx.Linear of the model; its "
                         f"Linears are e.g. {linears[:3]}")
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=cfg.qtype, tile_size=tile_size(cfg))
    provider = qwix.PtqProvider([rule])
    model = nnx.clone(model)
    for path in paths:
        linear = _child(model, path)
        _check_tiles(linear, path, rule.tile_size)
        # qwix replaces the kernel during one call of the method it wraps; the input only has to have
        # the kernel's input width.
        example = jnp.zeros((1, linear.in_features), linear.dtype or linear.param_dtype)
        _set_child(model, path, qwix.quantize_model(linear, provider, example))
    memory = weight_memory(model)
    logger.info("quantized %d Linear kernels to %s (%s): weights %.1f MiB, of which quantized %.1f MiB "
                "(%.1f MiB before)", len(paths), cfg.qtype, cfg.module_path, memory.total_bytes / 2**20,
                memory.quantized_bytes / 2**20, memory.quantized_float_bytes / 2**20)
    return model


def _check_tiles(linear: nnx.Linear, path, size: int | None) -> None:
    if size and linear.in_features % size:
        raise ValueError(f"{module_name(path)}: kernel ({linear.in_features}, {linear.out_features}) has "
                         f"{linear.in_features} input rows, not a multiple of quantize.tile_size={size}; set "
                         f"tile_size to a divisor or 0 (a scale per output channel)")


def _child(model, path):
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def _set_child(model, path, value) -> None:
    parent = _child(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def quantized_kernels(model: nnx.Module) -> dict[str, object]:
    """{module path: its kernel's qwix QArray} for the quantized Linears of `model`."""
    import qwix

    out = {}
    for path, module in nnx.iter_modules(model):
        kernel = getattr(module, "kernel", None) if isinstance(module, nnx.Linear) else None
        array = getattr(kernel, "array", None)
        if isinstance(array, qwix.QArray):
            out[module_name(path)] = array
    return out


def dequantized_kernel(qarray) -> jax.Array:
    """The float kernel a QArray stands for: what the quantized matmul multiplies by."""
    import qwix

    return qwix.dequantize(qarray)


@dataclasses.dataclass(frozen=True)
class WeightMemory:
    """Bytes of a model's parameters as stored: 4-bit values counted at half a byte, packed two to a
    byte as GPUs and TPUs hold them (jax's `nbytes` counts a byte for each on the CPU).

    total_bytes: every parameter.
    quantized_bytes: the quantized kernels, values and scales.
    quantized_float_bytes: those kernels at the float dtype of the model's other kernels.
    quantized_modules: how many kernels are quantized.
    """

    total_bytes: int
    quantized_bytes: int
    quantized_float_bytes: int
    quantized_modules: int

    @property
    def float_total_bytes(self) -> int:
        """total_bytes with the quantized kernels back at their float size."""
        return self.total_bytes - self.quantized_bytes + self.quantized_float_bytes


def _stored_bytes(leaf) -> int:
    dtype = jnp.dtype(leaf.dtype)
    bits = 4 if dtype in _FOUR_BIT else 8 * dtype.itemsize
    return -(-int(np.prod(leaf.shape, dtype=np.int64)) * bits // 8)


def weight_memory(model: nnx.Module) -> WeightMemory:
    """The `WeightMemory` of `model`'s parameters (concrete or abstract, e.g. from `nnx.eval_shape`)."""
    total = sum(_stored_bytes(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    quantized = float_equivalent = modules = 0
    for _, module in nnx.iter_modules(model):
        array = getattr(getattr(module, "kernel", None), "array", None) if isinstance(module, nnx.Linear) else None
        if array is None:
            continue
        modules += 1
        quantized += sum(_stored_bytes(leaf) for leaf in jax.tree.leaves(array))
        float_equivalent += module.in_features * module.out_features * jnp.dtype(module.param_dtype).itemsize
    return WeightMemory(total, quantized, float_equivalent, modules)
