"""Building a `Med2E3` from the authors' PyTorch checkpoints, and writing it back in their layout.

- `load_med2e3(cfg, checkpoint)`: a whole model: the authors' `state_dict` (one file, module-path keys)
  or their release layout (five folders). Built abstractly and filled tensor by tensor.
- `load_med2e3(cfg, components={...})`: a model to start training from: the pretrained components
  (HF LLM, HF SigLIP, M3D-CLIP or its bare ViT) over a random init of the rest (connectors, TG-IS).
  Also built abstractly: the components fill it tensor by tensor, then the seeded init is computed
  for the parameters they left, and only for those, so that host memory stays near the size of the
  parameters rather than a whole float32 model plus the checkpoints.
- `export_med2e3(model, path)`: module-path keys in one safetensors file, which re-imports exactly.
"""

from __future__ import annotations

import logging
import os

import jax
from flax import nnx

from med2e3_jax.checkpoint.importer import ImportReport, abstract_params, export_pytorch, load_pytorch
from med2e3_jax.checkpoint.limits import DEFAULT_LIMITS, CheckpointLimits
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
    limits: CheckpointLimits = DEFAULT_LIMITS,
) -> tuple[Med2E3, list[ImportReport]]:
    """A `Med2E3` for `cfg` with weights from a whole checkpoint or from component checkpoints.

    Args:
      cfg: the model config (`med2e3_jax.config.model_config()` shape).
      checkpoint: the authors' `state_dict` file or release-layout directory (every tensor needed).
      components: name -> path, names from `COMPONENTS` other than "full" ("llm", "siglip",
        "m3d_clip", "vit3d", "question_encoder"); parameters not covered get the values
        `Med2E3(cfg, rngs=nnx.Rngs(seed))` gives them.
      limits: the size bounds the checkpoints' headers are held to.
    """
    if (checkpoint is None) == (not components):
        raise ValueError("pass exactly one of `checkpoint` (a whole model) or `components`")
    if checkpoint is not None:
        source, layout = open_checkpoint(checkpoint, limits)
        log.info("%s: %s layout", checkpoint, layout)
        model = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(seed)))
        model, report = load_pytorch(model, source, FULL_TABLE, progress=progress)
        return model, [report]

    unknown = sorted(set(components) - (set(COMPONENTS) - {"full"}))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; expected some of {sorted(set(COMPONENTS) - {'full'})}")
    model = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(seed)))
    reports = []
    for name, path in components.items():
        table, only = COMPONENTS[name]
        source, _ = open_checkpoint(path, limits)
        model, report = load_pytorch(model, source, table, only=only, progress=progress)
        log.info("%s from %s: %s", name, path, report.summary())
        reports.append(report)
    return initialise_abstract_params(model, seed), reports


def initialise_abstract_params(model: Med2E3, seed: int) -> Med2E3:
    """`model` with each parameter still abstract set to its value in `Med2E3(model.cfg, rngs=nnx.Rngs(seed))`.

    The seeded init of the whole model is traced but compiled for the wanted parameters only: XLA drops
    the rest as dead code, so the loaded components are never initialised a second time in memory.
    """
    wanted = set(abstract_params(model))
    if not wanted:
        return model
    cfg = model.cfg

    def init():
        params = nnx.state(Med2E3(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
        return {name: var.get_value() for name, var in _named_params(params) if name in wanted}

    values = jax.jit(init)()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for name, var in _named_params(params):
        if name in values:
            var.set_value(values.pop(name))
    return nnx.merge(graphdef, params, rest)


def _named_params(state):
    return ((".".join(map(str, path)), var) for path, var in nnx.to_flat_state(state))


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
