"""M3D-CLIP's 3D ViT: torch keys <-> `ViT3D` parameters, and its config.

Keys are relative to the bare ViT: what `pretrained_ViT.bin` holds, what sits under `vision_encoder.`
in an M3D-CLIP checkpoint, and under `vision3d_model.vision3d_encoder.vision_encoder.` in a Med-2E3
`state_dict`. Use `VIT3D_TABLE.prefixed(prefix, "")` for the latter two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from med2e3_jax.checkpoint.port import PortTable, Rule, linear, norm


VIT3D_TABLE = PortTable(
    rules=(
        Rule("cls_token", "cls_token"),
        Rule("patch_embedding.position_embeddings", "position_embeddings"),
        # `patch_embeddings` is nn.Sequential(Rearrange, Linear): the Linear is item 1.
        *linear("patch_embedding.patch_embeddings.1", "patch_embedding"),
        *norm("blocks.{i}.norm1", "blocks.{i}.norm1"),
        # monai's qkv has no bias; its rows are (qkv, head, head_dim), the order `Attention` reshapes to.
        *linear("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv", bias=False),
        *linear("blocks.{i}.attn.out_proj", "blocks.{i}.attn.out_proj"),
        *norm("blocks.{i}.norm2", "blocks.{i}.norm2"),
        *linear("blocks.{i}.mlp.linear1", "blocks.{i}.mlp.linear1"),
        *linear("blocks.{i}.mlp.linear2", "blocks.{i}.mlp.linear2"),
    ),
    # Med-2E3 takes the last block's output before the final norm.
    unused=("norm.weight", "norm.bias"),
)


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    # monai accepts an int for an isotropic size (`ensure_tuple_rep`).
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3:
        raise ValueError(f"M3D-CLIP config {name} must be an int or 3 values (depth, height, width), got {value!r}")
    return tuple(int(v) for v in values)


def vit3d_config_from_reference(m3d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The `vision3d` sub-config from an M3D-CLIP config (`config.json` of M3D-CLIP, or the fixture's
    `vision3d_model_config`)."""
    required = ("img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads")
    missing = [k for k in required if k not in m3d]
    if missing:
        raise ValueError(f"M3D-CLIP config lacks {missing}; keys present: {sorted(m3d)}")
    if m3d.get("pos_embed", "perceptron") != "perceptron":
        raise ValueError(
            f"only the 'perceptron' patch embedding of M3D-CLIP is supported, got pos_embed={m3d['pos_embed']!r}"
        )
    if m3d.get("spatial_dims", 3) != 3:
        raise ValueError(f"M3D-CLIP's ViT must be 3D, got spatial_dims={m3d['spatial_dims']!r}")
    return ml_collections.ConfigDict(
        dict(
            in_channels=int(m3d.get("in_channels", 1)),
            img_size=_triple(m3d["img_size"], "img_size"),
            patch_size=_triple(m3d["patch_size"], "patch_size"),
            hidden_size=int(m3d["hidden_size"]),
            mlp_dim=int(m3d["mlp_dim"]),
            num_layers=int(m3d["num_layers"]),
            num_heads=int(m3d["num_heads"]),
            # monai's TransformerBlock uses nn.LayerNorm's default; M3D's config does not carry it.
            layer_norm_eps=1e-5,
        )
    )
