"""Building a `Med2E3` from the authors' PyTorch checkpoints, and writing it back in their layout.

- `load_med2e3(cfg, checkpoint)`: a whole model: the authors' `state_dict` (one file, module-path keys)
  or their release layout (five folders). Built abstractly and filled tensor by tensor.
- `load_med2e3(cfg, components={...})`: a model to start training from: the pretrained components
  (HF LLM, HF SigLIP, M3D-CLIP or its bare ViT) over a random init of the rest (connectors, TG-IS).
- `export_med2e3(model, path)`: module-path keys in one safetensors file, which re-imports exactly.
"""

from __future__ import annotations

import logging
import os

from flax import nnx

from med2e3_jax.checkpoint.importer import ImportReport, abstract_params, export_pytorch, load_pytorch
from med2e3_jax.checkpoint.med2e3_port import COMPONENTS, FULL_TABLE
from med2e3_jax.checkpoint.sources import open_checkpoint
from med2e3_jax.checkpoint.writers import write_safetensors
from med2e3_jax.models.med2e3 import Med2E3

log = logging.getLogger(__name__)


def load_med2e3(
    cfg,
    checkpoint: str | os.PathLike | None = None,
    *,
    components: dict[str, str | os.PathLike] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Med2E3, list[ImportReport]]:
    """A `Med2E3` for `cfg` with weights from a whole checkpoint or from component checkpoints.

    Args:
      cfg: the model config (`med2e3_jax.config.model_config()` shape).
      checkpoint: the authors' `state_dict` file or release-layout directory (every tensor needed).
      components: name -> path, names from `COMPONENTS` other than "full" ("llm", "siglip",
        "m3d_clip", "vit3d", "question_encoder"); parameters not covered keep a random init from `seed`.
    """
    if (checkpoint is None) == (not components):
        raise ValueError("pass exactly one of `checkpoint` (a whole model) or `components`")
    if checkpoint is not None:
        source, layout = open_checkpoint(checkpoint)
        log.info("%s: %s layout", checkpoint, layout)
        model = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(seed)))
        model, report = load_pytorch(model, source, FULL_TABLE, progress=progress)
        return model, [report]

    unknown = sorted(set(components) - (set(COMPONENTS) - {"full"}))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; expected some of {sorted(set(COMPONENTS) - {'full'})}")
    model = Med2E3(cfg, rngs=nnx.Rngs(seed))
    reports = []
    for name, path in components.items():
        table, only = COMPONENTS[name]
        source, _ = open_checkpoint(path)
        model, report = load_pytorch(model, source, table, only=only, progress=progress)
        log.info("%s from %s: %s", name, path, report.summary())
        reports.append(report)
    return model, reports


def export_med2e3(model: Med2E3, path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Writes every parameter under the authors' module-path key (one safetensors file).

    Returns key -> shape of what was written.
    """
    missing = abstract_params(model)
    if missing:
        raise ValueError(f"cannot export a model with unloaded parameters: {missing[:5]}")
    tensors = export_pytorch(model, FULL_TABLE)
    write_safetensors(tensors, path)
    return {key: value.shape for key, value in tensors.items()}
