r"""Memory, work and traffic per device of a training config's step on a mesh of N devices, without the
devices.

    med2e3-memory-plan --config plans:finetune_8xh100
    med2e3-memory-plan --all                       # every plan of configs/plans.py, one table
    med2e3-memory-plan --tables_from plans.json    # the tables of an `--all --json_out` file again
    med2e3-memory-plan --config tiny:finetune --devices 2 --config.mesh.data=1 \\
        --config.mesh.fsdp=2

It lowers and compiles the trainer's own step (`train.step`, the function `med2e3-train` jits) for
the config on a fake mesh of N CPU devices (`--xla_force_host_platform_device_count`; the command
re-executes itself with that flag), from abstract inputs: the model and optimizer from
`nnx.eval_shape`, every array a `jax.ShapeDtypeStruct` with the trainer's sharding. Nothing of the
model is allocated. It prints XLA's per-device memory analysis of the compiled step next to the
estimate of `med2e3_jax/memory.py`, against the device memory of the plan's `hardware` section.

What the XLA figures are: those of XLA's CPU compiler (`compiled.memory_analysis()`: arguments,
outputs, temporaries, generated code), which partitions the step exactly as the GPU/TPU compiler would
but fuses and schedules differently. The step is the one every backend runs (the micro-batch loop
is a loop everywhere), and the CPU compiler's
memory-minimising scheduler is used. What XLA:CPU was seen to do, from its buffer assignments, that
makes these figures an upper bound of what the step needs:
  - with micro-batches (a loop), it hoists the FSDP all-gathers of the weights out of the loop: every
    weight of the model is held whole, in float32 and also transposed for the backward pass (about
    30 GB for the released model), where per-layer gathers would hold one layer's;
  - it materialises the elementwise intermediates of bf16 code in float32 (the GPU/TPU compilers
    fuse them);
  - it schedules the recomputation of rematerialised layers early, so that under
    `remat_policy='full'` several layers' activations are alive at once.
The analytic estimate counts what the step needs (no hoisted weights, one layer recomputed at a time);
the truth on an accelerator lies between the two.

Beside the memory, it reads the compiled step's HLO (`med2e3_jax/roofline.py`) for what one device
computes and moves per step: the matmul FLOPs (next to XLA's `cost_analysis()` and the model FLOPs of
`med2e3_jax/flops.py`), the bytes its top-level instructions read and write in HBM, and the bytes each
collective kind sends by the ring algorithm (all-gather (n-1)/n x result, reduce-scatter (n-1)/n x
operand, all-reduce 2(n-1)/n x result, all-to-all (n-1)/n x result, collective-permute the result, over
groups of n devices), instructions in while loops counted once per trip. From the peak rates of the
plan's `hardware` section it gives a roofline step time, max(FLOPs / peak FLOP/s, HBM bytes / HBM
bandwidth, collective bytes / link bandwidth), and the MFU it allows, model FLOPs / (step time x peak).
A collective whose device groups span hosts (`hardware.devices_per_host`, device id // that) moves all
its bytes at the slower between-host bandwidth (`hardware.host_link_bandwidth`).

What the roofline leaves out (so the step time is a lower bound, the MFU an upper one): no overlap is
lost and none is modelled beyond taking the largest term, i.e. compute, HBM traffic and communication
are assumed to overlap perfectly; collectives run one after the other at the link's peak, with no
latency, no topology (a torus axis, NVSwitch, rail-optimised IB: every group gets the device's whole
bandwidth, hierarchical algorithms are not considered); no stragglers, no input pipeline, no host
work, no kernel launch overheads; and the step is XLA:CPU's program: its fusion (more HBM traffic than
GPU/TPU fusions, no fused attention), its collectives (an all-reduce followed by a slice of the device's
share is counted as the reduce-scatter the GPU/TPU pipelines make of it) and its loop-invariant
hoisting (FSDP all-gathers of a micro-batch loop run once, not once per micro-batch).

The last line is `RESULT plans=<n> fit=<n fitting with >= 10% headroom>` (or, for one config without a
device memory, `RESULT total_gb=<XLA total>`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from med2e3_jax.cli import run_command

FLAGS = flags.FLAGS
_MODULE = "med2e3_jax.cli.memory_plan"  # run again with `python -m`: __name__ may be __main__


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config: a bundled name (plans:finetune_8xh100) or "
                                    "a file (configs/plans.py:finetune_8xh100)", lock_config=False,
                                    flag_values=flag_values)
    flags.DEFINE_bool("all", False, "every plan of configs/plans.py, each in its own process; Markdown tables",
                      flag_values=flag_values)
    flags.DEFINE_list("plans", [], "with --all: only these plans of configs/plans.py", flag_values=flag_values)
    flags.DEFINE_integer("devices", 0, "fake devices (default: config.hardware.devices, else the mesh's product)",
                         flag_values=flag_values)
    flags.DEFINE_string("json_out", "", "also write the figures to this JSON file", flag_values=flag_values)
    flags.DEFINE_string("tables_from", "", "print the tables of an earlier `--all --json_out` file, compiling nothing",
                        flag_values=flag_values)


HEADROOM = 0.10  # a plan fits when the step leaves at least this fraction of the device memory free
GB = 1e9
_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_CPU_NOTE = ("XLA figures: per device, from XLA's CPU compiler (compiled.memory_analysis(): arguments, "
             "outputs, temporaries, generated code) for the fake mesh; they approximate, and here "
             "overestimate, what the GPU/TPU compiler allocates (see the script's docstring)")
_ROOFLINE_NOTE = ("Roofline: step >= max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / link bandwidth) "
                  "per device, FLOPs and bytes read from XLA:CPU's compiled step; MFU = model FLOPs / (step x peak). "
                  "Not modelled: compute/communication overlap (assumed perfect), latency, topology-aware and "
                  "hierarchical collectives, stragglers, the input pipeline, XLA:CPU vs GPU/TPU fusion and "
                  "scheduling (its HBM traffic is higher than a GPU/TPU's)")


def _device_count(config) -> int:
    if FLAGS.devices:
        return FLAGS.devices
    if "hardware" in config:
        return int(config.hardware.devices)
    sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
    if -1 in sizes:
        raise app.UsageError(f"mesh {dict(config.mesh)} has a -1 axis: pass --devices")
    return math.prod(sizes)


def _reexec_with_devices(count: int) -> None:
    """Runs this script again with `count` fake CPU devices (XLA reads the flag once, at backend start)."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    wanted = f"{_DEVICE_FLAG}={count}"
    if wanted in xla_flags.split() and _SCHEDULER_FLAG in xla_flags.split():
        return
    kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_FLAG) and f != _SCHEDULER_FLAG]
    env = dict(os.environ, XLA_FLAGS=" ".join(kept + [wanted, _SCHEDULER_FLAG]), JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, "-m", _MODULE, *sys.argv[1:]], env)


