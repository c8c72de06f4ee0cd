"""What one device holds during a training step: XLA's figures for the compiled step, and an estimate
counted from the config alone.

`lower_abstract_train_step` lowers the trainer's own step (`train.step`) for a config on a mesh
without allocating anything: the model and optimizer come from `nnx.eval_shape`, every array is a
`jax.ShapeDtypeStruct` carrying the sharding the trainer gives it. `xla_memory` reads the compiled
step's per-device memory analysis. `estimate` counts the same memory from the config, so that each
checks the other (`scripts/memory_plan.py` prints both). The estimate has four parts, all per device:

  - parameters: every weight in `model.param_dtype` (float32 master weights), split over
    fsdp x tensor;
  - gradients: the trainable weights in float32 (the step accumulates micro-batch gradients in
    float32), split the same way;
  - optimizer state: AdamW's two moments of the trainable weights, float32, split the same way;
  - activations of one micro-batch (the step runs micro-batches one after the other), under
    `model.remat_policy`, in the compute dtype (`model.dtype`), the batch split over data x fsdp
    and the attention heads and MLP units over tensor:
      * towers the backward pass goes through (the LLM in both stages, since the connectors'
        gradient flows back through it; SigLIP when it trains) keep per layer what the policy saves
        ('full': the layer input; 'dots': also the outputs of the weight matmuls; 'none':
        everything, softmax scores included), plus one layer's full working set while it is
        recomputed and differentiated;
      * frozen towers with nothing trainable before them (M3D-CLIP's ViT, BERT; SigLIP in
        pretrain) run forward only: one layer's working set at a time;
      * the vision tokens (slice tokens, connectors) and the LM head on the supervised slots.

What the estimate leaves out: XLA's own temporaries (fusion buffers, collectives' staging
buffers, the all-gathered weights of the layer in flight under FSDP, or of every layer when the
compiler hoists the gathers out of the micro-batch loop), which the compiled step's memory analysis
includes. Its purpose is the order of magnitude and the split between the parts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax import config as config_lib
from med2e3_jax import sharding
from med2e3_jax.models.lm_loss import resolve_slots_per_row
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.models.rope import head_dim as llm_head_dim
from med2e3_jax.train import state as state_lib
from med2e3_jax.train import step as step_lib

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ADAM_MOMENTS = 2


def _dtype_bytes(name: str) -> int:
    if name not in _BYTES:
        raise ValueError(f"dtype {name!r} has no known size; expected one of {sorted(_BYTES)}")
    return _BYTES[name]


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layer_norm(width: int) -> int:
    return 2 * width  # scale and bias


def param_counts(model_cfg) -> dict[str, int]:
    """Parameters of each top-level Med2E3 submodule (the names `train.trainable` uses), from the config.

    Only the submodules the config builds appear (the TG-IS ablations drop `vision2d`, `tgis`,
    `question_encoder`).
    """
    v3, v2, q, llm = model_cfg.vision3d, model_cfg.vision2d, model_cfg.question_encoder, model_cfg.llm
    embed = llm.hidden_size
    uses_slices = model_cfg.tgis.vision_tokens in ("3d+2d", "2d")
    uses_question = uses_slices and model_cfg.tgis.slice_weighting == "tgis"

    patches_3d = math.prod(s // p for s, p in zip(v3.img_size, v3.patch_size))
    h3 = v3.hidden_size
    vit_block = (2 * _layer_norm(h3) + _linear(h3, 3 * h3, bias=False) + _linear(h3, h3)
                 + _linear(h3, v3.mlp_dim) + _linear(v3.mlp_dim, h3))
    counts = {
        "vision3d": (_linear(v3.in_channels * math.prod(v3.patch_size), h3) + patches_3d * h3 + h3
                     + v3.num_layers * vit_block),
        "vision3d_connector": _linear(h3, embed) + _linear(embed, embed),
    }
    if uses_slices:
        h2 = v2.hidden_size
        siglip_layer = (2 * _layer_norm(h2) + 4 * _linear(h2, h2) + _linear(h2, v2.intermediate_size)
                        + _linear(v2.intermediate_size, h2))
        counts["vision2d"] = (_linear(v2.num_channels * v2.patch_size**2, h2)
                              + (v2.image_size // v2.patch_size) ** 2 * h2 + v2.num_layers * siglip_layer)
        counts["vision2d_connector"] = _linear(h2, embed) + _linear(embed, embed)
    if uses_question:
        counts["tgis"] = _linear(q.hidden_size, embed)  # text_mlp
        hq = q.hidden_size
        bert_layer = (4 * _linear(hq, hq) + 2 * _layer_norm(hq) + _linear(hq, q.intermediate_size)
                      + _linear(q.intermediate_size, hq))
        counts["question_encoder"] = ((q.vocab_size + q.max_position_embeddings + q.type_vocab_size) * hq
                                      + _layer_norm(hq) + q.num_layers * bert_layer + _linear(hq, hq))
    head = llm_head_dim(llm)
    q_size, kv_size = llm.num_heads * head, llm.num_kv_heads * head
    decoder_layer = (2 * embed + _linear(embed, q_size + 2 * kv_size, bias=llm.qkv_bias)
                     + _linear(q_size, embed, bias=False) + _linear(embed, 2 * llm.intermediate_size, bias=False)
                     + _linear(llm.intermediate_size, embed, bias=False))
    counts["llm"] = (llm.vocab_size * embed * (1 if llm.tie_word_embeddings else 2) + llm.num_layers * decoder_layer
                     + embed)
    return counts


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device; `activations` itemised in `activation_parts`."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activation_parts: dict[str, int]
    trainable_parameters: int
    total_parameters: int
    micro_batch_per_device: float

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclasses.dataclass(frozen=True)
class _Tower:
    """A transformer stack as the activation count sees it, per sequence."""

    layers: int
    tokens: int  # per sequence
    width: int  # residual stream
    qkv: int  # output width of the q, k, v projections together
    attention: int  # width of the attention output (heads x head_dim)
    heads: int
    mlp_in: int  # output width of the first MLP matmul(s) (2 x intermediate for gated MLPs)
    mlp_hidden: int  # width after the activation (intermediate)


def _layer_bytes(t: _Tower, policy: str, act: int, tensor: int) -> int:
    """Activation bytes one layer keeps per sequence for the backward pass under `policy`.

    `act` is the compute dtype's size; the softmax runs in float32 (its logits and probabilities
    both kept under 'none'); heads and MLP units are split over `tensor`.
    """
    split = lambda width: width // tensor if width % tensor == 0 else width  # noqa: E731
    if policy == "full":
        return t.tokens * t.width * act
    matmul_outputs = t.tokens * (split(t.qkv) + t.width + split(t.mlp_in) + t.width) * act
    if policy == "dots":
        return t.tokens * t.width * act + matmul_outputs
    # 'none': also the norms' outputs, the residual sums, the attention output, the activation's
    # output and the gated product, and the scores.
    elementwise = t.tokens * (4 * t.width + split(t.attention) + 2 * split(t.mlp_hidden)) * act
    scores = split(t.heads) * t.tokens * t.tokens * (4 + act)
    return matmul_outputs + elementwise + scores


def estimate(config, *, mesh_shape: dict[str, int] | None = None) -> MemoryEstimate:
    """Per-device memory of `scripts/train.py`'s step for an experiment config.

    Args:
      config: an experiment config (`configs/*.py`): model, data, train, mesh.
      mesh_shape: axis sizes {data, fsdp, tensor}; `config.mesh` when None (no -1 allowed then).
    """
    model, train = config.model, config.train
    mesh_shape = dict(mesh_shape or {a: int(config.mesh[a]) for a in ("data", "fsdp", "tensor")})
    if any(v < 1 for v in mesh_shape.values()):
        raise ValueError(f"mesh sizes must be resolved to positive numbers, got {mesh_shape}")
    data, fsdp, tensor = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    counts = param_counts(model)
    trainable = sum(counts.get(name, 0) for name in train.trainable)
    total = sum(counts.values())
    param_bytes, act = _dtype_bytes(model.param_dtype), _dtype_bytes(model.dtype)
    weight_split = fsdp * tensor

    rows = train.global_batch_size / train.micro_batches / (data * fsdp)
    policy = model.get("remat_policy", "none")
    v3, v2, q, llm = model.vision3d, model.vision2d, model.question_encoder, model.llm
    slices = config_lib.num_slices(model)
    slice_tokens = (v2.image_size // v2.patch_size) ** 2
    patches_3d = math.prod(s // p for s, p in zip(v3.img_size, v3.patch_size))
    head = llm_head_dim(llm)
    length = model.llm_max_length
    towers = {
        "llm": (_Tower(llm.num_layers, length, llm.hidden_size, (llm.num_heads + 2 * llm.num_kv_heads) * head,
                       llm.num_heads * head, llm.num_heads, 2 * llm.intermediate_size, llm.intermediate_size), 1),
        "vision2d": (_Tower(v2.num_layers, slice_tokens, v2.hidden_size, 3 * v2.hidden_size, v2.hidden_size,
                            v2.num_heads, v2.intermediate_size, v2.intermediate_size), slices),
        "vision3d": (_Tower(v3.num_layers, patches_3d + 1, v3.hidden_size, 3 * v3.hidden_size, v3.hidden_size,
                            v3.num_heads, v3.mlp_dim, v3.mlp_dim), 1),
        "question_encoder": (_Tower(q.num_layers, config.data.question_max_length, q.hidden_size, 3 * q.hidden_size,
                                    q.hidden_size, q.num_heads, q.intermediate_size, q.intermediate_size), 1),
    }
    # The backward pass reaches the LLM in both stages (the connectors' gradient flows through it) and
    # a vision tower only when it trains; the rest runs forward, one layer alive at a time.
    backward = {"llm"} | ({"vision2d"} & set(train.trainable))
    parts = {}
    working_sets = [0]
    for name, (tower, sequences) in towers.items():
        if name not in counts:
            continue
        per_sequence_layer = _layer_bytes(tower, "none", act, tensor)
        if name in backward:
            kept = tower.layers * _layer_bytes(tower, policy, act, tensor)
            parts[name] = int(rows * sequences * kept)
            # Recomputing and differentiating one layer: its activations and their gradients.
            working_sets.append(int(rows * sequences * 2 * per_sequence_layer))
        else:
            working_sets.append(int(rows * sequences * per_sequence_layer))
    embed = llm.hidden_size
    vision = slice_tokens * slices * (v2.hidden_size + 2 * embed) if "vision2d" in counts else 0
    vision += config_lib.num_vision_tokens(model) * embed
    parts["vision_tokens"] = int(rows * vision * act)
    # float32 logits and their gradient where the LM head runs (models/lm_loss.py): the configured slots
    # per row, at most one chunk of them at a time when the head is chunked.
    head_positions = rows * resolve_slots_per_row(train.head_slots_per_row, length)
    if train.head_chunk:
        head_positions = min(head_positions, train.head_chunk)
    parts["lm_head"] = int(head_positions * llm.vocab_size * 4 * 2 / tensor)
    parts["layer_working_set"] = max(working_sets)
    return MemoryEstimate(
        parameters=int(total * param_bytes / weight_split),
        gradients=int(trainable * 4 / weight_split),
        optimizer=int(trainable * 4 * _ADAM_MOMENTS / weight_split),
        activations=sum(parts.values()),
        activation_parts=parts,
        trainable_parameters=trainable,
        total_parameters=total,
        micro_batch_per_device=rows,
    )


# --- the compiled step ---------------------------------------------------------------------------


def abstract_train_state(config, mesh):
    """(model, optimizer) of `config` whose arrays are `jax.ShapeDtypeStruct`s placed as the trainer
    places them (`sharding.param_shardings` under the config's rules); nothing is allocated."""

    def create():
        model = Med2E3(config.model, rngs=nnx.Rngs(0))
        return model, state_lib.make_optimizer(model, config.train)

    graphdef, state = nnx.split(nnx.eval_shape(create))
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        shardings = sharding.param_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return nnx.merge(graphdef, state)


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as the data pipeline delivers it (`data_pipelines.pipeline.stack_examples`),
    split over the batch axes: volume (batch, 1, slices, height, width) float32; input_ids, labels,
    attention_mask (batch, length) and question_ids, question_mask (batch, question_length) int32."""
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        split = sharding.batch_sharding(mesh)
    rows = config.train.global_batch_size
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=split)  # noqa: E731
    length, question = config.model.llm_max_length, config.data.question_max_length
    v3 = config.model.vision3d
    return dict(
        volume=spec((rows, v3.in_channels, *v3.img_size), jnp.float32),
        input_ids=spec((rows, length), jnp.int32),
        attention_mask=spec((rows, length), jnp.int32),
        labels=spec((rows, length), jnp.int32),
        question_ids=spec((rows, question), jnp.int32),
        question_mask=spec((rows, question), jnp.int32),
    )


def lower_abstract_train_step(config, mesh) -> jax.stages.Lowered:
    """The trainer's step (`train.step.lower_train_step`) for `config` on `mesh`, from abstract inputs,
    traced under the config's sharding rules as the trainer traces it."""
    model, optimizer = abstract_train_state(config, mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    train = config.train
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        return step_lib.lower_train_step(model, optimizer, abstract_batch(config, mesh), key,
                                         micro_batches=train.micro_batches,
                                         head_slots_per_row=train.head_slots_per_row, head_chunk=train.head_chunk)


def xla_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes per device from XLA's memory analysis of a compiled (SPMD-partitioned) step.

    total = arguments + outputs - aliased (outputs written into donated arguments) + temporaries +
    generated code: what the device holds at the step's peak.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend's compiler gives no memory analysis")
    figures = dict(
        arguments=analysis.argument_size_in_bytes,
        outputs=analysis.output_size_in_bytes,
        aliased=analysis.alias_size_in_bytes,
        temporaries=analysis.temp_size_in_bytes,
        generated_code=analysis.generated_code_size_in_bytes,
    )
    figures["total"] = (figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
                        + figures["generated_code"])
    return {k: int(v) for k, v in figures.items()}
