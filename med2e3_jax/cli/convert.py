r"""Converts between the authors' PyTorch checkpoints and Orbax.

PyTorch -> Orbax, from a whole model (the authors' state_dict file, or their release layout of five
folders) or from pretrained components (HF LLM, HF SigLIP, M3D-CLIP or its bare ViT; the connectors
and TG-IS get a random init, as at the start of stage 1):

    med2e3-convert --config med2e3_m3d \
        --checkpoint /path/to/Med-2E3-M3D --out /path/to/orbax
    med2e3-convert --config med2e3_m3d \
        --llm /path/to/Phi-3-mini-128k-instruct --siglip /path/to/siglip-large-patch16-256 \
        --m3d_clip /path/to/M3D-CLIP --out /path/to/orbax

`--reference_config DIR/config.json` (a golden-fixture config) can stand in for `--config`.

Parameters are written in the config's `model.param_dtype` (float32 unless the config says otherwise);
add `--config.model.param_dtype=bfloat16` to keep a bf16 checkpoint in bf16, at half the size. The
conversion streams tensor by tensor into an abstract model and saves without a second copy: its peak
resident memory is about 1.1x the bytes of the parameters written (benchmarks/bench_convert.py).

Orbax -> PyTorch (module-path keys, one safetensors file, or the release layout with --layout=release):

    med2e3-convert --orbax /path/to/orbax --out model.safetensors

LoRA: a finetune_lora run's adapters merged into its base (exact in float32), and as a peft adapter
folder that `peft.PeftModel.from_pretrained` loads on the authors' model; a peft folder merged into an
Orbax base:

    med2e3-convert --lora_run runs/finetune_lora --out merged_orbax [--peft_out adapter/]
    med2e3-convert --peft adapter/ --orbax base_orbax --out merged_orbax
"""

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from med2e3_jax.cli import run_command
from med2e3_jax.checkpoint.importer import export_pytorch
from med2e3_jax.checkpoint.loading import export_med2e3, load_med2e3
from med2e3_jax.checkpoint.med2e3_port import FULL_TABLE, config_from_reference
from med2e3_jax.checkpoint.orbax_params import restore_params, save_params
from med2e3_jax.checkpoint.writers import write_release_layout

FLAGS = flags.FLAGS
COMPONENT_FLAGS = ("llm", "siglip", "m3d_clip", "vit3d", "question_encoder")


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config, a bundled name (med2e3_m3d) or a file "
                                    "(configs/*.py); its `model` is used", lock_config=False, flag_values=flag_values)
    flags.DEFINE_string("reference_config", None, "a golden-fixture style config.json instead of --config",
                        flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "whole model: the authors' state_dict file or release directory",
                        flag_values=flag_values)
    flags.DEFINE_string("llm", None, "component: HF Phi-3 / Llama / Qwen2 checkpoint (file or directory)",
                        flag_values=flag_values)
    flags.DEFINE_string("siglip", None, "component: HF SigLIP (SiglipVisionModel or SiglipModel)",
                        flag_values=flag_values)
    flags.DEFINE_string("m3d_clip", None, "component: M3D-CLIP (vision_encoder.* and language_encoder.*)",
                        flag_values=flag_values)
    flags.DEFINE_string("vit3d", None, "component: M3D's bare ViT (pretrained_ViT.bin)", flag_values=flag_values)
    flags.DEFINE_string("question_encoder", None, "component: an HF BERT as the TG-IS question encoder (e.g. MiniLM); "
                        "the config's model.question_encoder must have its sizes", flag_values=flag_values)
    flags.DEFINE_string("orbax", None, "Orbax checkpoint to convert to PyTorch", flag_values=flag_values)
    flags.DEFINE_enum("layout", "state_dict", ["state_dict", "release"], "PyTorch layout to write",
                      flag_values=flag_values)
    flags.DEFINE_string("out", None, "output: Orbax directory, or PyTorch file / directory", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "init seed of parameters no component covers", flag_values=flag_values)
    flags.DEFINE_string("lora_run", None, "a finetune_lora workdir: --out gets its adapters merged into the base "
                        "(Orbax), --peft_out its adapters in peft's format", flag_values=flag_values)
    flags.DEFINE_string("peft_out", None, "with --lora_run: also write the adapters as a peft folder",
                        flag_values=flag_values)
    flags.DEFINE_string("peft", None, "a peft adapter folder (adapter_config.json, adapter_model.safetensors) to "
                        "merge into the Orbax base of --orbax; --out gets the merged Orbax model",
                        flag_values=flag_values)
    flags.mark_flag_as_required("out", flag_values=flag_values)


