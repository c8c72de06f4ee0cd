"""One optimizer update, and one evaluation, of Med-2E3 under `jit`.

Gradient accumulation weighs every supervised token equally, exactly as one big batch would: each
micro-batch contributes the *sum* of its token losses and its token count, and the gradient is divided
by the total count once at the end (the mean of micro-batch means would over-weight short answers).
Only the trainable parameters (the optimizer's `wrt` filter) are differentiated; the frozen ones enter
the loss as constants, so XLA computes no gradient for them.

The loss is `models.lm_loss.summed_token_loss` over the decoder's final hidden states, the LM head laid
out by `head_layout` from config values (`train.head_slots_per_row`, `train.head_chunk`) and the batch's
static shape only: nothing is read back from the devices to build the step, so the host can dispatch
step N + 1 while step N runs, and one compiled step serves every batch of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from med2e3_jax import sharding
from med2e3_jax.models.lm_loss import HeadLayout, head_layout, summed_token_loss

_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
MODEL_INPUTS = ("volume", "input_ids", "attention_mask", "labels", "question_ids", "question_mask")


def make_train_step(model, optimizer, *, micro_batches: int = 1, head_slots_per_row: int = -1,
                    head_chunk: int = 0) -> Callable[[dict, jax.Array], dict]:
    """`step(batch, dropout_key) -> metrics`: updates `model` and `optimizer` in place, one global batch
    per call, without waiting for the devices (the metrics stay device arrays until read).

    Args:
      model: a `Med2E3`.
      optimizer: from `train.state.make_optimizer(model, ...)`.
      micro_batches: gradient accumulation steps; batch rows = micro_batches x micro-batch rows.
      head_slots_per_row, head_chunk: the LM head's layout (`models.lm_loss.head_layout`; -1: a quarter
        of the positions; 0: every position / no chunking).

    The step's batch: dict with volume (batch, 1, slices, height, width), input_ids / labels /
    attention_mask (batch, length), question_ids / question_mask (batch, question_length); other keys
    (e.g. record_index) are ignored. Its metrics: loss (mean over the supervised tokens of the whole
    batch), grad_norm (before clipping), learning_rate (of this update), target_tokens,
    slice_score_entropy (mean over samples of the entropy of the TG-IS slice scores, in nats).

    The model's and optimizer's buffers are donated: arrays taken from them before a call are invalid
    after it (copy them first). The graph of both is traversed once, here (`nnx.cached_partial`).
    """
    cached = nnx.cached_partial(_train_step, model, optimizer)

    def step(batch, dropout_key):
        inputs = _model_inputs(batch, micro_batches)
        mesh = _mesh_of(inputs)
        layout = train_head_layout(inputs["labels"].shape, micro_batches=micro_batches, mesh=mesh,
                                   slots_per_row=head_slots_per_row, chunk=head_chunk)
        return cached(inputs, dropout_key, micro_batches=micro_batches, layout=layout, mesh=mesh)

    return step


def train_step(model, optimizer, batch, dropout_key, *, micro_batches: int = 1, **head) -> dict:
    """One update of `model` and `optimizer` from `batch`: `make_train_step(...)(batch, dropout_key)`."""
    return make_train_step(model, optimizer, micro_batches=micro_batches, **head)(batch, dropout_key)


def lower_train_step(model, optimizer, batch, dropout_key, *, micro_batches: int = 1, head_slots_per_row: int = -1,
                     head_chunk: int = 0):
    """`jax.stages.Lowered` of the step (e.g. `.compile().cost_analysis()` for its FLOPs).

    The model, optimizer and batch may be abstract (`jax.ShapeDtypeStruct`s, with shardings): the layout
    of the LM head depends on shapes only, so the lowered step is the one a run compiles.
    """
    inputs = _model_inputs(batch, micro_batches)
    mesh = _mesh_of(inputs)
    layout = train_head_layout(inputs["labels"].shape, micro_batches=micro_batches, mesh=mesh,
                               slots_per_row=head_slots_per_row, chunk=head_chunk)
    return _train_step.lower(model, optimizer, inputs, dropout_key, micro_batches=micro_batches, layout=layout,
                             mesh=mesh)


def _model_inputs(batch, micro_batches):
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    rows = inputs["input_ids"].shape[0]
    if micro_batches < 1 or rows % micro_batches:
        raise ValueError(f"batch of {rows} rows does not split into micro_batches={micro_batches}")
    return inputs


def eval_step(model, batch, *, head_slots_per_row: int = -1, head_chunk: int = 0) -> dict:
    """Deterministic loss on a batch: dict(loss (mean over supervised tokens), target_tokens)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    layout = train_head_layout(inputs["labels"].shape, mesh=_mesh_of(inputs), slots_per_row=head_slots_per_row,
                               chunk=head_chunk)
    return _eval_step(model, inputs, layout=layout)


def slice_score_entropy(scores):
    """(batch, slices) scores summing to 1 -> (batch,) entropy in nats (log(slices) when uniform)."""
    scores = scores.astype(jnp.float32)
    return -jnp.sum(jnp.where(scores > 0, scores * jnp.log(jnp.where(scores > 0, scores, 1.0)), 0.0), axis=-1)


