"""LoRA and QLoRA on Med-2E3 through qwix; merging the adapters into the base; adapters in peft's format.

qwix intercepts the matmuls of the modules whose path matches `module_path` and adds
`x @ a @ b * alpha / rank` beside each weight `w` (`a`: (in, rank), `b`: (rank, out), `nnx.LoRAParam`s
next to the kernel; `b` starts at zero, so the model starts as its base). With `base_qtype` the base
weights of those modules are also quantized (`nf4`, `int8`: QLoRA). The adapters inherit the logical
axes of their kernel's dimensions (`a` its input's, `b` its output's), so the sharding rules place
them with their base weights.

peft names the same adapter `<module>.lora_A.weight` (rank, in) and `<module>.lora_B.weight` (out, rank)
under `base_model.model.`, with the same scaling (`lora_alpha / r`); the port tables give the module
names of the authors' tree.

    lora_cfg = lora_config()                          # rank 16, alpha 32, the LLM's attention and MLP
    model = apply_lora(model, lora_cfg, *example_inputs(model.cfg))
    merged = merge_lora(model, lora_cfg, Med2E3(cfg, rngs=nnx.Rngs(0)))   # adapters folded in, float32
    export_peft(model, lora_cfg, "adapter/", FULL_TABLE)   # adapter_config.json, adapter_model.safetensors
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from med2e3_jax.checkpoint.port import CheckpointMismatchError, PortTable

LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"
BASE_QTYPES = ("", "nf4", "int8")
PEFT_PREFIX = "base_model.model."
LORA_STAGES = ("finetune_lora",)


def lora_config() -> ml_collections.ConfigDict:
    """`train.lora`: the adapters of the `finetune_lora` stage."""
    return ml_collections.ConfigDict(dict(
        rank=16,
        alpha=32.0,
        dropout=0.0,  # qwix applies it at every call, evaluation included: merge before evaluating
        # Regex on the module path: the LLM's attention and MLP projections. Add SigLIP's with e.g.
        # r"(llm/layers/\d+/(self_attn|mlp)|vision2d/encoder/layers/\d+/(self_attn|mlp))/.*".
        module_path=r"llm/layers/\d+/(self_attn|mlp)/.*",
        base_qtype="",  # '' (the base as loaded), 'nf4' or 'int8' (QLoRA)
        seed=0,  # the adapters' `a` initialisation
    ))


def check_lora_config(lora_cfg) -> None:
    if int(lora_cfg.rank) < 1:
        raise ValueError(f"train.lora.rank must be >= 1, got {lora_cfg.rank}")
    if lora_cfg.base_qtype not in BASE_QTYPES:
        raise ValueError(f"train.lora.base_qtype must be one of {BASE_QTYPES}, got {lora_cfg.base_qtype!r}")
    if not 0.0 <= float(lora_cfg.dropout) < 1.0:
        raise ValueError(f"train.lora.dropout must be in [0, 1), got {lora_cfg.dropout}")


def lora_provider(lora_cfg):
    import qwix

    check_lora_config(lora_cfg)
    rule = qwix.LoraRule(module_path=lora_cfg.module_path, rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                         dropout=float(lora_cfg.dropout), weight_qtype=lora_cfg.base_qtype or None)
    return qwix.LoraProvider([rule])


def example_inputs(model_cfg) -> tuple[jax.Array, ...]:
    """One row of zeros at the model's shapes, (volume, input_ids, attention_mask, labels, question_ids,
    question_mask): what qwix runs the model on to find the matmuls."""
    from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID
    from med2e3_jax.config import num_vision_tokens

    length = int(model_cfg.llm_max_length)
    ids = np.zeros((1, length), np.int32)
    ids[0, 1:1 + num_vision_tokens(model_cfg)] = IMAGE3D_TOKEN_ID
    question = int(model_cfg.question_encoder.max_position_embeddings) if "question_encoder" in model_cfg else 1
    return (jnp.zeros((1, 1, *model_cfg.vision3d.img_size), jnp.float32), jnp.asarray(ids),
            jnp.ones((1, length), jnp.int32), jnp.full((1, length), IGNORE_INDEX, jnp.int32),
            jnp.zeros((1, min(question, 16)), jnp.int32), jnp.ones((1, min(question, 16)), jnp.int32))


def apply_lora(model: nnx.Module, lora_cfg, *inputs, **kw_inputs) -> nnx.Module:
    """`model` with adapters, the matmuls found by running `model(*inputs, **kw_inputs)` once, and with
    `base_qtype` the matched base weights quantized: a new object, sharing its other weights with `model`.

    Raises:
      ValueError: no module path matches `lora_cfg.module_path`.
    """
    import qwix

    lora = qwix.apply_lora_to_model(model, lora_provider(lora_cfg), *inputs, rngs=nnx.Rngs(int(lora_cfg.seed)),
                                    **kw_inputs)
    if not lora_paths(lora):
        raise ValueError(f"train.lora.module_path {lora_cfg.module_path!r} matches no matmul of the model; "
                         f"module paths look like 'llm/layers/0/self_attn/qkv_proj'")
    return lora


def lora_paths(model: nnx.Module) -> list[tuple]:
    """The paths of the modules that carry adapters, in order."""
    return sorted({path[:-1] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}, key=str)


def _scale(lora_cfg) -> float:
    return float(lora_cfg.alpha) / float(lora_cfg.rank)


def merge_lora(lora_model: nnx.Module, lora_cfg, base: nnx.Module) -> nnx.Module:
    """`base` (the same model without adapters) given the parameters of `lora_model`, each adapted kernel
    `w + a @ b * alpha / rank`, computed in float32.

    Where `lora_model`'s base weights are quantized (`base_qtype`), `w` is `base`'s own kernel, which must
    then hold the float weights (e.g. the base checkpoint loaded again): merging into the quantized
    weights would bake their rounding into the result.

    Raises:
      ValueError: a quantized module whose kernel `base` does not hold concretely.
    """
    flat = dict(nnx.to_flat_state(nnx.state(lora_model, nnx.Param)))
    target = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    values = {path: flat[path].get_value() for path in target if path in flat}
    for module in lora_paths(lora_model):
        path = (*module, "kernel")
        w = values.get(path)
        if w is None:  # qwix replaced the kernel by a quantized array
            w = target[path].get_value()
            if not isinstance(w, jax.Array):
                raise ValueError(f"{'/'.join(map(str, module))}: the LoRA model's kernel is quantized and the "
                                 f"base given to merge into holds no float weights for it (load them first)")
        a, b = flat[(*module, LORA_A)].get_value(), flat[(*module, LORA_B)].get_value()
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        values[path] = (w.astype(jnp.float32) + delta * _scale(lora_cfg)).astype(w.dtype)
    missing = sorted("/".join(map(str, p)) for p in target if p not in values)
    if missing:
        raise ValueError(f"the base has parameters the LoRA model lacks: {missing[:5]}")
    state = nnx.state(base, nnx.Param)
    nnx.replace_by_pure_dict(state, _nested(values))
    nnx.update(base, state)
    return base


def _nested(flat: Mapping[tuple, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _torch_module(table: PortTable, module: tuple) -> str:
    found = table.source_for(".".join(map(str, (*module, "kernel"))))
    if found is None or not found[0].endswith(".weight"):
        raise CheckpointMismatchError(f"no port rule names the torch module of {'/'.join(map(str, module))}")
    return found[0][: -len(".weight")]


def peft_tensors(lora_model: nnx.Module, table: PortTable) -> dict[str, np.ndarray]:
    """The adapters under peft's keys, in torch layout: lora_A (rank, in), lora_B (out, rank)."""
    flat = dict(nnx.to_flat_state(nnx.state(lora_model, nnx.LoRAParam)))
    tensors = {}
    for module in lora_paths(lora_model):
        name = PEFT_PREFIX + _torch_module(table, module)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(flat[(*module, LORA_A)].get_value()).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(flat[(*module, LORA_B)].get_value()).T)
    return tensors


