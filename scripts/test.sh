#!/usr/bin/env bash
# Installs what is missing (the package with its test extra) and runs the test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k decoder # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import med2e3_jax, torch, pytest, transformers, flax" >/dev/null 2>&1; then
  # torch is pinned to 2.13.0: any looser pin pulls a multi-GB CUDA build.
  "$PYTHON" -m pip install --quiet -e ".[test]"
fi
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec "$PYTHON" -m pytest tests -q "$@"
