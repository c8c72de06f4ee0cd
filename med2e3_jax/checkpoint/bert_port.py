"""HF BERT <-> `models.bert.BertEncoder`: the port table and the config reader.

`BERT_TABLE` is relative to the state-dict names of transformers `BertModel` (the same in 4.x and 5.x).
M3D-CLIP stores it under `language_encoder.`, the authors' full Med-2E3 state dict under
`vision3d_model.vision3d_encoder.language_encoder.`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ml_collections import ConfigDict

from med2e3_jax.checkpoint.port import PortTable, embedding, linear, norm
from med2e3_jax.models.bert import ACTIVATIONS


_SRC = "encoder.layer.{i}."
_DST = "layers.{i}."

BERT_TABLE = PortTable(
    rules=(
        embedding("embeddings.word_embeddings", "embeddings.word_embeddings"),
        embedding("embeddings.position_embeddings", "embeddings.position_embeddings"),
        embedding("embeddings.token_type_embeddings", "embeddings.token_type_embeddings"),
        *norm("embeddings.LayerNorm", "embeddings.layer_norm"),
        *linear(_SRC + "attention.self.query", _DST + "attention.q_proj"),
        *linear(_SRC + "attention.self.key", _DST + "attention.k_proj"),
        *linear(_SRC + "attention.self.value", _DST + "attention.v_proj"),
        *linear(_SRC + "attention.output.dense", _DST + "attention.out_proj"),
        *norm(_SRC + "attention.output.LayerNorm", _DST + "attention_norm"),
        *linear(_SRC + "intermediate.dense", _DST + "intermediate"),
        *linear(_SRC + "output.dense", _DST + "output"),
        *norm(_SRC + "output.LayerNorm", _DST + "output_norm"),
        *linear("pooler.dense", "pooler.dense"),
    ),
    # Buffers (arange positions, zero token types) that older checkpoints saved; recomputed by the model.
    unused=("embeddings.position_ids", "embeddings.token_type_ids"),
)

# transformers' `BertConfig` defaults: hub config.json files may omit fields equal to them.
_HF_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "absolute",
}


def bert_config_from_hf(hf: Mapping) -> ConfigDict:
    """The `question_encoder` sub-config from a `BertConfig` dict."""
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if hf["position_embedding_type"] != "absolute":
        raise ValueError(
            f"BERT config: position_embedding_type {hf['position_embedding_type']!r} is not supported "
            "(only 'absolute')"
        )
    if hf["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"BERT config: hidden_act {hf['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
    return ConfigDict(
        {
            "vocab_size": int(hf["vocab_size"]),
            "hidden_size": int(hf["hidden_size"]),
            "num_layers": int(hf["num_hidden_layers"]),
            "num_heads": int(hf["num_attention_heads"]),
            "intermediate_size": int(hf["intermediate_size"]),
            "max_position_embeddings": int(hf["max_position_embeddings"]),
            "type_vocab_size": int(hf["type_vocab_size"]),
            "layer_norm_eps": float(hf["layer_norm_eps"]),
            "hidden_act": str(hf["hidden_act"]),
        }
    )