def export_peft(lora_model: nnx.Module, lora_cfg, out_dir: str | os.PathLike, table: PortTable, *,
                base_model_name_or_path: str = "") -> pathlib.Path:
    """Writes `adapter_config.json` and `adapter_model.safetensors` (float32) as peft's `save_pretrained`
    does, loadable with `peft.PeftModel.from_pretrained(base, out_dir)` on the authors' model."""
    from safetensors.numpy import save_file

    tensors = peft_tensors(lora_model, table)
    modules = sorted({key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for key in tensors})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha),
                  lora_dropout=float(lora_cfg.dropout), target_modules=modules, bias="none", fan_in_fan_out=False,
                  use_rslora=False, init_lora_weights=True, inference_mode=True,
                  base_model_name_or_path=base_model_name_or_path or None)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def read_peft_config(adapter_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (a peft adapter folder holds it)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise CheckpointMismatchError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters import")
    for key, unsupported in (("use_rslora", True), ("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) == unsupported:
            raise CheckpointMismatchError(f"{path}: {key}={unsupported} is not supported")
    return config


def lora_config_from_peft(adapter_dir: str | os.PathLike, table: PortTable) -> ml_collections.ConfigDict:
    """`train.lora` for a peft adapter folder: its rank, alpha and dropout, and a `module_path` naming
    exactly the modules its tensors adapt (through `table`, from the authors' module names to ours).

    Raises:
      CheckpointMismatchError: an adapted module no port rule maps (naming it).
    """
    from safetensors import safe_open

    peft_config = read_peft_config(adapter_dir)
    weights = pathlib.Path(adapter_dir) / "adapter_model.safetensors"
    with safe_open(str(weights), "np") as f:
        keys = list(f.keys())
    modules = set()
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight").rsplit(".lora_", 1)[0]
        found = table.target_for(f"{name}.weight")
        if found is None or not found[0].endswith(".kernel"):
            raise CheckpointMismatchError(f"{weights}: {key} adapts {name!r}, which no port rule maps to a kernel")
        modules.add(found[0][: -len(".kernel")].replace(".", "/"))
    cfg = lora_config()
    cfg.update(rank=int(peft_config["r"]), alpha=float(peft_config.get("lora_alpha", peft_config["r"])),
               dropout=0.0, module_path="|".join(sorted(re.escape(m) for m in modules)))
    return cfg


def import_peft(lora_model: nnx.Module, adapter_dir: str | os.PathLike, table: PortTable) -> nnx.Module:
    """Loads a peft adapter folder into `lora_model`'s adapters, strictly: every adapter of the model must
    be in the file at its shape, and every tensor of the file must have an adapter.

    Raises:
      CheckpointMismatchError: naming the key and both shapes, the missing keys or the unexpected ones.
    """
    from safetensors.numpy import load_file

    folder = pathlib.Path(adapter_dir)
    read_peft_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (only safetensors adapters import)")
    found = load_file(str(weights))
    # peft writes the adapter's name into the key in memory only (`.lora_A.default.weight`); accept both.
    found = {k.replace(".default.weight", ".weight"): v for k, v in found.items()}
    expected = peft_tensors(lora_model, table)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(f"{weights}: adapters do not match the model: missing {missing[:5]}"
                                      f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                      f"{' …' if len(unexpected) > 5 else ''}")
    for key, value in expected.items():
        if found[key].shape != value.shape:
            raise CheckpointMismatchError(f"{weights}: {key} has shape {tuple(found[key].shape)}; the model's "
                                          f"adapter is {tuple(value.shape)} (rank, in) / (out, rank)")
    state = nnx.state(lora_model, nnx.LoRAParam)
    flat = dict(nnx.to_flat_state(state))
    for module in lora_paths(lora_model):
        name = PEFT_PREFIX + _torch_module(table, module)
        for suffix, leaf in ((".lora_A.weight", LORA_A), (".lora_B.weight", LORA_B)):
            variable = flat[(*module, leaf)]
            variable.set_value(jnp.asarray(found[name + suffix].T, variable.get_value().dtype))
    nnx.update(lora_model, state)
    return lora_model
