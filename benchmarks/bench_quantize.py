"""Quantized inference: weight memory and the change in logits of int8 and nf4 bases against float32.

    python benchmarks/bench_quantize.py --checkpoint runs/quickstart/finetune/model \
        --annotation_file runs/quickstart/data/annotations/npy/vqa_closed_test.json \
        --image_root runs/quickstart/data [--limit 64] [--full_size med2e3_m3d]

For the checkpoint (a `save_params` folder, e.g. the quick start's tiny model) and each base (float32 as
stored, int8, nf4: `med2e3_jax.quantize` with its defaults, the LLM's attention and MLP projections):

  - weight memory: every parameter as stored (4-bit values at half a byte), and the quantized kernels;
  - logits: the next-token logits at the end of the prompt (where the answer starts) of the first
    `limit` questions, their largest change against float32 relative to the largest float32 logit,
    the mean of that ratio per question, and how often the most likely token stays the same.

Then the full-size model of `--full_size` (abstract: no weights are allocated) in float32, bfloat16,
int8 and nf4. The RESULT line is that model's nf4 weights against its bfloat16 weights (ratio > 1: nf4
is smaller). Closed-VQA accuracy comes from `med2e3-evaluate` with `--config.quantize.qtype`
(docs/generation_evaluation.md).
"""

import argparse
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from med2e3_jax import quantize as Q  # noqa: E402

GIB, MIB = 2**30, 2**20


def prompt_batch(checkpoint_model, annotation_file, image_root, limit):
    """The generation prompts of the first `limit` records, as `med2e3-evaluate` builds them."""
    from data_pipelines.assets import asset_path
    from data_pipelines.templates import load_tokenizer
    from med2e3_jax.cli.evaluate import Predictor, eval_config
    from med2e3_jax.evaluation import load_task_records

    config = eval_config()
    config.update(image_root=image_root, question_max_length=32)
    records = load_task_records(annotation_file, image_root=image_root, limit=limit)
    predictor = Predictor(checkpoint_model, config, load_tokenizer(asset_path("tokenizers/phi3")),
                          load_tokenizer(asset_path("minilm")))
    rows = [predictor.inputs(r) for r in records]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


@nnx.jit
def next_token_logits(model, volume, input_ids, attention_mask, question_ids, question_mask):
    logits = model(volume, input_ids, attention_mask, None, question_ids, question_mask).logits
    last = jnp.sum(attention_mask, axis=1) - 1
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def logits_of(model, batch, chunk=16):
    keys = ("volume", "input_ids", "attention_mask", "question_ids", "question_mask")
    parts = [next_token_logits(model, *(batch[k][i:i + chunk] for k in keys))
             for i in range(0, len(batch["volume"]), chunk)]
    return np.concatenate([np.asarray(p) for p in parts])


def full_size_memory(name):
    from med2e3_jax.models.med2e3 import Med2E3

    config = importlib.import_module(f"configs.{name}").model_config()
    rows = {}
    for label, param_dtype, qtype in (("float32", "float32", ""), ("bfloat16", "bfloat16", ""),
                                      ("int8", "bfloat16", "int8"), ("nf4", "bfloat16", "nf4")):
        config.param_dtype = param_dtype
        model = nnx.eval_shape(lambda: Q.quantize_weights(Med2E3(config, rngs=nnx.Rngs(0)),  # noqa: B023
                                                          Q.quantize_config(qtype=qtype)))
        rows[label] = Q.weight_memory(model)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/quickstart/finetune/model")
    parser.add_argument("--annotation_file", default="runs/quickstart/data/annotations/npy/vqa_closed_test.json")
    parser.add_argument("--image_root", default="runs/quickstart/data")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--full_size", default="med2e3_m3d", help="configs/NAME.py of the full-size model")
    args = parser.parse_args()
    from med2e3_jax.checkpoint.orbax_params import restore_params

    with jax.default_matmul_precision("highest"):
        model = restore_params(args.checkpoint)
        batch = prompt_batch(model, args.annotation_file, args.image_root, args.limit)
        reference = logits_of(model, batch)
        print(f"{args.checkpoint}: {len(reference)} questions of {args.annotation_file}")
        print(f"{'base':8} | {'weights MiB':>11} {'quantized MiB':>13} | {'max |dlogit| / max |logit|':>26} "
              f"{'mean per question':>17} {'same top-1':>10}")
        for qtype in ("", *Q.QTYPES):
            quantized = Q.quantize_weights(model, Q.quantize_config(qtype=qtype))
            memory = Q.weight_memory(quantized)
            got = logits_of(quantized, batch)
            change = np.abs(got - reference)
            scale = np.abs(reference)
            per_question = change.max(axis=1) / scale.max(axis=1)
            same = np.mean(got.argmax(axis=1) == reference.argmax(axis=1))
            label = qtype or "float32"
            quantized_mib = f"{memory.quantized_bytes / MIB:.2f} of {memory.quantized_float_bytes / MIB:.2f}"
            print(f"{label:8} | {memory.total_bytes / MIB:11.2f} {quantized_mib:>13} | "
                  f"{change.max() / scale.max():26.4f} {per_question.mean():17.4f} {100 * same:9.1f}%", flush=True)

    rows = full_size_memory(args.full_size)
    print(f"\nfull size ({args.full_size}), weights in GiB (abstract)")
    for label, memory in rows.items():
        print(f"  {label:8} {memory.total_bytes / GIB:7.2f}   quantized kernels {memory.quantized_modules:4d}: "
              f"{memory.quantized_bytes / GIB:.2f} (were {memory.quantized_float_bytes / GIB:.2f})")
    nf4, bf16 = rows["nf4"].total_bytes / GIB, rows["bfloat16"].total_bytes / GIB
    print(f"RESULT nf4_gib={nf4:.2f} bf16_gib={bf16:.2f} ratio={bf16 / nf4:.2f}  (full-size weights, bf16 over nf4)")


if __name__ == "__main__":
    main()
