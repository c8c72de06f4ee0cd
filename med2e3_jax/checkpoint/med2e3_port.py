"""The whole Med-2E3: the authors' module-path keys <-> `Med2E3` parameters, component checkpoints,
and the model config from the authors' configs.

Tables are composed from the per-component ones with the authors' module prefixes, so a rule is
written once and serves the full `state_dict`, the release layout and each component checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from med2e3_jax import config as config_lib
from med2e3_jax.checkpoint.bert_port import BERT_TABLE, bert_config_from_hf
from med2e3_jax.checkpoint.connector_port import CONNECTOR_TABLE
from med2e3_jax.checkpoint.llm_port import LLM_TABLE, llm_config_from_hf
from med2e3_jax.checkpoint.port import LINEAR, PortTable, Rule
from med2e3_jax.checkpoint.siglip_port import SIGLIP_TABLE, siglip_config_from_hf
from med2e3_jax.checkpoint.vit3d_port import VIT3D_TABLE, vit3d_config_from_reference

# An M3D-CLIP checkpoint: the 3D ViT and the BERT whose pooler feeds TG-IS. The contrastive
# projections and temperature serve CLIP pretraining only.
M3D_CLIP_TABLE = (
    VIT3D_TABLE.prefixed("vision_encoder.", "vision3d.")
    + BERT_TABLE.prefixed("language_encoder.", "question_encoder.")
    + PortTable((), unused=("mm_vision_proj.weight", "mm_vision_proj.bias", "mm_language_proj.weight",
                            "mm_language_proj.bias", "logit_scale"))
)

# An HF SigLIP checkpoint: `SiglipVisionModel` in transformers 4.x (`vision_model.` level) or 5.x
# (none), or a whole `SiglipModel`, whose text tower Med-2E3 does not use.
SIGLIP_CHECKPOINT_TABLE = (
    SIGLIP_TABLE.prefixed("vision_model.", "vision2d.")
    + SIGLIP_TABLE.prefixed("", "vision2d.")
    + PortTable((), unused=("text_model.*", "logit_scale", "logit_bias"))
)

# The authors' `MedMLLMForConditionalGeneration.state_dict()`. The transformers 4.x SigLIP names come
# first, so that export writes what the authors' code (transformers 4.4x) loads.
FULL_TABLE = (
    LLM_TABLE.prefixed("llm.", "llm.")
    + SIGLIP_TABLE.prefixed("vision2d_model.vision2d_encoder.vision_model.", "vision2d.")
    + SIGLIP_TABLE.prefixed("vision2d_model.vision2d_encoder.", "vision2d.")
    + CONNECTOR_TABLE.prefixed("vision2d_connector.", "vision2d_connector.")
    + M3D_CLIP_TABLE.prefixed("vision3d_model.vision3d_encoder.", "")
    + CONNECTOR_TABLE.prefixed("vision3d_connector.", "vision3d_connector.")
    # The authors' loader drops this one (it restores only `_connector` keys); we do not.
    + PortTable((
        Rule("vision3d_connector.text_mlp.weight", "tgis.text_mlp.kernel", LINEAR),
        Rule("vision3d_connector.text_mlp.bias", "tgis.text_mlp.bias"),
    ))
)

# An HF BERT checkpoint as the TG-IS question encoder (e.g. all-MiniLM-L6-v2): a bare `BertModel`, or a
# model with a head whose encoder sits under `bert.`, the head itself (`cls.*`: MLM / next-sentence
# prediction) being of no use to TG-IS. The pooler must be there: its output is the question feature.
QUESTION_ENCODER_TABLE = (
    BERT_TABLE.prefixed("", "question_encoder.")
    + BERT_TABLE.prefixed("bert.", "question_encoder.")
    + PortTable((), unused=("cls.*",))
)

# name -> (table, the top-level submodules it fills; None = all).
COMPONENTS: dict[str, tuple[PortTable, tuple[str, ...] | None]] = {
    "full": (FULL_TABLE, None),
    "llm": (LLM_TABLE.prefixed("", "llm."), ("llm",)),
    "siglip": (SIGLIP_CHECKPOINT_TABLE, ("vision2d",)),
    "m3d_clip": (M3D_CLIP_TABLE, ("vision3d", "question_encoder")),
    "vit3d": (VIT3D_TABLE.prefixed("", "vision3d."), ("vision3d",)),
    "question_encoder": (QUESTION_ENCODER_TABLE, ("question_encoder",)),
}


def question_encoder_config(checkpoint: str | os.PathLike) -> ml_collections.ConfigDict:
    """The `question_encoder` sub-config of an HF BERT checkpoint, from the `config.json` beside it
    (`checkpoint` is the folder or a weights file in it). The TG-IS question width, `text_mlp`'s input,
    is its `hidden_size` (384 for all-MiniLM-L6-v2, 768 for M3D-CLIP's bert-base)."""
    folder = os.fspath(checkpoint)
    if not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: the question encoder's BertConfig is read from it") from None
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"{path}: model_type {hf['model_type']!r}; the question encoder is a BERT ('bert')")
    return bert_config_from_hf(hf)


def config_from_reference(reference: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The model config from a config in the golden-fixture format (`config.json`: the authors'
    `med2e3_config`, `llm_config`, `vision2d_model_config`, `vision3d_model_config`, `bert_config`,
    `vision3d_connector_config`), so that any fixture of that format runs without special cases."""
    for key in ("llm_config", "vision2d_model_config", "vision3d_model_config", "bert_config"):
        if key not in reference:
            raise ValueError(f"reference config lacks {key!r}; keys present: {sorted(reference)}")
    cfg = config_lib.model_config()
    cfg.llm = llm_config_from_hf(reference["llm_config"])
    cfg.vision2d = siglip_config_from_hf(reference["vision2d_model_config"])
    cfg.vision3d = vit3d_config_from_reference(reference["vision3d_model_config"])
    cfg.question_encoder = bert_config_from_hf(reference["bert_config"])
    med2e3 = reference.get("med2e3_config", {})
    cfg.llm_max_length = int(med2e3.get("llm_max_length", cfg.llm_max_length))
    connector = reference.get("vision3d_connector_config", {})
    if "temperature" in connector:
        cfg.tgis.temperature = float(connector["temperature"])
    if "attn_dropout_p" in connector:
        cfg.tgis.dropout = float(connector["attn_dropout_p"])
    if "num_patches_pre" in connector and "num_patches_post" in connector:
        strides = {pre // post for pre, post in zip(connector["num_patches_pre"], connector["num_patches_post"])}
        if len(strides) != 1:
            raise ValueError(f"vision3d_connector_config pools unevenly: {connector['num_patches_pre']} -> "
                             f"{connector['num_patches_post']}")
        cfg.tgis.pool_stride = strides.pop()
    config_lib.validate_model_config(cfg)
    return cfg
