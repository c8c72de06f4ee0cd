"""The training recipe (the authors' two stages), the device mesh, the layout, and the experiment config
that `configs/*.py` return: `model`, `data`, `train`, `mesh`, `sharding`, `distributed`.

`validate_experiment_config` checks the values the training loop divides by, counts with or hands to
the optimizer before a model is built, and names the key at fault (`ConfigError`)."""

from __future__ import annotations

import math
import numbers

import ml_collections

from med2e3_jax.config import ConfigError, num_vision_tokens, validate_model_config
from med2e3_jax.data_config import data_config
from med2e3_jax.lora import lora_config

STAGES = ("pretrain", "finetune", "finetune_lora")

# Top-level Med2E3 submodules each stage trains; everything else is frozen (no gradient, no optimizer
# state). M3D-CLIP's ViT and BERT stay frozen in every stage. `finetune_lora` also trains the adapters
# that `train.lora` puts on the frozen LLM (med2e3_jax/lora.py).
TRAINABLE = {
    "pretrain": ("vision2d_connector", "vision3d_connector", "tgis"),
    "finetune": ("llm", "vision2d", "vision2d_connector", "vision3d_connector", "tgis"),
    "finetune_lora": ("vision2d_connector", "vision3d_connector", "tgis"),
}



def train_config(stage: str) -> ml_collections.ConfigDict:
    """The authors' scripts: pretrain lr 1e-4, 3 epochs, batch 64; finetune lr 5e-5, 4 epochs, batch
    128 (2 x 32 x accumulation 2); AdamW, no weight decay, 3% warmup, cosine, clip 1.0. finetune_lora:
    finetune's batches with LoRA's usual learning rate, 2e-4."""
    if stage not in STAGES:
        raise ValueError(f"training stage must be one of {STAGES}, got {stage!r}")
    pretrain = stage == "pretrain"
    return ml_collections.ConfigDict(
        dict(
            stage=stage,
            trainable=tuple(TRAINABLE[stage]),  # a tuple: --config.train.trainable="('llm', 'tgis')" overrides it
            steps=1000,
            learning_rate={"pretrain": 1e-4, "finetune": 5e-5, "finetune_lora": 2e-4}[stage],
            warmup_ratio=0.03,
            weight_decay=0.0,
            adam_b1=0.9,
            adam_b2=0.999,
            adam_eps=1e-8,
            grad_clip=1.0,
            global_batch_size=64 if pretrain else 128,
            micro_batches=1 if pretrain else 2,  # gradient accumulation
            # The LM head (models/lm_loss.py): supervised positions per row it always computes, pooled per
            # batch shard (-1: a quarter of the positions; 0: every position); a batch with more runs
            # further chunks, none is dropped. head_chunk bounds the positions per head application (its
            # float32 logits: chunk x vocab x 4 bytes per group), recomputed in the backward pass; 0: none.
            head_slots_per_row=-1,
            head_chunk=0,
            log_every=10,
            # jax.transfer_guard_device_to_host level for the steps between log points: 'disallow_explicit'
            # makes any read of the devices there an error (the loop never needs one).
            transfer_guard="allow",
            seed=0,
            checkpoint_every=500,
            keep_checkpoints=3,
            async_checkpointing=True,
            base_checkpoint="",  # Orbax params (scripts/convert_checkpoint.py) holding the frozen weights
            # Or pretrained components over the seeded init: PyTorch/HF checkpoints (file or folder) per
            # component of `med2e3_jax.checkpoint.med2e3_port.COMPONENTS`, e.g. the fetched MiniLM as
            # `question_encoder` (the model config must have its sizes; the import checks every shape).
            components=dict(llm="", siglip="", m3d_clip="", vit3d="", question_encoder=""),
            init_from="",  # a previous stage's workdir whose trainable weights start this stage
            export_model=True,  # write the finished model to WORKDIR/model for generate/evaluate
            lora=lora_config(),  # the adapters of finetune_lora (med2e3_jax/lora.py); other stages ignore it
        )
    )


TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")


def _int_at_least(train, name: str, low: int, why: str = "") -> None:
    value = train[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"train.{name}={value!r}: expected an integer >= {low}{why}", key=f"train.{name}")


def _number_in(train, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    value = train[name]
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"train.{name}={value!r}: expected a finite number in {interval}", key=f"train.{name}")


