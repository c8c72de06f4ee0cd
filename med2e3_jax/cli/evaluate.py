r"""Scores a Med-2E3 checkpoint on one of the paper's benchmarks, the way the authors score it.

    med2e3-evaluate --config.task=m3d_vqa_closed --config.checkpoint=runs/model \
        --config.annotation_file=DATA/annotations/npy/vqa_closed_test.json --config.image_root=DATA \
        --config.output_dir=runs/eval --config.bertscore_model=/models/roberta-large

Tasks: m3d_cap, m3d_vqa_closed, m3d_vqa_open, ctrate_report, ctrate_long, ctrate_short, ctrate_choice.
`checkpoint` is a folder written by `med2e3_jax.checkpoint.orbax_params.save_params` (Orbax params and
model_config.json); `--config.quantize.qtype=int8|nf4` loads its LLM projections quantized
(`med2e3_jax.quantize`). Greedy decoding, as the authors evaluate. The outputs go to OUTPUT_DIR/TASK/
(predictions.jsonl, predictions.json, metrics.json, metrics.md); rerunning the same command generates only
the samples not yet predicted. Without `bertscore_model` (a local HF model folder; the authors' is
roberta-large, layer 17) BERTScore is skipped and metrics.json says so.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from med2e3_jax.cli import run_command


def eval_config() -> ConfigDict:
    from med2e3_jax.quantize import quantize_config

    return ConfigDict(
        dict(
            task="m3d_vqa_closed",
            annotation_file="",  # the authors' annotation JSON
            answers_file="",  # their separate answers JSON ({"id", "answer", ...}), when the records lack answers
            image_root="",  # prefix for relative `vision3d` paths; every record's volume must resolve inside it
            allow_outside_root=False,  # also read volumes outside image_root
            max_voxels=1024 * 1024 * 2048,  # what one volume file may ask for (data_pipelines.readers.VolumeLimits)
            min_extent=8,
            checkpoint="",  # a save_params folder
            quantize=quantize_config(),  # qtype '' | 'int8' | 'nf4', module_path, tile_size (med2e3_jax.quantize)
            output_dir="runs/eval",
            limit=0,  # evaluate the first N records only (0: all)
            batch_size=4,
            max_new_tokens=256,
            num_beams=1,
            template="phi",
            tokenizer_path="",  # default: the fetched Phi-3 tokenizer (med2e3-fetch-assets)
            question_tokenizer_path="",  # default: the fetched MiniLM BERT tokenizer
            question_max_length=64,
            # 'auto': from the file (M3D's .npy is already in [0, 1], NIfTI and DICOM are HU); 'ct', 'mr', 'unit'
            modality="auto",
            hu_window=(-1000.0, 1000.0),
            prompt_bucket=64,  # prompts are padded to a multiple of this: fewer compilations, less padding
            bertscore_model="",
            bertscore_layers=17,
            bertscore_batch_size=64,
            progress=True,
        )
    )


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_dict("config", eval_config(), "evaluation settings (`eval_config`); override with "
                                    "--config.KEY=VALUE", flag_values=flag_values)


class Predictor:
    """`predict_fn` for the runner: records -> greedy answers and TG-IS slice scores, with the JAX model."""

    def __init__(self, model, config: ConfigDict, tokenizer, question_tokenizer):
        from data_pipelines.model_inputs import InputSpec, stop_ids, volume_limits
        from med2e3_jax import config as model_config
        from med2e3_jax.generate import GenerationConfig

        self.model, self.config = model, config
        self.tokenizer, self.question_tokenizer = tokenizer, question_tokenizer
        cfg = model.cfg
        self.spec = InputSpec(
            volume_shape=tuple(int(s) for s in cfg.vision3d.img_size),
            num_vision_tokens=model_config.num_vision_tokens(cfg), max_length=int(cfg.llm_max_length),
            question_max_length=int(config.question_max_length), template=config.template,
            modality=config.modality, hu_window=tuple(config.hu_window), data_root=config.image_root or None,
            allow_outside_root=bool(config.allow_outside_root), limits=volume_limits(config))
        self.generation = GenerationConfig(
            max_new_tokens=config.max_new_tokens, num_beams=config.num_beams, pad_id=tokenizer.pad_token_id,
            eos_ids=stop_ids(tokenizer, config.template, cfg.llm.get("eos_token_id")))

    def inputs(self, record) -> dict[str, np.ndarray]:
        from data_pipelines.model_inputs import record_inputs

        # The prompt: the conversation up to its last question, then the generation prompt.
        inputs = record_inputs(record, self.spec, self.tokenizer, self.question_tokenizer, generation=True)
        del inputs["labels"]
        return inputs

    def __call__(self, records: list[dict]) -> list[dict]:
        from med2e3_jax.generate import generate

        examples = [self.inputs(r) for r in records]
        # Static shapes: a short last batch is filled with copies of its first record, prompts are cut to
        # the longest one rounded up to a bucket.
        examples += [examples[0]] * (self.config.batch_size - len(examples))
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        bucket = int(self.config.prompt_bucket)
        longest = int(batch["attention_mask"].sum(axis=1).max())
        length = min(batch["input_ids"].shape[1], -(-longest // bucket) * bucket)
        out = generate(
            self.model, batch["volume"], batch["input_ids"][:, :length], batch["attention_mask"][:, :length],
            batch["question_ids"], batch["question_mask"], config=self.generation, tokenizer=self.tokenizer,
        )
        return [{"prediction": out.texts[i], "slice_scores": np.asarray(out.slice_scores[i]).tolist()}
                for i in range(len(records))]


def load_model(config: ConfigDict):
    """The checkpoint's model, its kernels quantized as `config.quantize` says."""
    from med2e3_jax.checkpoint.orbax_params import restore_params
    from med2e3_jax.quantize import check_quantize_config, quantize_weights

    try:
        check_quantize_config(config.quantize)  # before the (slow) restore
    except ValueError as error:
        raise app.UsageError(f"--config.{error}") from None
    return quantize_weights(restore_params(config.checkpoint), config.quantize)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    for key in ("annotation_file", "checkpoint"):
        if not config[key]:
            raise app.UsageError(f"--config.{key} is required")

    from data_pipelines.assets import asset_path
    from data_pipelines.templates import load_tokenizer
    from med2e3_jax.evaluation import BertScore, evaluate, get_task, load_task_records

    task = get_task(config.task)
    records = load_task_records(config.annotation_file, answers_file=config.answers_file or None,
                                image_root=config.image_root or None, limit=config.limit or None)
    bertscore = None
    if "bert_f1" in task.metrics:
        if config.bertscore_model:
            bertscore = BertScore(config.bertscore_model, num_layers=config.bertscore_layers,
                                  batch_size=config.bertscore_batch_size)
        else:
            logging.warning("BERTScore skipped: no --config.bertscore_model (a local HF model folder)")
    model = load_model(config)
    tokenizer = load_tokenizer(config.tokenizer_path or asset_path("tokenizers/phi3"))
    question_tokenizer = load_tokenizer(config.question_tokenizer_path or asset_path("minilm"))
    predictor = Predictor(model, config, tokenizer, question_tokenizer)
    out_dir = os.path.join(config.output_dir, task.name)
    summary = evaluate(task, records, predictor, out_dir, batch_size=config.batch_size, bertscore=bertscore,
                       progress=config.progress)
    with open(os.path.join(out_dir, "metrics.md"), encoding="utf-8") as f:
        print(f.read(), end="")
    logging.info("%s: %d samples, metrics in %s", task.name, summary["overall"]["count"], out_dir)


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
