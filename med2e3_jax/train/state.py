"""What a training stage updates and how: the trainable filter, the learning-rate schedule, the optimizer.

Each stage (`config.train.stage`) names the top-level Med2E3 submodules it trains (`config.train.trainable`);
every other parameter is frozen: the optimizer holds no state for it and the step computes no gradient
for it. The update is the authors' (HF Trainer): AdamW after clipping the global gradient norm, the
learning rate warmed up linearly then decayed along a cosine to 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class _UnderSubmodules:
    """nnx filter: the variable sits under one of these top-level submodules (hashable, so that the
    optimizer's graph definition, which holds the filter, compares equal across rebuilds)."""

    names: tuple[str, ...]

    def __call__(self, path, value) -> bool:
        return bool(path) and str(path[0]) in self.names


def trainable_filter(train_cfg):
    """The `nnx.Param`s under the submodules listed in `train_cfg.trainable`, and every LoRA adapter."""
    names = tuple(train_cfg.trainable)
    if not names:
        raise ValueError(f"train.trainable is empty for stage {train_cfg.get('stage')!r}: nothing to train")
    return nnx.Any(nnx.All(nnx.Param, _UnderSubmodules(names)), nnx.LoRAParam)


def check_trainable(model, train_cfg) -> None:
    """Raises ValueError naming any `train.trainable` entry the model does not have (e.g. `tgis` when the
    ablation has no question branch would silently train nothing there)."""
    present = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    missing = sorted(set(train_cfg.trainable) - present)
    if missing:
        raise ValueError(f"train.trainable names {missing}, which the model lacks; it has {sorted(present)}")


def warmup_steps(train_cfg) -> int:
    """ceil(warmup_ratio * steps), as HF Trainer counts them."""
    return int(math.ceil(train_cfg.warmup_ratio * train_cfg.steps))


def learning_rate(train_cfg):
    """optax schedule: step -> learning rate of the update made at that step (0-based).

    HF's `get_cosine_schedule_with_warmup`: lr * step / warmup during warmup, then
    lr * (1 + cos(pi * progress)) / 2 with progress = (step - warmup) / (steps - warmup), 0 at the end.
    """
    peak, total, warmup = float(train_cfg.learning_rate), int(train_cfg.steps), warmup_steps(train_cfg)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return peak * jnp.where(step < warmup, warm, cosine)

    return schedule


def make_tx(train_cfg) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (skipped when 0) then AdamW; the hyperparameters live in the
    optimizer state (`inject_hyperparams`), so that the step can report the learning rate it used."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=learning_rate(train_cfg),
        b1=train_cfg.adam_b1,
        b2=train_cfg.adam_b2,
        eps=train_cfg.adam_eps,
        weight_decay=train_cfg.weight_decay,
    )
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
    return adamw


def make_optimizer(model, train_cfg) -> nnx.Optimizer:
    """An `nnx.Optimizer` holding AdamW state for the trainable parameters only.

    Its state takes the placement of the parameters (`jnp.zeros_like`), so shard the model first; call
    `sharding.shard_model(optimizer, mesh)` too, which also places the scalar step counters.
    """
    check_trainable(model, train_cfg)
    return nnx.Optimizer(model, make_tx(train_cfg), wrt=trainable_filter(train_cfg))
