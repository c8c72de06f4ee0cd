r"""Ask Med-2E3 about a CT: the answer on stdout, where TG-IS looked as a PNG beside the volume.

    med2e3-generate --volume scan.nii.gz --question "Which organ shows a lesion?" \
        --checkpoint /path/to/orbax
    med2e3-generate --volume dicom_dir/ --question "..." --question "..." \
        --pytorch /path/to/Med-2E3-M3D --config med2e3_m3d

The volume is a `.npy` (M3D, already in [0, 1]), a `.nii` / `.nii.gz` or a DICOM series directory,
preprocessed as for evaluation (`data_pipelines.preprocess.preprocess_volume`). The model comes from an
Orbax checkpoint written by `save_params` (`--checkpoint`, its config inside) or from the authors' PyTorch
checkpoint, imported on the fly (`--pytorch` with `--config`); `--quantize int8|nf4` stores the LLM's projections
quantized after loading (`med2e3_jax.quantize`). Tokenizers default to the fetched assets
(`med2e3-fetch-assets`): Phi-3's for the prompt, MiniLM's uncased BERT vocabulary for the TG-IS question.

Each `--question` is one row of a batch; one answer line per question is printed, in order. The figure is
the paper's figure 4 for one question, a grid comparing the questions for several; it goes to `--out`, by
default `<volume>_slices.png` next to the volume.
"""

