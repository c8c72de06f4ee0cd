"""Rematerialisation of transformer layers: trade backward-pass compute for activation memory.

`model_config().remat_policy` names what the backward pass may keep of each LLM and SigLIP layer:
  - 'none': everything (fastest, most memory);
  - 'full': only the layer's inputs; the layer is recomputed during the backward pass;
  - 'dots': also the outputs of the weight matmuls (not the attention scores, which grow with length²).
The forward computation is unchanged, so every policy gives the same loss and gradients.
"""

from __future__ import annotations

import jax
from flax import nnx

from med2e3_jax.config import REMAT_POLICIES

_JAX_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(call, policy: str):
    """`call(layer, *args)` under `policy` (`call` itself for 'none')."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
    if policy == "none":
        return call
    return nnx.remat(call, policy=_JAX_POLICIES[policy])
