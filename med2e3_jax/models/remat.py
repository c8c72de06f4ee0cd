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
    """`call(layer, *args)` under `policy` (`call` itself for 'none').

    The layer goes through `jax.checkpoint` as a pure function of its state: `nnx.remat` refuses layers
    whose variables belong to an outer trace (a frozen tower inside the training step's `grad`, as in
    the pretrain stage). `call` must not mutate the layer (the training forward does not).
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
    if policy == "none":
        return call

    def rematted(layer, *args):
        graphdef, state = nnx.split(layer)
        pure = jax.checkpoint(lambda state, *args: call(nnx.merge(graphdef, state), *args),
                              policy=_JAX_POLICIES[policy])
        return pure(state, *args)

    return rematted