def batch_groups(rows: int, mesh: Mesh | None) -> int:
    """Row groups the LM head pools targets over: one per batch shard, so that no group spans devices
    (the greatest common divisor with `rows` when the shards do not divide a micro-batch evenly)."""
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    return math.gcd(rows, shards)


def train_head_layout(labels_shape, *, micro_batches: int = 1, mesh: Mesh | None = None, slots_per_row: int = -1,
                      chunk: int = 0) -> HeadLayout:
    """The LM head's layout for one micro-batch of a (batch, length) label array on `mesh`: its rows pooled
    per batch shard (`batch_groups`), `slots_per_row` and `chunk` as in `models.lm_loss.head_layout`."""
    rows, length = labels_shape
    micro_rows = rows // micro_batches
    return head_layout((micro_rows, length), slots_per_row=slots_per_row, chunk=chunk,
                       groups=batch_groups(micro_rows, mesh))


def _forward(model, inputs, *, layout, deterministic, rngs=None):
    """(Σ token losses, supervised tokens, slice scores)."""
    out = model(
        inputs["volume"], inputs["input_ids"], inputs["attention_mask"], None,
        inputs.get("question_ids"), inputs.get("question_mask"), deterministic=deterministic, rngs=rngs,
    )
    total, count = summed_token_loss(model.llm.head_kernel(), out.hidden_states, inputs["labels"], layout)
    return total, count, out.slice_scores


def _split_micro_batches(x, micro_batches: int):
    """(k * m, ...) -> (k, m, ...), micro-batch j taking rows j, k + j, 2k + j, ...: a device's contiguous
    shard of the batch then holds rows of every micro-batch, so no micro-batch waits on a few devices."""
    return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)


def _mesh_of(inputs) -> Mesh | None:
    mesh = getattr(getattr(inputs["input_ids"], "sharding", None), "mesh", None)
    return mesh if isinstance(mesh, Mesh) else None


def _keep_placement(node, mesh):
    """Constrains the updated arrays of `node` to the rules' shardings (`sharding.param_shardings`).

    Left free, XLA may return an array split differently from how it came in (a bias following its
    kernel's split), and the next call, seeing new input shardings, would compile again.
    """
    state = nnx.state(node)
    leaves, treedef = jax.tree.flatten(state)
    targets = jax.tree.leaves(sharding.param_shardings(state, mesh))
    placed = [jax.lax.with_sharding_constraint(leaf, target) for leaf, target in zip(leaves, targets)]
    nnx.update(node, jax.tree.unflatten(treedef, placed))


def _learning_rate(opt_state):
    """The learning rate `inject_hyperparams` recorded for the latest update."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _INJECTED)):
        if isinstance(leaf, _INJECTED):
            return jnp.asarray(leaf.hyperparams["learning_rate"][...], jnp.float32)
    return jnp.float32(jnp.nan)


@nnx.jit(static_argnames=("micro_batches", "layout", "mesh"), donate_argnums=(0, 1))
def _train_step(model, optimizer, inputs, dropout_key, *, micro_batches, layout, mesh):
    graphdef, trainable, frozen = nnx.split(model, optimizer.wrt, ...)
    step_key = jax.random.fold_in(dropout_key, optimizer.step[...])

    def summed_loss(trainable, micro, key):
        total, count, scores = _forward(nnx.merge(graphdef, trainable, frozen), micro, layout=layout,
                                        deterministic=False, rngs=nnx.Rngs(dropout=key))
        return total, (count, slice_score_entropy(scores).sum())

    def accumulate(carry, xs):
        grads, loss_sum, count, entropy_sum = carry
        index, micro = xs
        (micro_loss, (micro_count, micro_entropy)), micro_grads = jax.value_and_grad(summed_loss, has_aux=True)(
            trainable, micro, jax.random.fold_in(step_key, index)
        )
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        return (grads, loss_sum + micro_loss, count + micro_count, entropy_sum + micro_entropy), None

    if micro_batches == 1:
        (loss_sum, (count, entropy_sum)), grads = jax.value_and_grad(summed_loss, has_aux=True)(
            trainable, inputs, jax.random.fold_in(step_key, 0)
        )
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        init = (zeros, jnp.float32(0.0), jnp.int32(0), jnp.float32(0.0))
        micro = jax.tree.map(lambda x: _split_micro_batches(x, micro_batches), inputs)
        (grads, loss_sum, count, entropy_sum), _ = jax.lax.scan(accumulate, init, (jnp.arange(micro_batches), micro))
    total = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, trainable)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    if mesh is not None:
        _keep_placement(model, mesh)
        _keep_placement(optimizer, mesh)
    return dict(
        loss=loss_sum / total,
        grad_norm=grad_norm,
        learning_rate=_learning_rate(optimizer.opt_state),
        target_tokens=count,
        slice_score_entropy=entropy_sum / inputs["input_ids"].shape[0],
    )


@nnx.jit(static_argnames="layout")
def _eval_step(model, inputs, *, layout):
    total, count, _ = _forward(model, inputs, layout=layout, deterministic=True)
    return dict(loss=total / jnp.maximum(count, 1), target_tokens=count)