def plan_memory(config, devices: int) -> dict:
    """Compiles the config's step on `devices` fake devices: XLA's and the analytic figures, in bytes."""
    import jax

    from med2e3_jax import memory, roofline, sharding

    if jax.device_count() != devices:
        raise RuntimeError(f"{devices} devices wanted, jax has {jax.device_count()} (XLA_FLAGS set too late?)")
    mesh = sharding.make_mesh(config.mesh)
    start = time.perf_counter()
    lowered = memory.lower_abstract_train_step(config, mesh)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    estimate = memory.estimate(config, mesh_shape=dict(mesh.shape))
    counts = roofline.read_hlo(compiled.as_text(), devices)
    cost = roofline.cost_analysis(compiled)
    model_flops = _model_flops(config) / devices
    step = dict(
        hlo_matmul_flops=counts.matmul_flops, xla_cost_flops=cost.get("flops"),
        xla_cost_bytes_accessed=cost.get("bytes accessed"), model_flops=model_flops, hbm_bytes=counts.memory_bytes,
        loop_trip_counts=list(counts.loop_trip_counts), collective_bytes=counts.collective_bytes(),
        collective_ops={k: sum(c.kind == k for c in counts.collectives) for k in roofline.COLLECTIVE_KINDS},
    )
    if "hardware" in config and "peak_flops" in config.hardware:
        device = roofline.Device.from_config(config.hardware)
        bounds = roofline.roofline(counts.matmul_flops, counts.memory_bytes, counts.collectives, device)
        step["roofline"] = dict(compute_s=bounds.compute_s, memory_s=bounds.memory_s, network_s=bounds.network_s,
                                network_between_hosts_s=bounds.network_host_s, step_s=bounds.step_s,
                                bound=bounds.bound, mfu=roofline.mfu(model_flops, bounds.step_s, device.peak_flops))
    train = config.train
    return dict(
        config=config.hardware.plan if "hardware" in config else "",
        stage=train.stage,
        devices=devices,
        device_kind=config.hardware.device_kind if "hardware" in config else "",
        device_memory=float(config.hardware.memory_bytes) if "hardware" in config else None,
        mesh=dict(mesh.shape),
        global_batch=train.global_batch_size,
        micro_batches=train.micro_batches,
        rows_per_device=estimate.micro_batch_per_device,
        remat_policy=config.model.remat_policy,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        attention_impl=config.model.attention_impl,
        compile_seconds=seconds,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        xla=memory.xla_memory(compiled),
        analytic=dict(parameters=estimate.parameters, gradients=estimate.gradients, optimizer=estimate.optimizer,
                      activations=estimate.activations, total=estimate.total, **{
                          f"activations.{k}": v for k, v in estimate.activation_parts.items()}),
        total_parameters=estimate.total_parameters,
        trainable_parameters=estimate.trainable_parameters,
        step=step,
    )


