"""One optimizer update, and one evaluation, of Med-2E3 under `jit`.

Gradient accumulation weighs every supervised token equally, exactly as one big batch would: each
micro-batch contributes the *sum* of its token losses and its token count, and the gradient is divided
by the total count once at the end (the mean of micro-batch means would over-weight short answers).
Only the trainable parameters (the optimizer's `wrt` filter) are differentiated; the frozen ones enter
the loss as constants, so XLA computes no gradient for them.

The LM head runs on the supervised positions only (`summed_token_loss`): most of a Med-2E3 prompt is
vision tokens, question and padding, and the head (embed x vocab, vocab 32064) on every position is
then most of the step's work at small widths. The rows of a micro-batch are pooled into one group per
batch shard (one group without a mesh), and each group's targets are gathered into a number of slots
taken from a short ladder (static shapes: one compiled variant per rung used), so a batch pays for the
targets it has, not for its longest answer times its rows; a group whose rung would reach its number of
positions takes the all-positions path instead. `head_slots` decides on the host, and the loss is the
same either way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from med2e3_jax import sharding
from med2e3_jax.config import IGNORE_INDEX

_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
MODEL_INPUTS = ("volume", "input_ids", "attention_mask", "labels", "question_ids", "question_mask")


def train_step(model, optimizer, batch, dropout_key, *, micro_batches: int = 1) -> dict:
    """Updates `model` and `optimizer` in place from one global batch; returns scalar metrics.

    Args:
      model: a `Med2E3`.
      optimizer: from `train.state.make_optimizer(model, ...)`.
      batch: dict with volume (batch, 1, slices, height, width), input_ids / labels / attention_mask
        (batch, length), question_ids / question_mask (batch, question_length); other keys (e.g.
        record_index) are ignored. batch = micro_batches x micro-batch size.
      dropout_key: PRNG key of the run; the step number and the micro-batch index are folded in.
      micro_batches: gradient accumulation steps.

    Returns:
      dict of scalars: loss (mean over the supervised tokens of the whole batch), grad_norm (before
      clipping), learning_rate (of this update), target_tokens, slice_score_entropy (mean over samples
      of the entropy of the TG-IS slice scores, in nats).

    The model's and optimizer's buffers are donated: arrays taken from them before the call are invalid
    after it (copy them first).
    """
    inputs = _model_inputs(batch, micro_batches)
    # One graph traversal here and a plain `jax.jit` below: `nnx.jit` would traverse model and optimizer
    # on every call, which costs as much as a tiny model's whole step.
    graphdef, state = nnx.split((model, optimizer))
    mesh = _mesh_of(inputs)
    slots = head_slots(inputs["labels"], micro_batches=micro_batches, mesh=mesh)
    state, metrics = _train_step(_GraphKey(graphdef), state, inputs, dropout_key, micro_batches=micro_batches,
                                 mesh=mesh, slots=slots)
    nnx.update((model, optimizer), state)
    return metrics


def lower_train_step(model, optimizer, batch, dropout_key, *, micro_batches: int = 1):
    """`jax.stages.Lowered` of the step (e.g. `.compile().cost_analysis()` for its FLOPs).

    The model, optimizer and batch may be abstract (`jax.ShapeDtypeStruct`s, with shardings): the step
    is then lowered with `target_slots` LM-head slots per row (`head_slots`).
    """
    inputs = _model_inputs(batch, micro_batches)
    graphdef, state = nnx.split((model, optimizer))
    mesh = _mesh_of(inputs)
    slots = head_slots(inputs["labels"], micro_batches=micro_batches, mesh=mesh)
    return _train_step.lower(_GraphKey(graphdef), state, inputs, dropout_key, micro_batches=micro_batches,
                             mesh=mesh, slots=slots)


class _GraphKey:
    """A GraphDef as a static `jit` argument: it may hold unhashable attributes (the model's ConfigDict),
    so hash its shape and compare it whole (0.2 ms for Med2E3 and its optimizer)."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash((len(graphdef.nodes), len(graphdef.attributes), graphdef.num_leaves))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _GraphKey) and (self.graphdef is other.graphdef or self.graphdef == other.graphdef)


def _model_inputs(batch, micro_batches):
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    rows = inputs["input_ids"].shape[0]
    if micro_batches < 1 or rows % micro_batches:
        raise ValueError(f"batch of {rows} rows does not split into micro_batches={micro_batches}")
    return inputs


def eval_step(model, batch) -> dict:
    """Deterministic loss on a batch: dict(loss (mean over supervised tokens), target_tokens)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    return _eval_step(model, inputs, slots=head_slots(inputs["labels"], mesh=_mesh_of(inputs)))


def slice_score_entropy(scores):
    """(batch, slices) scores summing to 1 -> (batch,) entropy in nats (log(slices) when uniform)."""
    scores = scores.astype(jnp.float32)
    return -jnp.sum(jnp.where(scores > 0, scores * jnp.log(jnp.where(scores > 0, scores, 1.0)), 0.0), axis=-1)


def target_slots(length: int) -> int:
    """LM-head slots per row that `memory.estimate` plans for and abstract lowering assumes, for prompts
    `length` long: a quarter of the positions (a multiple of 8, at least 16), which answers and captions
    fit in beside 512 vision tokens. A batch with more targets takes more (`head_slots`)."""
    return min(length - 1, max(16, -(-(length - 1) // 32) * 8))


def slot_rungs(most: int):
    """The ladder of slot counts: 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5 times them), up to the
    first rung of at least `most`. At most a third of the head is spent on empty slots, and a batch mix
    whose target count varies uses two or three rungs (compiled variants), not one per count."""
    rung, rungs = 8, []
    while True:
        for value in (rung, rung * 3 // 2):
            rungs.append(value)
            if value >= most:
                return rungs
        rung *= 2


def batch_groups(rows: int, mesh: Mesh | None) -> int:
    """Row groups the LM head pools targets over: one per batch shard, so that no group spans devices
    (the greatest common divisor with `rows` when the shards do not divide a micro-batch evenly)."""
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    return math.gcd(rows, shards)


def head_slots(labels, *, micro_batches: int = 1, mesh: Mesh | None = None) -> tuple[int, int] | None:
    """(groups, slots per group) for `summed_token_loss`, or None (the head on every position).

    Each micro-batch's rows (`_split_micro_batches`) are split into `batch_groups` runs of consecutive
    rows; the slots are the smallest rung of `slot_rungs` that holds the targets of the fullest run, and
    None when that rung is not smaller than a run's number of positions. Decided on the host, from this
    process's rows and, with several processes, all of theirs, so that the step needs no `lax.cond`:
    under XLA:CPU a cond around the head costs more than the head.

    Args:
      labels: (batch, length) numpy or jax array (a global array: this process's shards are read), or a
        `jax.ShapeDtypeStruct` (lowering on abstract inputs: `target_slots` per row).
      micro_batches: gradient accumulation steps (the step splits `labels` into them).
      mesh: the mesh the batch is split over, if any.
    """
    rows, length = labels.shape
    micro_rows = rows // micro_batches
    groups = batch_groups(micro_rows, mesh)
    positions = micro_rows // groups * (length - 1)
    if isinstance(labels, jax.ShapeDtypeStruct):
        slots = micro_rows // groups * target_slots(length)
    else:
        counts = _row_target_counts(labels)
        runs = counts.reshape(micro_rows, micro_batches).T.reshape(micro_batches, groups, -1).sum(axis=-1)
        slots = slot_rungs(int(runs.max(initial=0)))[-1]
    return (groups, slots) if slots < positions else None


def _row_target_counts(labels) -> np.ndarray:
    """(batch,) supervised positions per row (the first position is never a target)."""
    def per_row(rows):
        return (np.asarray(rows)[:, 1:] != IGNORE_INDEX).sum(axis=1)

    if not isinstance(labels, jax.Array):
        return per_row(labels)
    # A global array: each process sees its shards' rows; a row nobody here holds counts 0, and the
    # elementwise max over processes fills it in (a row held twice has the same count both times).
    counts = np.zeros(labels.shape[0], np.int32)
    for shard in labels.addressable_shards:
        rows = shard.index[0]
        counts[rows] = np.maximum(counts[rows], per_row(shard.data))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.max(np.asarray(multihost_utils.process_allgather(counts)), axis=0)
    return counts


def summed_token_loss(kernel, hidden_states, labels, *, slots: tuple[int, int] | None = None):
    """Σ over supervised tokens of the next-token cross-entropy, and their number.

    The same loss as `models.merge.causal_lm_loss` (times its count), with the LM head applied only
    where a target exists (see the module docstring).

    Args:
      kernel: (embed, vocab), the LM head (`Decoder.head_kernel`): logits = hidden @ kernel, in float32.
      hidden_states: (batch, length, embed), after the final norm.
      labels: (batch, length), IGNORE_INDEX where unsupervised.
      slots: None: the head on every position; (groups, per_group): the rows split into `groups` runs
        of consecutive rows, the head on each run's first `per_group` supervised positions, which must
        be all of them (`head_slots` checks that).
    """
    targets, hidden = labels[:, 1:], hidden_states[:, :-1]
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    if slots is not None:
        groups, per_group = slots
        hidden, targets, valid = (x.reshape(groups, -1, *x.shape[2:]) for x in (hidden, targets, valid))
        # Each run's supervised positions first, in order (a stable sort of "not valid").
        order = jnp.argsort(~valid, axis=1, stable=True)[:, :per_group]
        pick = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
        hidden, targets, valid = pick(hidden), pick(targets), pick(valid)
    valid = valid.reshape(-1)
    targets = jnp.where(valid, targets.reshape(-1), 0)
    total = head_cross_entropy(kernel, hidden.reshape(-1, hidden.shape[-1]).astype(kernel.dtype), targets, valid)
    return total, count


@jax.custom_vjp
def head_cross_entropy(kernel, hidden, targets, valid):
    """Σ over the `valid` rows of -log softmax(hidden @ kernel)[target], the logits in float32.

    kernel (embed, vocab), hidden (n, embed), targets and valid (n,). The gradient is written out
    (softmax minus one-hot, then two plain matmuls): differentiated automatically, XLA:CPU builds the
    one-hot by a scatter and the kernel's gradient from a transposed copy of the (n, vocab) gradient,
    which takes twice as long.
    """
    return _head_forward(kernel, hidden, targets, valid)[0]


def _head_forward(kernel, hidden, targets, valid):
    logits = (hidden @ kernel).astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.where(valid, log_norm - picked, 0.0).sum(), (kernel, hidden, logits, log_norm, targets, valid)


def _head_backward(residuals, cotangent):
    kernel, hidden, logits, log_norm, targets, valid = residuals
    one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
    weight = jnp.where(valid, cotangent, 0.0)[:, None]
    grad_logits = ((jnp.exp(logits - log_norm[:, None]) - one_hot) * weight).astype(hidden.dtype)
    return (hidden.T @ grad_logits).astype(kernel.dtype), (grad_logits @ kernel.T).astype(hidden.dtype), None, None


head_cross_entropy.defvjp(_head_forward, _head_backward)


def _forward(model, inputs, *, slots, deterministic, rngs=None):
    """(Σ token losses, supervised tokens, slice scores); the LM head only where there are targets."""
    out = model(
        inputs["volume"], inputs["input_ids"], inputs["attention_mask"], None,
        inputs.get("question_ids"), inputs.get("question_mask"), deterministic=deterministic, rngs=rngs,
    )
    total, count = summed_token_loss(model.llm.head_kernel(), out.hidden_states, inputs["labels"], slots=slots)
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


@functools.partial(jax.jit, static_argnums=0, static_argnames=("micro_batches", "mesh", "slots"), donate_argnums=1)
def _train_step(graph_key, state, inputs, dropout_key, *, micro_batches, mesh, slots):
    model, optimizer = nnx.merge(graph_key.graphdef, state)
    graphdef, trainable, frozen = nnx.split(model, optimizer.wrt, ...)
    step_key = jax.random.fold_in(dropout_key, optimizer.step[...])

    def summed_loss(trainable, micro, key):
        total, count, scores = _forward(nnx.merge(graphdef, trainable, frozen), micro, slots=slots,
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
        # XLA:CPU runs a while loop's body far slower than straight-line code (+100 ms a step at the
        # tiny config), so unroll there; accelerators keep the loop (compile time, code size).
        unroll = micro_batches if jax.default_backend() == "cpu" else 1
        (grads, loss_sum, count, entropy_sum), _ = jax.lax.scan(
            accumulate, init, (jnp.arange(micro_batches), micro), unroll=unroll
        )
    total = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, trainable)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    if mesh is not None:
        _keep_placement(model, mesh)
        _keep_placement(optimizer, mesh)
    return nnx.state((model, optimizer)), dict(
        loss=loss_sum / total,
        grad_norm=grad_norm,
        learning_rate=_learning_rate(optimizer.opt_state),
        target_tokens=count,
        slice_score_entropy=entropy_sum / inputs["input_ids"].shape[0],
    )


@nnx.jit(static_argnames="slots")
def _eval_step(model, inputs, *, slots):
    total, count, _ = _forward(model, inputs, slots=slots, deterministic=True)
    return dict(loss=total / jnp.maximum(count, 1), target_tokens=count)
