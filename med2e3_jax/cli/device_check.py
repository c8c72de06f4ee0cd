"""Training-step and generation figures of a config on this machine's accelerators, in a few minutes.

    med2e3-device-check                                   # the bundled medium config, all devices
    med2e3-device-check --config tiny --steps 2 --new_tokens 4   # CPU smoke run

Builds the model on a mesh of every local device (the config's `mesh`), runs the trainer's own step
(`train.step.train_step`: the config's stage, micro-batches, remat policy and attention
implementation) on a synthetic batch of `train.global_batch_size` rows padded to `llm_max_length`,
then greedy generation (`generate.generate`: prefill + KV-cache decode) of `--new_tokens` tokens after
the same prompts. Prints, after compilation:

  - step time (median of `--steps`), tokens/s (sequence positions of the global batch per second);
  - model FLOPs utilisation: the step's matmul FLOPs counted from the config
    (`med2e3_jax.flops.model_flops`: forward x 3 for trained towers, recomputation not
    counted) / step time / (peak bf16 dense FLOP/s per device x devices), the peak looked up from
    the device kind (H100 and H200 989e12, A100 312e12, TPU v5p 459e12) or `--peak_flops`; n/a on
    other devices;
  - peak device memory (`memory_stats()['peak_bytes_in_use']`, the largest over the devices), n/a
    where the backend keeps no statistics (CPU);
  - generation: new tokens per second over the batch, prefill included.

The last line is `RESULT step_s=… tokens_per_s=… mfu=… peak_memory_gb=… generate_tokens_per_s=…`.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
from ml_collections import config_flags

from med2e3_jax.cli import resolve_config, run_command

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", resolve_config("medium"), "experiment config", lock_config=False,
                                    flag_values=flag_values)
    flags.DEFINE_integer("steps", 3, "timed training steps (after one that compiles)", flag_values=flag_values)
    flags.DEFINE_integer("new_tokens", 16, "tokens generated per prompt", flag_values=flag_values)
    flags.DEFINE_integer("generate_rows", 0, "prompts generated at once (default: the training batch)",
                         flag_values=flag_values)
    flags.DEFINE_float("peak_flops", 0.0, "peak FLOP/s of one device for the MFU (default: from the device kind)",
                       flag_values=flag_values)


# Peak dense bf16 FLOP/s per device, by device kind (vendor figures, without sparsity).
PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
TPU_PEAK_FLOPS = {"TPU v5": 459e12, "TPU v5p": 459e12}  # "TPU v5 lite" (v5e) is another chip


def peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device of `device_kind` (jax's `Device.device_kind`), None if unknown."""
    if device_kind in TPU_PEAK_FLOPS:
        return TPU_PEAK_FLOPS[device_kind]
    if device_kind.startswith("TPU"):
        return None
    for name, flops in PEAK_FLOPS:
        if name in device_kind:
            return flops
    return None


