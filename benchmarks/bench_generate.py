"""Greedy generation speed: our jitted decoder loop against transformers' `generate` in PyTorch.

    python benchmarks/bench_generate.py [--new_tokens 32] [--prompt_length 64] [--repeats 3]

Both sides run the same Phi-3 LLM (LongRoPE) with the same random weights (imported into JAX through
LLM_TABLE), float32 on CPU, greedy, no EOS (every row generates exactly new_tokens), a batch of prompts of
different lengths (right-padded for JAX, left-padded for transformers, its requirement). Two sizes:

    tiny   configs/tiny.py's LLM: hidden 64, 2 layers, 4 heads, vocab 32064
    small  hidden 512, 4 layers, 8 heads, MLP 1536, vocab 32064

Measured, each the median of `repeats` runs after a warm-up (JAX: after compilation):
  - time to first token (TTFT): a call generating one token (prefill + first token);
  - decode tokens/s: batch * (new_tokens - 1) / (time for new_tokens - TTFT), i.e. the tokens after the
    first, per second, over the whole batch.

The last line, `RESULT jax=<tok/s> torch=<tok/s> ratio=<x>`, is the small model at batch 8 (the batched
evaluation setting); the table above it has every configuration.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from med2e3_jax.checkpoint.importer import load_pytorch
from med2e3_jax.checkpoint.llm_port import LLM_TABLE, llm_config_from_hf
from med2e3_jax.checkpoint.port import DictSource
from med2e3_jax.generate import GenerationConfig, generate_text
from med2e3_jax.models.decoder import Decoder

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8),
}
VOCAB = 32064
ORIGINAL_MAX = 4096


def build(size: str):
    """(transformers Phi3ForCausalLM, our Decoder) with the same random weights."""
    dims = SIZES[size]
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    rng = np.random.default_rng(0)
    config = transformers.Phi3Config(
        vocab_size=VOCAB, **dims, num_key_value_heads=dims["num_attention_heads"], rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False,
        max_position_embeddings=32 * ORIGINAL_MAX, original_max_position_embeddings=ORIGINAL_MAX,
        rope_parameters=dict(rope_theta=10000.0, type="longrope",
                             short_factor=(1 + rng.random(head_dim // 2)).tolist(),
                             long_factor=(2 + rng.random(head_dim // 2)).tolist()),
    )
    config._attn_implementation = "sdpa"  # transformers' fastest CPU attention
    torch.manual_seed(0)
    hf_model = transformers.Phi3ForCausalLM(config).eval()
    hf_model.generation_config.eos_token_id = None  # no stopping: every row generates new_tokens
    source = DictSource({k: v.numpy() for k, v in hf_model.state_dict().items()})
    model, _ = load_pytorch(nnx.eval_shape(lambda: Decoder(llm_config_from_hf(config.to_dict()), rngs=nnx.Rngs(0))),
                            source, LLM_TABLE)
    return hf_model, model


def prompts(batch: int, length: int):
    """Right-padded (JAX) and left-padded (transformers) copies of prompts of lengths length/2..length."""
    rng = np.random.default_rng(batch)
    lengths = np.linspace(length, length // 2, batch).astype(int) if batch > 1 else np.array([length])
    right = np.full((batch, length), 32000, np.int64)
    left = right.copy()
    right_mask, left_mask = np.zeros_like(right), np.zeros_like(right)
    for row, n in enumerate(lengths):
        ids = rng.integers(3, 32000, n)
        right[row, :n], right_mask[row, :n] = ids, 1
        left[row, length - n:], left_mask[row, length - n:] = ids, 1
    return (right, right_mask), (left, left_mask)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_runner(model, ids, mask, new_tokens: int):
    run = nnx.jit(generate_text, static_argnames="config")
    config = GenerationConfig(max_new_tokens=new_tokens, eos_ids=(), pad_id=32000)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    return lambda: jax.block_until_ready(run(model, ids, mask, config=config).tokens)


def torch_runner(hf_model, ids, mask, new_tokens: int):
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def run():
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=32000)
        assert out.shape[1] == ids.shape[1] + new_tokens
        return out

    return run


def measure(make_runner, model, ids, mask, new_tokens, repeats):
    first = median_seconds(make_runner(model, ids, mask, 1), repeats)
    full = median_seconds(make_runner(model, ids, mask, new_tokens), repeats)
    return first, ids.shape[0] * (new_tokens - 1) / max(full - first, 1e-9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"prompt <= {args.prompt_length} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'model':6} {'batch':>5} | {'TTFT jax':>9} {'TTFT torch':>10} | {'tok/s jax':>10} {'tok/s torch':>11} {'ratio':>6}")
    results = {}
    for size in args.sizes:
        hf_model, model = build(size)
        for batch in args.batches:
            (right, right_mask), (left, left_mask) = prompts(batch, args.prompt_length)
            jax_ttft, jax_rate = measure(jax_runner, model, right, right_mask, args.new_tokens, args.repeats)
            torch_ttft, torch_rate = measure(torch_runner, hf_model, left, left_mask, args.new_tokens, args.repeats)
            results[size, batch] = (jax_rate, torch_rate)
            print(f"{size:6} {batch:5d} | {1e3 * jax_ttft:7.1f}ms {1e3 * torch_ttft:8.1f}ms | "
                  f"{jax_rate:10.1f} {torch_rate:11.1f} {jax_rate / torch_rate:5.1f}x", flush=True)
    summary = ("small", 8) if ("small", 8) in results else next(reversed(results))
    jax_rate, torch_rate = results[summary]
    print(f"RESULT jax={jax_rate:.1f} torch={torch_rate:.1f} ratio={jax_rate / torch_rate:.2f}  "
          f"(decode tokens/s, {summary[0]} model, batch {summary[1]})")


if __name__ == "__main__":
    main()