def _model_flops(config) -> float:
    """Model FLOPs of one step (`med2e3_jax/flops.py`) on a global batch whose rows have as many
    supervised positions as the LM head has slots per row (`models.lm_loss.resolve_slots_per_row`)."""
    import numpy as np

    from med2e3_jax import flops
    from data_pipelines.image_placeholder import IGNORE_INDEX
    from med2e3_jax.models.lm_loss import resolve_slots_per_row

    rows, length = config.train.global_batch_size, config.model.llm_max_length
    labels = np.full((rows, length), IGNORE_INDEX, np.int32)
    labels[:, length - resolve_slots_per_row(config.train.head_slots_per_row, length):] = 0
    batch = dict(input_ids=np.zeros((rows, length), np.int32), labels=labels,
                 question_ids=np.zeros((rows, config.data.question_max_length), np.int32))
    return flops.model_flops(config.model, batch, config.train.trainable)


def _headroom(used: float, capacity: float | None) -> float | None:
    return None if not capacity else 1.0 - used / capacity


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def print_plan(r: dict) -> None:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    name = r["config"] or "config"
    memory = f"{r['device_memory'] / GB:.0f} GB" if r["device_memory"] else "unknown memory"
    print(f"{name}: {r['devices']} x {r['device_kind'] or 'device'} ({memory}); mesh {mesh}; stage {r['stage']}, "
          f"global batch {r['global_batch']} = {r['micro_batches']} micro-batches, {r['rows_per_device']:g} rows "
          f"per device each; remat {r['remat_policy']}; compute {r['dtype']}, parameters {r['param_dtype']}; "
          f"attention {r['attention_impl']} (XLA's on this CPU); parameters {r['total_parameters'] / 1e9:.3f}B, "
          f"trainable {r['trainable_parameters'] / 1e9:.3f}B; compiled in {r['compile_seconds']:.0f} s, "
          f"{r['peak_rss_bytes'] / GB:.1f} GB peak RSS")
    xla, analytic = r["xla"], r["analytic"]
    print(f"  {'GB per device':<26}{'XLA:CPU':>10}   {'analytic':<32}{'':>8}")
    left = [("arguments", xla["arguments"]), ("outputs", xla["outputs"]), ("- aliased (donated)", xla["aliased"]),
            ("temporaries", xla["temporaries"]), ("generated code", xla["generated_code"])]
    right = [(k, v) for k, v in analytic.items() if k != "total"]
    for i in range(max(len(left), len(right))):
        a = f"  {left[i][0]:<26}{left[i][1] / GB:>10.2f}" if i < len(left) else " " * 38
        b = f"   {right[i][0]:<32}{right[i][1] / GB:>8.2f}" if i < len(right) else ""
        print(a + b)
    print(f"  {'total':<26}{xla['total'] / GB:>10.2f}   {'total':<32}{analytic['total'] / GB:>8.2f}")
    print(f"  headroom of {memory}: XLA:CPU {_pct(_headroom(xla['total'], r['device_memory']))}, "
          f"analytic {_pct(_headroom(analytic['total'], r['device_memory']))}")
    print_step(r["step"])


