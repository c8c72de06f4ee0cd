"""scripts/device_check.sh: the accelerator check, run here on CPU with the tiny config."""

import os
import re
import subprocess

import pytest

from med2e3_jax.cli.device_check import peak_flops

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v5", 459e12), ("TPU v5 lite", None), ("cpu", None),
])
def test_peak_flops_come_from_the_device_kind(kind, expected):
    assert peak_flops(kind) == expected


def test_device_check_prints_positive_figures_and_a_result_line():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["DEVICE_CHECK_DRY_RUN"] = "1"  # install nothing, whatever this machine lacks
    run = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
         "--config.train.global_batch_size=4", "--steps", "2", "--new_tokens", "3", "--peak_flops", "1e12"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), run.stdout[-2000:]
    figures = dict(item.split("=") for item in last.split()[1:])
    for name in ("step_s", "tokens_per_s", "mfu", "generate_tokens_per_s"):
        assert float(figures[name]) > 0, (name, last)
    # CPU keeps no device memory statistics; an accelerator prints a number.
    assert figures["peak_memory_gb"] == "n/a" or float(figures["peak_memory_gb"]) > 0
    assert re.search(r"train: [\d.]+ ms/step", run.stdout)
    assert re.search(r"generate: \d+ prompts of \d+ positions, 3 new tokens each", run.stdout)
