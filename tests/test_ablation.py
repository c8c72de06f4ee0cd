"""The ablation's figures over seeds, the format claim's distances, and `benchmarks/ablation.py --smoke`."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from assets_for_tests import fetched
from med2e3_jax.evaluation.grounding import format_shift
from med2e3_jax.evaluation.seeds import over_seeds, paired_interval

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_format_shift_compares_closed_with_open_and_other_questions_of_the_scan():
    def rows(form, items):
        return [dict(id=f"{scan}_{kind}_{form}", slice_scores=scores) for scan, kind, scores in items]

    closed = rows("closed", [("p0", "organ", [1, 0, 0, 0]), ("p0", "size", [0, 0, 1, 0]),
                             ("p1", "organ", [0, 0, 0, 2])])
    opened = rows("open", [("p0", "organ", [0.5, 0.5, 0, 0]), ("p1", "organ", [0, 0, 0, 1])])
    shift = format_shift(closed, opened)
    # Pairs: p0 organ 0.5, p1 organ 0 (scores are normalised). Different kinds, p0 only: organ/size 1, 1.
    assert shift == dict(same=0.25, different=1.0, pairs=2)


def test_format_shift_names_an_id_it_cannot_pair():
    with pytest.raises(ValueError, match="'record7'"):
        format_shift([dict(id="record7", slice_scores=[1.0])], [])


def test_paired_interval_is_the_student_t_interval():
    mean, half = paired_interval([1.0, 2.0, 3.0])
    # sd 1, n 3: t(0.975, 2) = 4.302653 from the table, / sqrt(3).
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(paired_interval([0.5])[1])


def test_over_seeds_pairs_each_seed_with_the_reference_seed():
    results = {"tgis": [dict(acc=0.5, lift=2.0), dict(acc=0.7, lift=None)],
               "mean": [dict(acc=0.4, lift=None), dict(acc=0.4, lift=None)]}
    table = over_seeds(results, "tgis")
    assert table["acc"]["tgis"]["mean"] == pytest.approx(0.6)
    assert table["acc"]["tgis"]["std"] == pytest.approx(math.sqrt(0.02))
    assert "diff" not in table["acc"]["tgis"]
    # Paired: 0.4 - 0.5 and 0.4 - 0.7.
    assert table["acc"]["mean"]["diff"] == pytest.approx(-0.2)
    assert table["acc"]["mean"]["half_width"] == pytest.approx(12.706205 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)
    assert table["lift"] == {"tgis": dict(mean=2.0, n=1, std=pytest.approx(math.nan, nan_ok=True))}


def test_ablation_smoke_runs_two_variants_and_resumes(tmp_path):
    for name in ("tokenizers/phi3", "minilm"):
        fetched(name)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    command = [sys.executable, "benchmarks/ablation.py", "--smoke", f"--out={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    table = json.loads((tmp_path / "ablation.json").read_text(encoding="utf-8"))
    assert set(table["closed/overall"]) == {"tgis", "3d"}
    assert "diff" in table["closed/overall"]["3d"] and "tgis/lift" in table and "3d" not in table["tgis/lift"]
    assert table["format/same_question_tv"]["tgis"]["n"] == 1
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "| closed/overall |" in (tmp_path / "ablation.md").read_text(encoding="utf-8")
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT tgis=")
    # A second call trains nothing: every run's result.json is kept as it was.
    results = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/result.json")}
    assert len(results) == 2
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in results} == results
    assert "med2e3_jax.cli.train" not in again.stderr


# In a process of its own: the benchmark defines absl flags at import, which this process may hold already.
_CHECK_VARIANTS = """
import sys
sys.path[:0] = [{root!r}, {benchmarks!r}]
from flax import nnx
import ablation
from configs import tiny
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.train.state import check_trainable
for variant, overrides in ablation.VARIANTS.items():
    config = tiny.get_config({stage!r})
    for key, value in overrides.items():
        node, _, leaf = key.rpartition(".")
        target = config
        for part in node.split("."):
            target = target[part]
        target[leaf] = ablation.CT_SLICE_WINDOWS if leaf == "slice_windows" else value
    trainable = ablation.TRAINABLE.get(variant, {{}}).get({stage!r})
    if trainable is not None:
        config.train.trainable = trainable
    model = nnx.eval_shape(lambda: Med2E3(config.model, rngs=nnx.Rngs(0)))
    check_trainable(model, config.train)  # raises naming what the variant's model lacks
    print("ok", variant)
"""


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_variant_trains_modules_its_model_has(stage):
    code = _CHECK_VARIANTS.format(root=str(ROOT), benchmarks=str(ROOT / "benchmarks"), stage=stage)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split().count("ok") == 7