def print_step(step: dict) -> None:
    loops = ", ".join(str(t) for t in step["loop_trip_counts"]) or "none"
    print(f"  per device and step: matmul FLOPs {step['hlo_matmul_flops']:.3g} (compiled HLO, loops x trip counts "
          f"[{loops}]), {step['xla_cost_flops']:.3g} (XLA cost analysis: while bodies once, elementwise too), "
          f"model {step['model_flops']:.3g} (flops.py; compiled / model = "
          f"{step['hlo_matmul_flops'] / step['model_flops']:.2f})")
    print(f"  HBM traffic {step['hbm_bytes'] / GB:.1f} GB (XLA:CPU's top-level instructions; cost analysis: "
          f"{step['xla_cost_bytes_accessed'] / GB:.1f} GB, while bodies once)")
    moved = ", ".join(f"{k} {v / GB:.2f} ({step['collective_ops'][k]} ops)" for k, v in step["collective_bytes"].items())
    print(f"  collectives, GB sent (ring): {moved}")
    if "roofline" in step:
        b = step["roofline"]
        print(f"  roofline: compute {b['compute_s'] * 1e3:.1f} ms, HBM {b['memory_s'] * 1e3:.1f} ms, network "
              f"{b['network_s'] * 1e3:.1f} ms ({b['network_between_hosts_s'] * 1e3:.1f} ms between hosts) -> "
              f"{b['bound']}-bound, step >= {b['step_s'] * 1e3:.1f} ms, MFU <= {b['mfu']:.0%}")


