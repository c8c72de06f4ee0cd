"""Running the JAX model on a fixture in the golden format and naming its tensors as the fixture does.

A fixture directory holds `config.json` (the authors' sub-configs), `model.safetensors` (module-path
keys), `inputs.npz` (the authors' forward inputs) and `outputs.npz` (every intermediate).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.image_placeholder import expand_image_placeholder
from med2e3_jax import config as config_lib
from med2e3_jax.checkpoint.importer import load_pytorch
from med2e3_jax.checkpoint.med2e3_port import FULL_TABLE, config_from_reference
from med2e3_jax.checkpoint.sources import SafetensorsSource
from med2e3_jax.models.med2e3 import Med2E3

log = logging.getLogger(__name__)

INPUT_NAMES = ("vision3d", "input_ids", "attention_mask", "labels", "questions", "questions_mask")


def load_fixture_model(fixture_dir: str) -> tuple[Med2E3, dict]:
    """The fixture's model in float32, imported strictly from its `model.safetensors`."""
    with open(os.path.join(fixture_dir, "config.json"), encoding="utf-8") as f:
        reference = json.load(f)
    cfg = config_from_reference(reference)
    cfg.dtype = cfg.param_dtype = "float32"
    abstract = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(0)))
    model, report = load_pytorch(abstract, SafetensorsSource(os.path.join(fixture_dir, "model.safetensors")), FULL_TABLE)
    log.info("%s: %s", fixture_dir, report.summary())
    return model, reference


def run_fixture(fixture_dir: str) -> dict[str, np.ndarray]:
    """Every tensor the JAX model produces for the fixture's inputs, under the fixture's names."""
    model, reference = load_fixture_model(fixture_dir)
    cfg = model.cfg
    inputs = np.load(os.path.join(fixture_dir, "inputs.npz"))
    missing = [name for name in INPUT_NAMES if name not in inputs]
    if missing:
        raise ValueError(f"{fixture_dir}/inputs.npz lacks {missing}; it holds {sorted(inputs)}")
    pad_id = reference.get("special_tokens", {}).get("input_ids_padding_value", cfg.llm.pad_token_id)
    prompts = expand_image_placeholder(
        inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
        num_vision_tokens=config_lib.num_vision_tokens(cfg), max_length=cfg.llm_max_length, pad_id=pad_id,
    )

    @nnx.jit
    def forward(model, volume, input_ids, attention_mask, labels, question_ids, question_mask):
        return nnx.capture(model, nnx.Intermediate)(volume, input_ids, attention_mask, labels, question_ids,
                                                    question_mask)

    with jax.default_matmul_precision("highest"):
        out, intermediates = forward(
            model, jnp.asarray(inputs["vision3d"], jnp.float32), jnp.asarray(prompts.input_ids),
            jnp.asarray(prompts.attention_mask), jnp.asarray(prompts.labels),
            jnp.asarray(inputs["questions"], jnp.int32), jnp.asarray(inputs["questions_mask"], jnp.int32),
        )
    tensors = {".".join(map(str, path)): np.asarray(value[...]) for path, value in nnx.to_flat_state(intermediates)}
    tensors.update(
        vision_start=prompts.vision_start.astype(np.int64),
        inputs_embeds=np.asarray(out.inputs_embeds),
        merged_attention_mask=prompts.attention_mask.astype(np.float32),
        merged_labels=prompts.labels.astype(np.int64),
        logits=np.asarray(out.logits),
        loss=np.asarray(out.loss),
    )
    return tensors
