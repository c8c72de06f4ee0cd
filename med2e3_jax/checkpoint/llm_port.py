"""Port of the transformers `*ForCausalLM` LLMs (Llama, Phi-3, Qwen2) into `models.decoder.Decoder`.

`LLM_TABLE` is relative to the `*ForCausalLM` state dict (`model.…`, `lm_head.weight`) and serves the
three families at once: a rule whose target a model lacks (`qkv_proj` in a Llama) never matches a key
of that family's checkpoint. `llm_config_from_hf` turns a transformers config dict, 4.x or 5.x form, into
the `llm` sub-config.
"""

from __future__ import annotations

import ml_collections

from med2e3_jax.checkpoint.port import IDENTITY, LINEAR, PortTable, Rule

_LAYER = "model.layers.{i}."
_TARGET = "layers.{i}."

LLM_TABLE = PortTable(
    rules=(
        Rule("model.embed_tokens.weight", "embed_tokens.embedding", IDENTITY),
        *(
            Rule(f"{_LAYER}{name}.weight", f"{_TARGET}{name}.weight", IDENTITY)
            for name in ("input_layernorm", "post_attention_layernorm")
        ),
        *(
            Rule(f"{_LAYER}self_attn.{proj}.weight", f"{_TARGET}self_attn.{proj}.kernel", LINEAR)
            for proj in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")
        ),
        *(
            Rule(f"{_LAYER}self_attn.{proj}.bias", f"{_TARGET}self_attn.{proj}.bias", IDENTITY)
            for proj in ("qkv_proj", "q_proj", "k_proj", "v_proj")
        ),
        *(
            Rule(f"{_LAYER}mlp.{proj}.weight", f"{_TARGET}mlp.{proj}.kernel", LINEAR)
            for proj in ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
        ),
        Rule("model.norm.weight", "norm.weight", IDENTITY),
        Rule("lm_head.weight", "lm_head.kernel", LINEAR),
    ),
    unused=(
        # RoPE frequency buffers, saved by old transformers versions; recomputed from the config.
        "model.layers.{i}.self_attn.rotary_emb.inv_freq",
        "model.rotary_emb.inv_freq",
        # With tie_word_embeddings the state dict repeats the embedding as lm_head.weight; the model
        # then has no lm_head and reads the embedding. (Untied models consume it through the rule.)
        "lm_head.weight",
    ),
)

_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "phi3": "phi3", "qwen2": "qwen2"}
_FAMILY_OF_ARCHITECTURE = {"LlamaForCausalLM": "llama", "Phi3ForCausalLM": "phi3", "Qwen2ForCausalLM": "qwen2"}


def _family(hf: dict) -> str:
    candidates = [_FAMILY_OF_MODEL_TYPE.get(hf.get("model_type"))]
    candidates += [_FAMILY_OF_ARCHITECTURE.get(a) for a in hf.get("architectures") or ()]
    family = next((f for f in candidates if f), None)
    if family is None:
        raise ValueError(
            f"unsupported LLM config: model_type {hf.get('model_type')!r}, architectures "
            f"{hf.get('architectures')!r}; expected one of {sorted(_FAMILY_OF_MODEL_TYPE)}"
        )
    return family


def _rope(hf: dict, family: str) -> tuple[float, float, ml_collections.ConfigDict | None]:
    """(rope_theta, partial_rotary_factor, rope_scaling) from either config form.

    transformers 4.x: top-level `rope_theta` (and `partial_rotary_factor`), `rope_scaling` None or a dict
    with `type` (or `rope_type`); Phi-3 called LongRoPE 'su' (and briefly 'yarn').
    transformers 5.x: `rope_parameters` holding all of it, `rope_type` 'default' when unscaled.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if family == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"
    if kind == "default":
        return theta, partial, None
    if kind == "longrope":
        # Phi-3 keeps the pre-training length at the top level, and transformers gives it priority.
        original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        scaling = dict(
            type="longrope",
            short_factor=list(params["short_factor"]),
            long_factor=list(params["long_factor"]),
            original_max_position_embeddings=original or hf["max_position_embeddings"],
            factor=params.get("factor"),
            attention_factor=params.get("attention_factor"),
        )
    elif kind == "llama3":
        scaling = dict(
            type="llama3",
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position_embeddings=params["original_max_position_embeddings"],
        )
    else:
        raise ValueError(f"unsupported RoPE scaling {kind!r} in {params}; supported: default, longrope, llama3")
    return theta, partial, ml_collections.ConfigDict(scaling)


def llm_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """The `llm` sub-config from a transformers `config.to_dict()` of Phi3Config, LlamaConfig or Qwen2Config."""
    family = _family(hf)
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("Llama configs with attention_bias or mlp_bias are not supported (biased o_proj / MLP)")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 configs with use_sliding_window=True are not supported")
    theta, partial, scaling = _rope(hf, family)
    num_heads = hf["num_attention_heads"]
    return ml_collections.ConfigDict(
        dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=float(theta),
            partial_rotary_factor=float(partial),
            rope_scaling=scaling,
            max_position_embeddings=hf["max_position_embeddings"],
            # Phi-3 passes its sliding_window to the mask (transformers' sliding-window causal mask).
            sliding_window=hf.get("sliding_window") if family == "phi3" else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            fused_qkv=family == "phi3",
            fused_gate_up=family == "phi3",
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
    )
