"""The full-size model on CPU in bf16: one forward pass and an 8-token greedy generation, timed, with memory.

    python benchmarks/full_size_forward.py --checkpoint ORBAX_DIR [--new_tokens 8] [--prompt_length 768]

`ORBAX_DIR` is a `save_params` folder (scripts/convert_checkpoint.py; e.g. from the random release
checkpoint of benchmarks/make_release_checkpoint.py). The model is restored from its saved config with
`dtype` and `param_dtype` set to bfloat16: a bf16 checkpoint is read as it is; a float32 one is cast
array by array as it is read, never held in float32 whole.

Inputs: one volume (1, 1, 32, 256, 256) in [0, 1], a prompt expanded to `--prompt_length` positions
(the vision tokens included; 768 is `llm_max_length`) whose last 64 text tokens are supervised, and a
32-token TG-IS question. Each step is compiled ahead of time (`jit(...).lower(...).compile()`), so that
compilation and execution are timed apart; generation runs prefill and `new_tokens` decoding steps with
no EOS, so that it always makes exactly that many tokens. Peak RSS is the kernel's high-water mark of
this process, read after each phase; "XLA temp" is the compiled program's own buffer total. GB are 10^9
bytes.

XLA's CPU backend computes bf16 matmuls in float32, converting each weight first. Two of its defaults
then hold every weight in float32 at once, 3x the parameters in all (26 GB for Med-2E3-M3D): the
concurrency-optimised scheduler runs all those independent conversions up front, and loop-invariant code
motion lifts them out of the decoding loop. This script turns both off (appending
`--xla_cpu_enable_concurrency_optimized_scheduler=false` and
`--xla_disable_hlo_passes=while-loop-invariant-code-motion` to XLA_FLAGS, unless `--nocpu_bf16_flags` or
XLA_FLAGS already sets them), so that each conversion lives only for its matmul; decoding then converts
the LLM's weights at every step, which costs time, not memory. Anyone running the bf16 model on CPU
needs the same flags; accelerators multiply bf16 natively.
"""

import os
import sys

# XLA reads its flags once, when the backend starts: set them before jax is imported.
CPU_BF16_FLAGS = {
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
}
if "--nocpu_bf16_flags" not in sys.argv:
    _set = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(
        [_set] + [f"--{name}={value}" for name, value in CPU_BF16_FLAGS.items() if f"--{name}=" not in _set]
    ).strip()

import logging
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from absl import app, flags
from flax import nnx

from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID, expand_image_placeholder
from med2e3_jax import config as config_lib
from med2e3_jax.checkpoint.orbax_params import load_config, restore_params
from med2e3_jax.generate import GenerationConfig, generate_tokens

flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory written by save_params")
flags.DEFINE_integer("new_tokens", 8, "tokens to generate")
flags.DEFINE_integer("prompt_length", 768, "prompt positions after expanding <image3d> (vision tokens included)")
flags.DEFINE_integer("question_length", 32, "TG-IS question tokens")
flags.DEFINE_integer("seed", 0, "seed of the synthetic inputs")
flags.DEFINE_bool("cpu_bf16_flags", True, "append CPU_BF16_FLAGS to XLA_FLAGS (read before flags are parsed)")
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS

SUPERVISED = 64  # answer tokens at the end of the prompt, so that the forward pass computes a loss


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def _report(phase: str, seconds: float, compiled=None) -> None:
    temp = f"   XLA temp {compiled.memory_analysis().temp_size_in_bytes / 1e9:5.2f} GB" if compiled else ""
    print(f"{phase:<32}{seconds:8.1f} s   RSS {_rss_gb():6.2f} GB   peak RSS {_peak_rss_gb():6.2f} GB{temp}",
          flush=True)


def _check_fits(compiled, what: str) -> None:
    """Stops before running a program whose buffers exceed the memory available now: on a shared
    machine, an out-of-memory kill could take another process with it."""
    temp = compiled.memory_analysis().temp_size_in_bytes
    available = psutil.virtual_memory().available
    if temp > available:
        sys.exit(f"{what} needs {temp / 1e9:.2f} GB of XLA buffers but only {available / 1e9:.2f} GB are "
                 "available; not running it")


