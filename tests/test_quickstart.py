"""The README's first command, end to end, on a handful of phantoms and a few training steps."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from assets_for_tests import fetched

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    for name in ("tokenizers/phi3", "minilm", "totalsegmentator"):
        fetched(name)
    run = tmp_path_factory.mktemp("quickstart") / "run"
    env = dict(os.environ, RUN=str(run), PYTHON=sys.executable, PHANTOMS="20", PRETRAIN_STEPS="2",
               FINETUNE_STEPS="2", EVAL_LIMIT="4")
    env.pop("XLA_FLAGS", None)  # the scripts run on one CPU device, as a user's would
    done = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return run, done.stdout


def test_quickstart_writes_metrics_grounding_and_figures(quickstart_run):
    run, stdout = quickstart_run
    summary = (run / "summary.md").read_text(encoding="utf-8")
    for heading in ("## Training", "### M3D-VQA closed", "answer-prior baseline", "### M3D-VQA open",
                    "## Real CT", "## Where TG-IS looks"):
        assert heading in summary, heading
    assert "quick start done" in stdout
    grounding = json.loads((run / "grounding.json").read_text(encoding="utf-8"))
    assert grounding["m3d_vqa_closed"]["overall"]["count"] > 0
    assert grounding["real_ct"]["overall"]["count"] > 0
    figures = sorted((run / "figures").glob("*.png"))
    assert any(f.name.startswith("phantom_") for f in figures) and any(f.name.startswith("real_ct_") for f in figures)
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{figure.name}" in summary


def test_quickstart_trains_both_stages_and_exports_the_model(quickstart_run):
    run, _ = quickstart_run
    for stage in ("pretrain", "finetune"):
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 2
    assert (run / "finetune" / "model" / "model_config.json").exists()
    predictions = json.loads((run / "eval" / "m3d_vqa_closed" / "predictions.json").read_text())
    assert len(predictions) == 4 and all(len(p["slice_scores"]) == 32 for p in predictions)
