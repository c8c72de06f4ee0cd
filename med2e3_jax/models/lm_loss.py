"""The language-model loss: masked next-token cross-entropy over the decoder's final hidden states.

One function serves the model's own forward (`Med2E3.__call__` with labels, which equals transformers'
`*ForCausalLM` loss) and the training step, on every backend. The LM head (embed x vocab, 32064 rows
for Phi-3) is applied inside the loss, so that its memory and its work follow a static `HeadLayout`:

  - `slots`: most of a Med-2E3 prompt is vision tokens, question and padding. The rows of a micro-batch
    are pooled into `groups` (one per batch shard, so no group spans devices), each group's supervised
    positions are moved to its front (a stable sort), and the head always runs on the first `slots` of
    them. Positions past the slots run in further chunks, each computed only when it holds a target
    (`lax.cond`), so that a batch with more targets than slots costs more but loses none.
  - `chunk`: the head runs on at most `chunk` positions at a time (as MaxText's `num_vocab_tiling`
    bounds it over the vocabulary): the float32 logits alive at once are `groups x chunk x vocab`,
    recomputed in the backward pass instead of kept. Without a chunk the slots are one chunk whose
    logits are kept for the backward pass (two matmuls fewer).

The gradient is written out (softmax minus one-hot, then two plain matmuls) rather than derived by
autodiff, which would build the one-hot by a scatter and take the kernel's gradient from a transposed
copy of the (positions, vocab) gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from data_pipelines.image_placeholder import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where the LM head runs (static: part of the compiled step's key).

    groups: row groups whose targets are pooled (the rows in `groups` runs of consecutive rows).
    slots: positions per group the head always computes, supervised ones first; None: every position
      in order, nothing moved.
    chunk: positions per head application; None: the slots (or every position) at once.
    """

    groups: int = 1
    slots: int | None = None
    chunk: int | None = None


def head_layout(labels_shape, *, slots_per_row: int = 0, chunk: int = 0, groups: int = 1) -> HeadLayout:
    """The layout for labels of `labels_shape` (rows, length), from config values and shapes only.

    Args:
      slots_per_row: supervised positions per row the head always computes (pooled over a group's rows);
        -1: `default_slots_per_row(length)`; 0: every position.
      chunk: positions per head application; 0: no chunking.
      groups: row groups (batch shards); must divide the rows.
    """
    rows, length = labels_shape
    if slots_per_row < -1 or chunk < 0:
        raise ValueError(f"head slots_per_row={slots_per_row} must be >= -1 and chunk={chunk} >= 0")
    if groups < 1 or rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} LM-head groups")
    per_row = resolve_slots_per_row(slots_per_row, length)
    slots = rows // groups * per_row if per_row < length - 1 else None  # None: every position
    return HeadLayout(groups=groups, slots=slots, chunk=chunk or None)


def resolve_slots_per_row(slots_per_row: int, length: int) -> int:
    """The positions per row the head computes at least, for the config value `train.head_slots_per_row`
    (-1: `default_slots_per_row(length)`; 0: every position) and prompts `length` long."""
    if slots_per_row == -1:
        return default_slots_per_row(length)
    return min(slots_per_row or length - 1, length - 1)