def synthetic_inputs(cfg, prompt_length: int, question_length: int, seed: int):
    """(volume, expanded prompt with labels, expanded prompt for generation, question ids, question mask)."""
    rng = np.random.default_rng(seed)
    volume = rng.uniform(0, 1, (1, 1, *cfg.vision3d.img_size)).astype(np.float32)
    vision = config_lib.num_vision_tokens(cfg)
    text = prompt_length - vision
    if text < SUPERVISED + 2:
        raise ValueError(f"--prompt_length={prompt_length} leaves {text} text positions beside {vision} vision tokens")
    vocab = cfg.llm.vocab_size
    ids = np.array([[cfg.llm.bos_token_id, *rng.integers(3, min(vocab, 32000), 15), IMAGE3D_TOKEN_ID,
                     *rng.integers(3, min(vocab, 32000), text - 16)]])
    labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - SUPERVISED, ids, IGNORE_INDEX)
    common = dict(num_vision_tokens=vision, max_length=prompt_length, pad_id=cfg.llm.pad_token_id)
    forward = expand_image_placeholder(ids, np.ones_like(ids), labels, **common)
    prompt = expand_image_placeholder(ids, np.ones_like(ids), None, **common)
    question = rng.integers(1000, cfg.question_encoder.vocab_size, (1, question_length))
    question[:, 0], question[:, -1] = 101, 102  # [CLS] ... [SEP]
    return volume, forward, prompt, question, np.ones_like(question)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    print(f"devices: {jax.devices()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    cfg = load_config(FLAGS.checkpoint)
    cfg.dtype = cfg.param_dtype = "bfloat16"

    start = time.perf_counter()
    model = restore_params(FLAGS.checkpoint, cfg)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(state)})
    _report(f"restore ({param_bytes / 1e9:.2f} GB, {'/'.join(dtypes)})", time.perf_counter() - start)
    del model

    volume, forward_prompt, generation_prompt, question, question_mask = synthetic_inputs(
        cfg, FLAGS.prompt_length, FLAGS.question_length, FLAGS.seed)

    @jax.jit
    def forward(state, volume, input_ids, attention_mask, labels, question, question_mask):
        out = nnx.merge(graphdef, state)(volume, input_ids, attention_mask, labels, question, question_mask)
        return out.loss, out.logits[:, -1], out.slice_scores

    generation_config = GenerationConfig(max_new_tokens=FLAGS.new_tokens, eos_ids=(), pad_id=cfg.llm.pad_token_id)

    @jax.jit
    def generation(state, volume, input_ids, attention_mask, question, question_mask):
        out = generate_tokens(nnx.merge(graphdef, state), volume, input_ids, attention_mask, question,
                              question_mask, config=generation_config)
        return out.tokens, out.slice_scores

    forward_args = (state, jnp.asarray(volume), forward_prompt.input_ids, forward_prompt.attention_mask,
                    forward_prompt.labels, question, question_mask)
    start = time.perf_counter()
    compiled = forward.lower(*forward_args).compile()
    _report("forward: compile", time.perf_counter() - start, compiled)
    _check_fits(compiled, "the forward pass")
    start = time.perf_counter()
    loss, last_logits, scores = jax.block_until_ready(compiled(*forward_args))
    forward_s = time.perf_counter() - start
    _report(f"forward: run ({FLAGS.prompt_length} positions)", forward_s)
    print(f"  loss {float(loss):.4f}, last-position logits finite: {bool(jnp.isfinite(last_logits).all())}, "
          f"slice scores sum {float(scores.sum()):.4f}", flush=True)
    del compiled

    generation_args = (state, jnp.asarray(volume), generation_prompt.input_ids, generation_prompt.attention_mask,
                       question, question_mask)
    start = time.perf_counter()
    compiled = generation.lower(*generation_args).compile()
    _report("generation: compile", time.perf_counter() - start, compiled)
    _check_fits(compiled, "generation")
    start = time.perf_counter()
    tokens, _ = jax.block_until_ready(compiled(*generation_args))
    generation_s = time.perf_counter() - start
    _report(f"generation: run ({FLAGS.new_tokens} tokens)", generation_s)
    print(f"  tokens {np.asarray(tokens[0]).tolist()}", flush=True)
    print(f"RESULT forward_s={forward_s:.1f} generation_s={generation_s:.1f} peak_rss_gb={_peak_rss_gb():.2f} "
          f"param_gb={param_bytes / 1e9:.2f}")


if __name__ == "__main__":
    app.run(main)
