"""Model parameters as an Orbax checkpoint, with the model config beside them.

The config travels with the weights so that a checkpoint is self-describing: restoring needs only the
directory, and restoring onto a mesh needs only the shardings of the abstract model.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from med2e3_jax.models.med2e3 import Med2E3

CONFIG_FILE = "model_config.json"
PARAMS_ITEM = "params"


def save_params(model: Med2E3, directory: str | os.PathLike) -> None:
    """Writes `directory/params` (Orbax) and `directory/model_config.json`.

    One Zarr array per parameter rather than Orbax's default OCDBT store, whose writer buffers a
    large share of the parameters' bytes on top of them while it saves; this way a save adds little,
    so that converting the released model fits in a small multiple of its size
    (`benchmarks/bench_convert.py`). Restoring detects either format.
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer(use_ocdbt=False) as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_ITEM), nnx.state(model, nnx.Param), force=True)
    if jax.process_index() == 0:
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(model.cfg.to_json(indent=1))


def load_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a checkpoint written by save_params?")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_params(directory: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None) -> Med2E3:
    """The model saved in `directory`, built from its saved config unless `cfg` is given."""
    directory = os.path.abspath(os.fspath(directory))
    cfg = load_config(directory) if cfg is None else cfg
    abstract = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(directory, PARAMS_ITEM), target)
    return nnx.merge(graphdef, restored)