def default_slots_per_row(length: int) -> int:
    """A quarter of the positions of prompts `length` long (a multiple of 8, at least 16): what answers
    and captions take beside 512 vision tokens, and what the memory plans assume."""
    return min(length - 1, max(16, -(-(length - 1) // 32) * 8))


def summed_token_loss(kernel, hidden_states, labels, layout: HeadLayout = HeadLayout()):
    """Σ over supervised tokens of the next-token cross-entropy, and their number.

    Args:
      kernel: (embed, vocab) LM head (`Decoder.head_kernel`): logits = hidden @ kernel, in float32.
      hidden_states: (batch, length, embed), after the decoder's final norm.
      labels: (batch, length), IGNORE_INDEX where unsupervised; position t predicts labels[t + 1].
      layout: where the head runs; the value does not depend on it.
    """
    targets, hidden = labels[:, 1:], hidden_states[:, :-1]
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    groups = layout.groups
    hidden, targets, valid = (x.reshape(groups, -1, *x.shape[2:]) for x in (hidden, targets, valid))
    positions = hidden.shape[1]
    if layout.slots is not None:
        # Each group's supervised positions first, in order: the stable sort of "not supervised".
        order = jnp.argsort(~valid, axis=1, stable=True)
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets, valid = (jnp.take_along_axis(x, order, axis=1) for x in (targets, valid))
    always = layout.slots or positions
    size = layout.chunk or always
    padded = -(-positions // size) * size
    if padded > positions:
        pad = ((0, 0), (0, padded - positions))
        hidden = jnp.pad(hidden, pad + ((0, 0),))
        targets, valid = jnp.pad(targets, pad), jnp.pad(valid, pad)
    chunks = padded // size
    split = lambda x: x.reshape(groups, chunks, size, *x.shape[2:]).swapaxes(0, 1)
    hidden, targets, valid = split(hidden.astype(kernel.dtype)), split(jnp.where(valid, targets, 0)), split(valid)
    # Without slots every chunk is computed; with slots, those past the slots only when they hold a target.
    unconditional = chunks if layout.slots is None else math.ceil(always / size)
    keep_logits = layout.chunk is None and unconditional == 1
    return _head_loss(kernel, hidden, targets, valid, unconditional, keep_logits), count


def mean_token_loss(kernel, hidden_states, labels):
    """(mean next-token cross-entropy over supervised tokens, their number): transformers' causal-LM loss."""
    total, count = summed_token_loss(kernel, hidden_states, labels)
    return total / jnp.maximum(count, 1), count


# --- the head, chunk by chunk ------------------------------------------------------------------------
# hidden (chunks, groups, size, embed) in the kernel's dtype; targets (chunks, groups, size) in range;
# valid (chunks, groups, size). The first `unconditional` chunks always run, the others under a cond.


def _chunk_logits(kernel, hidden):
    logits = jnp.einsum("gce,ev->gcv", hidden, kernel, preferred_element_type=jnp.float32)
    return logits, jax.nn.logsumexp(logits, axis=-1)


def _chunk_loss(kernel, hidden, targets, valid):
    logits, log_norm = _chunk_logits(kernel, hidden)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(valid, log_norm - picked, 0.0).sum(), logits


def _chunk_grads(kernel, hidden, targets, valid, weight, logits=None):
    """(d kernel in float32, d hidden) of weight x the chunk's summed loss."""
    if logits is None:
        logits, log_norm = _chunk_logits(kernel, hidden)
    else:
        log_norm = jax.nn.logsumexp(logits, axis=-1)
    one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None]
    scale = jnp.where(valid, weight, 0.0)[..., None]
    grad_logits = ((jnp.exp(logits - log_norm[..., None]) - one_hot) * scale).astype(hidden.dtype)
    grad_kernel = jnp.einsum("gce,gcv->ev", hidden, grad_logits, preferred_element_type=jnp.float32)
    grad_hidden = jnp.einsum("gcv,ev->gce", grad_logits, kernel, preferred_element_type=jnp.float32)
    return grad_kernel, grad_hidden.astype(hidden.dtype)


def _each_chunk(body, init, xs):
    """`lax.scan` of body over the leading (chunk) axis, or nothing for no chunk."""
    if jax.tree.leaves(xs)[0].shape[0] == 0:
        return init, None
    return jax.lax.scan(body, init, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_loss(kernel, hidden, targets, valid, unconditional, keep_logits):
    return _head_loss_forward(kernel, hidden, targets, valid, unconditional, keep_logits)[0]


def _head_loss_forward(kernel, hidden, targets, valid, unconditional, keep_logits):
    kept = None
    if keep_logits:
        total, kept = _chunk_loss(kernel, hidden[0], targets[0], valid[0])
    else:
        def always(total, chunk):
            return total + _chunk_loss(kernel, *chunk)[0], None

        total, _ = _each_chunk(always, jnp.float32(0.0), (hidden[:unconditional], targets[:unconditional],
                                                         valid[:unconditional]))

    def when_targeted(total, chunk):
        loss = jax.lax.cond(jnp.any(chunk[2]), lambda c: _chunk_loss(kernel, *c)[0], lambda c: jnp.float32(0.0),
                            chunk)
        return total + loss, None

    rest = (hidden[unconditional:], targets[unconditional:], valid[unconditional:])
    total, _ = _each_chunk(when_targeted, total, rest)
    return total, (kernel, hidden, targets, valid, kept)


def _head_loss_backward(unconditional, keep_logits, residuals, cotangent):
    kernel, hidden, targets, valid, kept = residuals
    grad_kernel = jnp.zeros(kernel.shape, jnp.float32)

    def always(grad_kernel, chunk):
        chunk_kernel, chunk_hidden = _chunk_grads(kernel, *chunk, cotangent)
        return grad_kernel + chunk_kernel, chunk_hidden

    def when_targeted(grad_kernel, chunk):
        def skip(c):
            return jnp.zeros(kernel.shape, jnp.float32), jnp.zeros_like(c[0])

        chunk_kernel, chunk_hidden = jax.lax.cond(jnp.any(chunk[2]), lambda c: _chunk_grads(kernel, *c, cotangent),
                                                  skip, chunk)
        return grad_kernel + chunk_kernel, chunk_hidden

    head = (hidden[:unconditional], targets[:unconditional], valid[:unconditional])
    if keep_logits:
        grad_kernel, first = _chunk_grads(kernel, hidden[0], targets[0], valid[0], cotangent, kept)
        grad_head = first[None]
    else:
        grad_kernel, grad_head = jax.lax.scan(always, grad_kernel, head)  # at least one unconditional chunk
    rest = (hidden[unconditional:], targets[unconditional:], valid[unconditional:])
    grad_kernel, grad_rest = _each_chunk(when_targeted, grad_kernel, rest)
    grad_hidden = grad_head if grad_rest is None else jnp.concatenate([grad_head, grad_rest])
    return grad_kernel.astype(kernel.dtype), grad_hidden, None, None


_head_loss.defvjp(_head_loss_forward, _head_loss_backward)