def peak_memory_bytes(devices) -> int | None:
    """The largest `peak_bytes_in_use` over `devices`, None when the backend reports none."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except (NotImplementedError, RuntimeError):
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _figure(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from med2e3_jax import sharding

    with sharding.logical_axis_rules(sharding.rules_of(FLAGS.config)):
        _check(FLAGS.config)


def _check(config):
    import jax
    import numpy as np
    from flax import nnx

    from med2e3_jax import sharding
    from med2e3_jax.flops import model_flops
    from med2e3_jax.generate import GenerationConfig, generate
    from med2e3_jax.random_batches import benchmark_batch
    from med2e3_jax.train import state as state_lib
    from med2e3_jax.train import step as step_lib
    from med2e3_jax.train.loop import init_model

    devices = jax.devices()
    kind = devices[0].device_kind
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} x {kind}", flush=True)
    mesh = sharding.make_mesh(config.mesh)
    model = init_model(config.model, config.train.seed, mesh)
    optimizer = state_lib.make_optimizer(model, config.train)
    sharding.shard_model(optimizer, mesh)
    rows = config.train.global_batch_size
    split = sharding.batch_shards(mesh) * config.train.micro_batches
    if rows % split:  # every device gets the same number of rows in every micro-batch
        rows = split * -(-rows // split)
        print(f"global batch {config.train.global_batch_size} raised to {rows}, a multiple of the batch "
              f"split ({split})", flush=True)
    host_batch = benchmark_batch(config, rows)
    batch = sharding.global_batch({k: host_batch[k] for k in step_lib.MODEL_INPUTS}, mesh)
    key = jax.random.key(config.train.seed)
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"config: stage {config.train.stage}, {parameters / 1e9:.3f}B "
          f"parameters, global batch {rows} x {config.model.llm_max_length} positions, volume "
          f"{tuple(host_batch['volume'].shape[1:])}, micro-batches {config.train.micro_batches}, dtype "
          f"{config.model.dtype}, remat {config.model.remat_policy}, attention {config.model.attention_impl}, "
          f"mesh {dict(mesh.shape)}", flush=True)

    train_step = step_lib.make_train_step(model, optimizer, micro_batches=config.train.micro_batches,
                                          head_slots_per_row=config.train.head_slots_per_row,
                                          head_chunk=config.train.head_chunk)

    def step():
        return float(train_step(batch, key)["loss"])  # waits for the step

    start = time.perf_counter()
    loss = step()
    print(f"train: compile + first step {time.perf_counter() - start:.1f} s, loss {loss:.4f}", flush=True)
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = rows * config.model.llm_max_length / step_s
    flops = model_flops(config.model, host_batch, set(config.train.trainable))
    peak = FLAGS.peak_flops or peak_flops(kind)
    mfu = flops / step_s / (peak * len(devices)) if peak else None
    print(f"train: {step_s * 1e3:.1f} ms/step (median of {len(times)}), {tokens_per_s:.0f} tokens/s, "
          f"{flops:.3e} model FLOPs/step, MFU {_figure(mfu, '.1%')} (peak {_figure(peak, '.3e')} FLOP/s x "
          f"{len(devices)}), loss {loss:.4f}", flush=True)

    gen_rows = min(rows, FLAGS.generate_rows or rows)
    gen_config = GenerationConfig(max_new_tokens=FLAGS.new_tokens, eos_ids=(), pad_id=config.model.llm.pad_token_id)
    prompts = {k: np.asarray(host_batch[k][:gen_rows]) for k in
               ("volume", "input_ids", "attention_mask", "question_ids", "question_mask")}

    def run_generation():
        return generate(model, prompts["volume"], prompts["input_ids"], prompts["attention_mask"],
                        prompts["question_ids"], prompts["question_mask"], config=gen_config)

    start = time.perf_counter()
    run_generation()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = run_generation()  # numpy outputs: done
    generate_s = time.perf_counter() - start
    generated = int(np.asarray(out.lengths).sum())
    generate_tokens_per_s = generated / generate_s
    print(f"generate: {gen_rows} prompts of {prompts['input_ids'].shape[1]} positions, {FLAGS.new_tokens} new "
          f"tokens each: {generate_s:.2f} s ({compile_s:.1f} s with compilation), {generate_tokens_per_s:.1f} "
          f"new tokens/s", flush=True)

    peak_bytes = peak_memory_bytes(devices)
    peak_gb = None if peak_bytes is None else peak_bytes / 1e9
    print(f"peak device memory: {_figure(peak_gb, '.2f')} GB", flush=True)
    print(f"RESULT step_s={step_s:.4f} tokens_per_s={tokens_per_s:.1f} mfu={_figure(mfu, '.4f')} "
          f"peak_memory_gb={_figure(peak_gb, '.2f')} generate_tokens_per_s={generate_tokens_per_s:.1f}")


def run() -> None:
    run_command(__name__, define_flags, main, config_file_flag="config")


if __name__ == "__main__":
    run()