def validate_train_config(train: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the `train.*` key whose value the loop or the optimizer cannot use."""
    if train.stage not in STAGES:
        raise ConfigError(f"train.stage={train.stage!r}: expected one of {STAGES}", key="train.stage")
    _int_at_least(train, "steps", 1, " (the number of optimizer steps to train)")
    _int_at_least(train, "log_every", 1, " (steps between metric reads)")
    _int_at_least(train, "checkpoint_every", 1, " (steps between checkpoints; the last step is always saved)")
    if train.keep_checkpoints is not None:
        _int_at_least(train, "keep_checkpoints", 1, ", or None to keep every checkpoint")
    _int_at_least(train, "global_batch_size", 1)
    _int_at_least(train, "micro_batches", 1)
    if train.global_batch_size % train.micro_batches:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} does not split into "
                          f"train.micro_batches={train.micro_batches} equal micro-batches", key="train.micro_batches")
    _int_at_least(train, "head_slots_per_row", -1, " (-1: a quarter of the positions, 0: all)")
    _int_at_least(train, "head_chunk", 0, " (0: no chunking)")
    _int_at_least(train, "seed", 0)
    _number_in(train, "learning_rate", 0, math.inf, low_open=True, high_open=True)
    _number_in(train, "warmup_ratio", 0, 1)
    _number_in(train, "weight_decay", 0, math.inf, high_open=True)
    if train.grad_clip is not None:  # None or 0: no clipping
        _number_in(train, "grad_clip", 0, math.inf, high_open=True)
    _number_in(train, "adam_b1", 0, 1, high_open=True)
    _number_in(train, "adam_b2", 0, 1, high_open=True)
    _number_in(train, "adam_eps", 0, math.inf, low_open=True, high_open=True)
    if train.transfer_guard not in TRANSFER_GUARDS:
        raise ConfigError(f"train.transfer_guard={train.transfer_guard!r}: expected one of {TRANSFER_GUARDS}",
                          key="train.transfer_guard")


def validate_experiment_config(config: ml_collections.ConfigDict) -> None:
    """The model, the training recipe and the mesh of an experiment config; raises ConfigError naming
    the first key whose value cannot work."""
    validate_model_config(config.model)
    validate_train_config(config.train)
    for axis, size in config.mesh.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis}={size!r}: expected a positive integer, or -1 for the remaining devices",
                              key=f"mesh.{axis}")


def mesh_config() -> ml_collections.ConfigDict:
    """Mesh axis sizes; -1 takes the remaining devices."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def sharding_config() -> ml_collections.ConfigDict:
    """The layout: `logical_axis_rules` maps each logical axis name to the mesh axes it is split over.

    Parameters declare the logical axes of their dimensions where the models create them, and the
    models constrain their activations by logical name (`med2e3_jax/sharding.py`); this table alone
    decides where each lands, so a new layout is a config change. One rule is overridden by name, e.g.
    `--config.sharding.logical_axis_rules.heads=fsdp,tensor` (docs/sharding.md). Mesh axes are tried
    in order; an empty tuple replicates. The `encoder_*` names are the three encoders' (M3D-CLIP's
    ViT, SigLIP, BERT), the others the LLM's and the connectors' LLM side.
    """
    return ml_collections.ConfigDict(
        dict(
            logical_axis_rules=dict(
                # Rows of the batch and of the LLM's activations.
                batch=("data", "fsdp"),
                embed=("fsdp",),
                heads=("tensor",),
                kv_heads=("tensor",),
                mlp=("tensor",),
                # Vocabulary rows split over fsdp too: the token embeddings must not split `embed`.
                vocab=("tensor", "fsdp"),
                # Rows of the encoders' activations: volumes, slices folded into the batch, questions.
                encoder_batch=("data", "fsdp"),
                encoder_embed=("fsdp",),
                encoder_heads=("tensor",),
                encoder_mlp=("tensor",),
                encoder_vocab=("tensor", "fsdp"),
            )
        )
    )


def apply_overrides(config: ml_collections.ConfigDict, overrides, *, where: str = "overrides") -> None:
    """Sets each dotted path of `overrides` ({'mesh.fsdp': 8, ...}) in `config`, in place, as
    `--config.<path>=<value>` would; a path the config lacks is an error naming `where` and the path."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node:
                raise KeyError(f"{where}: {path!r} names {'.'.join(parents[:depth + 1])!r}, which the config lacks")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"{where}: {path!r} names a field the config lacks; {'.'.join(parents) or 'config'} "
                           f"has {sorted(node)}")
        node[leaf] = value


def distributed_config() -> ml_collections.ConfigDict:
    """Multi-process runs: `jax.distributed.initialize` is called when num_processes > 1."""
    return ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=1, process_id=0, cpu_collectives="gloo")
    )


def experiment_config(model: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model
    config.data = data_config()
    config.data.volume_shape = tuple(model.vision3d.img_size)
    config.data.max_length = model.llm_max_length
    config.data.num_vision_tokens = num_vision_tokens(model)
    config.train = train_config(stage)
    config.mesh = mesh_config()
    config.sharding = sharding_config()
    config.distributed = distributed_config()
    return config
