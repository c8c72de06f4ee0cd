"""HF SigLIP vision tower <-> `models.siglip.SiglipVisionTower`: the port table and the config reader.

`SIGLIP_TABLE` is relative to the state-dict names of transformers 5.x `SiglipVisionModel`
(`embeddings.*`, `encoder.layers.N.*`, `post_layernorm.*`, `head.*`). Other layouts are prefixes of it:
transformers 4.x `SiglipVisionModel` and Med-2E3's `vision2d_model/` folder add `vision_model.`, a full
`SiglipModel` adds `vision_model.` too (and holds a text tower this table does not cover), the authors'
full state dict adds `vision2d_model.vision2d_encoder.vision_model.`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ml_collections import ConfigDict

from med2e3_jax.checkpoint.port import CONV2D, PortTable, Rule, embedding, linear, norm

_LAYER = "encoder.layers.{i}."


SIGLIP_TABLE = PortTable(
    rules=(
        Rule("embeddings.patch_embedding.weight", "embeddings.patch_embedding.kernel", CONV2D),
        Rule("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias"),
        embedding("embeddings.position_embedding"),
        *norm(_LAYER + "layer_norm1"),
        *linear(_LAYER + "self_attn.q_proj"),
        *linear(_LAYER + "self_attn.k_proj"),
        *linear(_LAYER + "self_attn.v_proj"),
        *linear(_LAYER + "self_attn.out_proj"),
        *norm(_LAYER + "layer_norm2"),
        *linear(_LAYER + "mlp.fc1"),
        *linear(_LAYER + "mlp.fc2"),
    ),
    # Med-2E3 reads the last encoder layer before `post_layernorm`; the MAP head is never used.
    # `position_ids` is a buffer that old checkpoints saved.
    unused=(
        "post_layernorm.weight",
        "post_layernorm.bias",
        "head.probe",
        "head.attention.in_proj_weight",
        "head.attention.in_proj_bias",
        "head.attention.out_proj.weight",
        "head.attention.out_proj.bias",
        "head.layernorm.weight",
        "head.layernorm.bias",
        "head.mlp.fc1.weight",
        "head.mlp.fc1.bias",
        "head.mlp.fc2.weight",
        "head.mlp.fc2.bias",
        "embeddings.position_ids",
    ),
)

# transformers' `SiglipVisionConfig` defaults: hub config.json files store only the fields that differ.
_HF_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# Both names denote the tanh approximation of GELU, the one `SiglipMLP` computes.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")


def siglip_config_from_hf(hf: Mapping) -> ConfigDict:
    """The `vision2d` sub-config from a `SiglipVisionConfig` dict, or a `SiglipConfig` dict (its `vision_config`)."""
    if "vision_config" in hf:
        hf = hf["vision_config"] or {}
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if hf["hidden_act"] not in _TANH_GELU:
        raise ValueError(
            f"SigLIP config: hidden_act {hf['hidden_act']!r} is not supported; the tower computes {_TANH_GELU[0]!r}"
        )
    return ConfigDict(
        {
            "image_size": int(hf["image_size"]),
            "patch_size": int(hf["patch_size"]),
            "num_channels": int(hf["num_channels"]),
            "hidden_size": int(hf["hidden_size"]),
            "intermediate_size": int(hf["intermediate_size"]),
            "num_layers": int(hf["num_hidden_layers"]),
            "num_heads": int(hf["num_attention_heads"]),
            "layer_norm_eps": float(hf["layer_norm_eps"]),
        }
    )
