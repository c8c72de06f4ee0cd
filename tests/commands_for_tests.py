"""Runs an installed command's module (`python -m med2e3_jax.cli.NAME`) in a fresh process, from a
folder outside the checkout so that nothing is found by the working directory."""

import subprocess
import sys


def run_command(name: str, *args, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"med2e3_jax.cli.{name}", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)