import logging
import os
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.assets import asset_path
from data_pipelines.model_inputs import InputSpec, load_volume, question_record, record_inputs, stop_ids
from data_pipelines.templates import get_template, load_tokenizer
from med2e3_jax import config as config_lib
from med2e3_jax import viz
from med2e3_jax.cli import run_command
from med2e3_jax.generate import GenerationConfig, generate
from med2e3_jax.quantize import LLM_PROJECTIONS, QTYPES, quantize_config, quantize_weights

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config (a bundled name or configs/*.py): the model "
                                    "of --pytorch; its data.template and data.question_max_length are used when given",
                                    lock_config=False, flag_values=flag_values)
    flags.DEFINE_string("volume", None, "a .npy, .nii / .nii.gz file or a DICOM series directory",
                        flag_values=flag_values)
    flags.DEFINE_multi_string("question", None, "the question (repeat the flag for several)", flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory written by save_params",
                        flag_values=flag_values)
    flags.DEFINE_string("pytorch", None, "the authors' PyTorch checkpoint (state_dict file or release directory)",
                        flag_values=flag_values)
    flags.DEFINE_string("tokenizer", None, "LLM tokenizer directory (default: the fetched Phi-3 tokenizer)",
                        flag_values=flag_values)
    flags.DEFINE_string("question_tokenizer", None, "BERT tokenizer directory (default: the fetched MiniLM vocabulary)",
                        flag_values=flag_values)
    flags.DEFINE_string("template", None, "chat template (default: the config's data.template, else 'phi')",
                        flag_values=flag_values)
    flags.DEFINE_string("modality", "auto", "ct | mr | unit | auto (from the file type)", flag_values=flag_values)
    flags.DEFINE_integer("question_max_length", None, "BERT tokens of the TG-IS question (default: config or 64)",
                         flag_values=flag_values)
    flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most", flag_values=flag_values)
    flags.DEFINE_integer("num_beams", 1, "beam search when > 1", flag_values=flag_values)
    flags.DEFINE_bool("do_sample", False, "sample instead of greedy decoding (the authors decode greedily)",
                      flag_values=flag_values)
    flags.DEFINE_float("temperature", 1.0, "sampling temperature", flag_values=flag_values)
    flags.DEFINE_integer("top_k", 50, "sampling: keep the k most likely tokens (0: all)", flag_values=flag_values)
    flags.DEFINE_float("top_p", 1.0, "sampling: keep the smallest set of tokens with this much probability",
                       flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "sampling PRNG seed", flag_values=flag_values)
    flags.DEFINE_enum("quantize", "", ["", *QTYPES], "load the base quantized: int8 or nf4 weights of the modules "
                      "--quantize_modules names (qwix, weight-only)", flag_values=flag_values)
    flags.DEFINE_string("quantize_modules", LLM_PROJECTIONS, "regex on the module paths of the Linears to quantize",
                        flag_values=flag_values)
    flags.DEFINE_integer("quantize_tile_size", -1, "kernel input rows per scale (0: one per output channel; -1: "
                         "the qtype's default, 64 for nf4)", flag_values=flag_values)
    flags.DEFINE_string("out", None, "the PNG to write (default: <volume>_slices.png beside the volume)",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["volume", "question"], flag_values=flag_values)


def load_model():
    """(model, experiment config or None) from --checkpoint or --pytorch + --config."""
    if bool(FLAGS.checkpoint) == bool(FLAGS.pytorch):
        raise app.UsageError("pass exactly one of --checkpoint (Orbax) and --pytorch (with --config)")
    if FLAGS.checkpoint:
        from med2e3_jax.checkpoint.orbax_params import restore_params

        return restore_params(FLAGS.checkpoint), FLAGS.config
    if FLAGS.config is None:
        raise app.UsageError("--pytorch needs --config (a bundled name or configs/<name>.py): the model's architecture")
    from med2e3_jax.checkpoint.loading import load_med2e3

    model, reports = load_med2e3(FLAGS.config.model, FLAGS.pytorch)
    for report in reports:
        logging.info("imported %s: %s", FLAGS.pytorch, report.summary())
    return model, FLAGS.config


def figure_path(volume_path: str) -> pathlib.Path:
    if FLAGS.out:
        return pathlib.Path(FLAGS.out)
    path = pathlib.Path(volume_path.rstrip(os.sep))
    stem = path.name
    for suffix in (".nii.gz", ".nii", ".npy"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return path.with_name(f"{stem}_slices.png")


def _data_setting(experiment, name, default):
    data = experiment.get("data") if experiment is not None else None
    return data.get(name, default) if data is not None else default


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    model, experiment = load_model()
    try:
        model = quantize_weights(model, quantize_config(qtype=FLAGS.quantize, module_path=FLAGS.quantize_modules,
                                                        tile_size=FLAGS.quantize_tile_size))
    except ValueError as error:
        raise app.UsageError(f"--quantize: {error}") from None
    cfg = model.cfg
    tokenizer = load_tokenizer(FLAGS.tokenizer or asset_path("tokenizers/phi3"))
    if tokenizer.pad_token_id is None:
        # The authors pad with the UNK (Llama) or EOS token; the pad id only fills masked positions.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    question_tokenizer = load_tokenizer(FLAGS.question_tokenizer or asset_path("minilm"))
    template = get_template(FLAGS.template or _data_setting(experiment, "template", "phi"))
    spec = InputSpec(
        volume_shape=tuple(cfg.vision3d.img_size), num_vision_tokens=config_lib.num_vision_tokens(cfg),
        max_length=cfg.llm_max_length, template=template, modality=FLAGS.modality,
        question_max_length=min(FLAGS.question_max_length or _data_setting(experiment, "question_max_length", 64),
                                cfg.question_encoder.max_position_embeddings))
    volume = load_volume(FLAGS.volume, spec)
    questions = FLAGS.question
    rows = [record_inputs(question_record(FLAGS.volume, q), spec, tokenizer, question_tokenizer, volume=volume,
                          generation=True) for q in questions]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0] if k != "labels"}
    width = int(batch["attention_mask"].sum(axis=1).max())  # drop the padding no row uses: a shorter prefill
    config = GenerationConfig(
        max_new_tokens=FLAGS.max_new_tokens, eos_ids=stop_ids(tokenizer, template, cfg.llm.get("eos_token_id")),
        pad_id=tokenizer.pad_token_id, do_sample=FLAGS.do_sample, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
        top_p=FLAGS.top_p, num_beams=FLAGS.num_beams,
    )
    out = generate(
        model, batch["volume"], batch["input_ids"][:, :width], batch["attention_mask"][:, :width],
        batch["question_ids"], batch["question_mask"],
        config=config, rng=jax.random.key(FLAGS.seed) if FLAGS.do_sample else None, tokenizer=tokenizer,
    )
    for text in out.texts:
        print(text if len(questions) == 1 else " ".join(text.split()))  # several: one line each
    sys.stdout.flush()

    if len(questions) == 1:
        fig = viz.slice_attention_figure(volume, out.slice_scores[0], questions[0], answer=out.texts[0])
    else:
        fig = viz.question_grid_figure(volume, out.slice_scores, questions, answers=out.texts)
    path = viz.save_figure(fig, figure_path(FLAGS.volume))
    logging.info("slice attention figure: %s", path)


def run() -> None:
    run_command(__name__, define_flags, main, config_file_flag="config")


if __name__ == "__main__":
    run()