def _model_config():
    if FLAGS.reference_config:
        with open(FLAGS.reference_config, encoding="utf-8") as f:
            return config_from_reference(json.load(f))
    if FLAGS.config is None:
        sys.exit("pass --config (a bundled name or configs/<name>.py) or --reference_config <config.json>")
    return FLAGS.config.model


def to_orbax():
    cfg = _model_config()
    components = {name: getattr(FLAGS, name) for name in COMPONENT_FLAGS if getattr(FLAGS, name)}
    model, reports = load_med2e3(cfg, FLAGS.checkpoint, components=components or None, seed=FLAGS.seed, progress=True)
    for report in reports:
        print(report.summary())
        if report.unused:
            print("  deliberately unused:", ", ".join(report.unused))
    save_params(model, FLAGS.out)
    print(f"wrote Orbax checkpoint {FLAGS.out}")


def to_pytorch():
    model = restore_params(FLAGS.orbax)
    if FLAGS.layout == "release":
        folders = write_release_layout(export_pytorch(model, FULL_TABLE), FLAGS.out)
        print(f"wrote release layout {FLAGS.out}: {', '.join(folders)}")
        return
    written = export_med2e3(model, FLAGS.out)
    print(f"wrote {len(written)} tensors ({sum(_size(s) for s in written.values()):,} parameters) to {FLAGS.out}")


def lora_run():
    """The latest checkpoint of a finetune_lora workdir: merged into its base (--out), adapters (--peft_out)."""
    import os

    import jax
    import ml_collections

    from med2e3_jax import lora, sharding
    from med2e3_jax.train import loop
    from med2e3_jax.train import state as state_lib
    from med2e3_jax.train.checkpointing import CHECKPOINT_DIR, TrainCheckpointer

    with open(os.path.join(FLAGS.lora_run, loop.CONFIG_FILE), encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.train.stage not in lora.LORA_STAGES:
        sys.exit(f"--lora_run {FLAGS.lora_run}: stage {config.train.stage!r}, not a LoRA stage "
                 f"({', '.join(lora.LORA_STAGES)})")
    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    with sharding.logical_axis_rules(sharding.rules_of(config)):
        model = loop.build_model(config, mesh)
        with TrainCheckpointer(os.path.join(FLAGS.lora_run, CHECKPOINT_DIR), read_only=True) as checkpointer:
            step = checkpointer.restore_params(model, state_lib.trainable_filter(config.train))
        print(f"{FLAGS.lora_run}: step {step}, LoRA rank {config.train.lora.rank} on "
              f"{len(lora.lora_paths(model))} modules")
        if FLAGS.peft_out:
            lora.export_peft(model, config.train.lora, FLAGS.peft_out, FULL_TABLE)
            print(f"wrote peft adapters {FLAGS.peft_out}")
        merged = lora.merge_lora(model, config.train.lora, loop.build_model(config, mesh, adapters=False))
    save_params(merged, FLAGS.out)
    print(f"wrote the merged Orbax checkpoint {FLAGS.out}")


def peft_to_orbax():
    """A peft adapter folder merged into the Orbax base of --orbax, strictly."""
    import copy

    from med2e3_jax import lora

    if not FLAGS.orbax:
        sys.exit("--peft needs --orbax: the Orbax base the adapters were trained on")
    base = restore_params(FLAGS.orbax)
    lora_cfg = lora.lora_config_from_peft(FLAGS.peft, FULL_TABLE)
    adapted = lora.apply_lora(copy.deepcopy(base), lora_cfg, *lora.example_inputs(base.cfg))
    lora.import_peft(adapted, FLAGS.peft, FULL_TABLE)
    save_params(lora.merge_lora(adapted, lora_cfg, base), FLAGS.out)
    print(f"merged {len(lora.lora_paths(adapted))} adapters (rank {lora_cfg.rank}) into {FLAGS.orbax}: {FLAGS.out}")


def _size(shape):
    total = 1
    for dim in shape:
        total *= dim
    return total


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    sources = [FLAGS.checkpoint, *(getattr(FLAGS, name) for name in COMPONENT_FLAGS)]
    if FLAGS.lora_run:
        lora_run()
        return
    if FLAGS.peft:
        peft_to_orbax()
        return
    if FLAGS.peft_out:
        sys.exit("--peft_out writes the adapters of --lora_run")
    if FLAGS.orbax and any(sources):
        sys.exit("--orbax converts to PyTorch; it does not combine with PyTorch inputs")
    if FLAGS.orbax:
        to_pytorch()
    elif any(sources):
        to_orbax()
    else:
        sys.exit("nothing to convert: pass --checkpoint, component paths, or --orbax")


def run() -> None:
    run_command(__name__, define_flags, main, config_file_flag="config")


if __name__ == "__main__":
    run()