def markdown_table(results: list[dict]) -> str:
    head = ("| plan | devices | mesh (data, fsdp, tensor) | micro-batches x rows/device | remat | XLA:CPU args / "
            "temp / total GB | analytic params / grads / opt / act = total GB | device GB | headroom XLA:CPU | "
            "headroom analytic |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        x, a = r["xla"], r["analytic"]
        mesh = ", ".join(str(v) for v in r["mesh"].values())
        device_gb = f"{r['device_memory'] / GB:.0f}" if r["device_memory"] else "n/a"
        rows.append(
            f"| `{r['config']}` | {r['devices']} x {r['device_kind']} | ({mesh}) | {r['micro_batches']} x "
            f"{r['rows_per_device']:g} | {r['remat_policy']} | {x['arguments'] / GB:.1f} / {x['temporaries'] / GB:.1f}"
            f" / **{x['total'] / GB:.1f}** | {a['parameters'] / GB:.1f} / {a['gradients'] / GB:.1f} / "
            f"{a['optimizer'] / GB:.1f} / {a['activations'] / GB:.1f} = **{a['total'] / GB:.1f}** | "
            f"{device_gb} | {_pct(_headroom(x['total'], r['device_memory']))} | "
            f"{_pct(_headroom(a['total'], r['device_memory']))} |")
    return "\n".join(rows)


def step_table(results: list[dict]) -> str:
    head = ("| plan | devices | mesh (data, fsdp, tensor) | global batch | TFLOP/device: model / compiled | HBM GB | "
            "GB sent: all-gather / reduce-scatter / all-reduce / all-to-all / permute | ms: compute / HBM / network "
            "(between hosts) | bound | step ms | MFU |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        s, moved = r["step"], r["step"]["collective_bytes"]
        b = s.get("roofline")
        mesh = ", ".join(str(v) for v in r["mesh"].values())
        sent = " / ".join(f"{moved[k] / GB:.1f}" for k in moved)
        mfu = f"{b['mfu']:.0%}" if b else "n/a"
        times = (f"{b['compute_s'] * 1e3:.0f} / {b['memory_s'] * 1e3:.0f} / {b['network_s'] * 1e3:.0f} "
                 f"({b['network_between_hosts_s'] * 1e3:.0f})") if b else "n/a"
        step_ms = f"**{b['step_s'] * 1e3:.0f}**" if b else "n/a"
        rows.append(
            f"| `{r['config']}` | {r['devices']} x {r['device_kind']} | ({mesh}) | {r['global_batch']} | "
            f"{s['model_flops'] / 1e12:.1f} / {s['hlo_matmul_flops'] / 1e12:.1f} | {s['hbm_bytes'] / GB:.0f} | {sent} | "
            f"{times} | {b['bound'] if b else 'n/a'} | {step_ms} | {mfu} |")
    return "\n".join(rows)


def _fits(r: dict) -> bool:
    return bool(r["device_memory"]) and r["xla"]["total"] <= (1 - HEADROOM) * r["device_memory"]


def print_tables(results: list[dict]) -> None:
    print()
    print(_CPU_NOTE + ".")
    print(markdown_table(results))
    print()
    print(_ROOFLINE_NOTE + ".")
    print(step_table(results))


def run_all() -> None:
    from med2e3_jax.configs import plans

    results = []
    plans_file = os.path.abspath(plans.__file__)
    with tempfile.TemporaryDirectory() as tmp:
        names = FLAGS.plans or list(plans.PLANS)
        unknown = sorted(set(names) - set(plans.PLANS))
        if unknown:
            raise app.UsageError(f"--plans {unknown}: configs/plans.py has {sorted(plans.PLANS)}")
        for name in names:
            out = os.path.join(tmp, f"{name}.json")
            print(f"compiling {name} ...", flush=True)
            subprocess.run([sys.executable, "-m", _MODULE, f"--config={plans_file}:{name}", f"--json_out={out}"],
                           check=True)
            with open(out, encoding="utf-8") as f:
                results.append(json.load(f))
    print_tables(results)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    print(f"RESULT plans={len(results)} fit={sum(_fits(r) for r in results)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.tables_from:
        with open(FLAGS.tables_from, encoding="utf-8") as f:
            results = json.load(f)
        if not isinstance(results, list):
            raise app.UsageError(f"--tables_from {FLAGS.tables_from}: not the list of plans `--all --json_out` writes")
        print_tables(results)
        return
    if FLAGS.all:
        run_all()
        return
    if FLAGS.config is None:
        raise app.UsageError("pass --config (e.g. plans:finetune_8xh100) or --all")
    config = FLAGS.config
    devices = _device_count(config)
    _reexec_with_devices(devices)
    result = plan_memory(config, devices)
    print(_CPU_NOTE + ".")
    print(_ROOFLINE_NOTE + ".")
    print_plan(result)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    if result["device_memory"]:
        print(f"RESULT plans=1 fit={int(_fits(result))}")
    else:
        print(f"RESULT total_gb={result['xla']['total'] / GB:.3f}")


def run() -> None:
    run_command(__name__, define_flags, main, config_file_flag="config")


if __name__ == "__main__":
    run()
