#!/usr/bin/env bash
# The accelerator check, unattended: a medium Med-2E3 (configs/medium.py, 1.06B) training step and
# generation on every local device, with step time, tokens/s, MFU and peak device memory.
#
#   bash scripts/device_check.sh                         # configs/medium.py
#   bash scripts/device_check.sh --config configs/tiny.py --steps 2 --new_tokens 4   # arguments go to device_check.py
#
# Installs only what is missing: the project itself (pip install -e .) and, when an NVIDIA GPU is
# present but jax has no GPU backend, jax[cuda12] at the installed jax version; it prints each command
# first. DEVICE_CHECK_DRY_RUN=1 prints them without running them. The check runs under a time limit
# (DEVICE_CHECK_TIMEOUT seconds, default 290). The last line is always a RESULT line.
set -uo pipefail
cd "$(dirname "$0")/.."
TIMEOUT="${DEVICE_CHECK_TIMEOUT:-290}"
DRY_RUN="${DEVICE_CHECK_DRY_RUN:-0}"

run_install() {
  echo "+ $*"
  if [ "$DRY_RUN" = 1 ]; then
    echo "  (DEVICE_CHECK_DRY_RUN=1: not run)"
    return 0
  fi
  "$@"
}

if ! python -c "import med2e3_jax" 2>/dev/null; then
  run_install python -m pip install -q -e . || { echo "RESULT status=install_failed"; exit 1; }
fi
backend="$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)"
if [ "$backend" != "gpu" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  jax_version="$(python -c 'import jax; print(jax.__version__)')"
  echo "an NVIDIA GPU is present but jax's backend is '$backend': installing the CUDA 12 plugin for jax $jax_version"
  run_install python -m pip install -q -e . "jax[cuda12]==$jax_version" || { echo "RESULT status=install_failed"; exit 1; }
  backend="$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)"
fi
echo "jax backend: $backend"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# XLA's default (75% of the GPU preallocated) would cap the peak-memory figure below the device's.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
has_config=0
for arg in "$@"; do case "$arg" in --config|--config=*) has_config=1 ;; esac; done
args=("$@")
[ "$has_config" = 1 ] || args=(--config configs/medium.py "${args[@]}")

log="$(mktemp)"
timeout "$TIMEOUT" python scripts/device_check.py "${args[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then
  reason=failed
  [ "$rc" = 124 ] && reason="timed_out_after_${TIMEOUT}s"
  echo "RESULT status=$reason rc=$rc"
  exit "$rc"
fi
rm -f "$log"
