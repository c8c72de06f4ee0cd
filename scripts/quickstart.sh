#!/usr/bin/env bash
# The README's first command: installs the project if needed, then runs the tiny model end to end
# (forward pass, TG-IS slice scores, greedy generation) on a synthetic volume.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import med2e3_jax, flax, orbax.checkpoint" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet -e .
fi
exec "$PYTHON" scripts/demo.py --config configs/tiny.py "$@"
