"""Peak resident memory and time of converting a PyTorch checkpoint to Orbax (scripts/convert_checkpoint.py).

    python benchmarks/bench_convert.py --checkpoint DIR/release --out DIR/orbax \
        --config configs/med2e3_m3d.py --config.model.param_dtype=bfloat16

The conversion runs as a child process (the `--config*` arguments are passed on to it); its resident set
size, children included, is sampled every `--interval` seconds, and the kernel's own high-water mark
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`) is read when it exits: the peak is the larger of the two.
The size of the converted parameters is the bytes of the parameters written, read from the Orbax
checkpoint's metadata (shapes and dtypes, nothing loaded), so that the budget is measured against what
the conversion produced. GB are 10^9 bytes.

The last line is `RESULT convert_peak_rss_gb=<peak> param_gb=<params> ratio=<1.3 * params / peak>`:
a ratio above 1 means the conversion stayed within 1.3 times the size of the parameters.
"""

import os
import resource
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import psutil
from absl import app, flags
from ml_collections import config_flags

from med2e3_jax.checkpoint.orbax_params import PARAMS_ITEM

flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint to convert (release directory, file or HF folder)")
flags.DEFINE_string("out", None, "Orbax directory to write")
config_flags.DEFINE_config_file("config", "configs/med2e3_m3d.py", "experiment config, passed on to the "
                                "conversion with its --config.* overrides", lock_config=False)
flags.DEFINE_float("interval", 0.05, "seconds between RSS samples")
flags.DEFINE_float("budget", 1.3, "allowed peak RSS, as a multiple of the converted parameters' bytes")
flags.mark_flags_as_required(["checkpoint", "out"])
FLAGS = flags.FLAGS

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONVERT = os.path.join(REPO, "scripts", "convert_checkpoint.py")


def _tree_rss(process: psutil.Process) -> int:
    """Resident bytes of `process` and all its descendants (0 for those that just exited)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_sampled(command: list[str], interval: float) -> tuple[int, float, int]:
    """Runs `command`; returns (peak RSS in bytes, wall seconds, exit code)."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, _tree_rss(process))
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    code = child.wait()
    seconds = time.perf_counter() - start
    kernel_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return max(peak, kernel_peak), seconds, code


def orbax_param_sizes(directory: str) -> tuple[int, dict[str, int]]:
    """(bytes, top-level submodule -> number of parameters) of the parameters in an Orbax checkpoint."""
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.path.join(os.path.abspath(directory), PARAMS_ITEM)).item_metadata
    total_bytes, counts = 0, {}
    for path, leaf in ocp.tree.to_flat_dict(metadata).items():
        size = int(np.prod(leaf.shape, dtype=np.int64))
        total_bytes += size * np.dtype(leaf.dtype).itemsize
        counts[path[0]] = counts.get(path[0], 0) + size
    return total_bytes, counts


def main(argv):
    del argv
    overrides = [f"--config.{name}={value}" for name, value in config_flags.get_override_values(FLAGS["config"]).items()]
    command = [sys.executable, CONVERT, f"--config={config_flags.get_config_filename(FLAGS['config'])}", *overrides,
               f"--checkpoint={FLAGS.checkpoint}", f"--out={FLAGS.out}"]
    print(" ".join(command), flush=True)
    peak, seconds, code = run_sampled(command, FLAGS.interval)
    if code:
        sys.exit(f"conversion failed with exit code {code} (peak RSS {peak / 1e9:.2f} GB after {seconds:.0f}s)")
    param_bytes, counts = orbax_param_sizes(FLAGS.out)
    print(f"\n{'component':<20}{'parameters':>16}")
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"{name:<20}{count:>16,}")
    print(f"{'total':<20}{sum(counts.values()):>16,}")
    print(f"\nconversion: {seconds:.1f}s, peak RSS {peak / 1e9:.2f} GB, converted parameters {param_bytes / 1e9:.2f} GB "
          f"({peak / param_bytes:.2f}x; budget {FLAGS.budget}x)")
    print(f"RESULT convert_peak_rss_gb={peak / 1e9:.2f} param_gb={param_bytes / 1e9:.2f} "
          f"ratio={FLAGS.budget * param_bytes / peak:.2f}")


if __name__ == "__main__":
    app.run(main)
