"""The quick start's report: what the tiny model learned, and where TG-IS looked.

    python scripts/quickstart_report.py --run runs/quickstart [--figures 4]

Reads what `scripts/quickstart.sh` left in the run folder — the two training stages' `metrics.jsonl`, the
evaluations under `eval/` (predictions with their slice scores) and the data's annotation files — and
writes beside them:

    summary.md          training, the metrics tables, the closed-VQA accuracy against the answer-prior
                        baseline, and the TG-IS grounding table (score mass on the slices that hold
                        the asked-about finding against their uniform share)
    grounding.json      the grounding figures per question type
    figures/*.png       slice-attention figures of held-out questions with the ground truth shaded, and
                        one figure comparing several questions on the same volume

The answer-prior baseline answers every question with the answer most often right for its question type
in the training split: what a model scores that reads the question but not the scan. Open answers are
also scored by exact match against it (the phantoms' open answers are short templated sentences).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections import Counter, defaultdict

from absl import app, flags

flags.DEFINE_string("run", "runs/quickstart", "the run folder of scripts/quickstart.sh")
flags.DEFINE_integer("figures", 4, "slice-attention figures of held-out closed questions")
FLAGS = flags.FLAGS

STAGES = ("pretrain", "finetune")
# Evaluation folder -> the annotation file (under data/annotations/npy/) it was run on.
EVALUATIONS = {
    "m3d_vqa_closed": "vqa_closed_test.json",
    "m3d_vqa_open": "vqa_open_test.json",
}
REAL_CT = "real_ct"  # the real-CT grounded set, when the quick start evaluated it (eval/real_ct/)


def _read_json(path: pathlib.Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def training_lines(run: pathlib.Path) -> list[str]:
    lines = ["| stage | steps | first logged loss | last logged loss | step time (s) | last TG-IS entropy (nats) |",
             "|---|---|---|---|---|---|"]
    for stage in STAGES:
        path = run / stage / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows:
            continue
        timed = [r["step_time"] for r in rows[1:]] or [rows[0]["step_time"]]  # the first window compiles
        lines.append(f"| {stage} | {rows[-1]['step']} | {rows[0]['loss']:.3f} | {rows[-1]['loss']:.3f} | "
                     f"{sum(timed) / len(timed):.3f} | {rows[-1].get('slice_score_entropy', float('nan')):.3f} |")
    return lines


def prior_baseline(train_records: list[dict], test_records: list[dict]) -> dict:
    """Accuracy of answering, per question type, the answer most often right in training (`answer`)."""
    from med2e3_jax.evaluation.metrics import share_by_type
    from med2e3_jax.evaluation.tasks import type_name

    counts = defaultdict(Counter)
    for record in train_records:
        counts[record.get("question_type")][record["answer"]] += 1
    hits = defaultdict(list)
    for record in test_records:
        kind = record.get("question_type")
        guess = counts[kind].most_common(1)[0][0] if counts[kind] else None
        hits[type_name(kind)].append(guess == record["answer"])
    return share_by_type(hits)


def closed_accuracy(summary: dict) -> dict:
    """The evaluation's closed-VQA accuracy (the authors' letter rule) in `share_by_type`'s shape."""
    from med2e3_jax.evaluation.tasks import type_name

    per_type = {type_name(k): v for k, v in summary.get("per_type", {}).items()}
    return {"per_type": {k: v["accuracy"] for k, v in per_type.items()}, "count": {k: v["count"] for k, v in per_type.items()},
            "overall": summary["overall"]["accuracy"], "total": summary["overall"]["count"]}


def comparison_lines(model: dict, baseline: dict, chance: str) -> list[str]:
    lines = ["| question type | n | tiny Med-2E3 | answer-prior baseline | chance |", "|---|---|---|---|---|"]
    for name, accuracy in model["per_type"].items():
        lines.append(f"| {name} | {model['count'][name]} | {100 * accuracy:.1f} % | "
                     f"{100 * baseline['per_type'].get(name, float('nan')):.1f} % | {chance} |")
    lines.append(f"| **overall** | {model['total']} | {100 * model['overall']:.1f} % | "
                 f"{100 * baseline['overall']:.1f} % | {chance} |")
    return lines


def draw_figures(run: pathlib.Path, rows: list[dict], records: list[dict], count: int, prefix: str,
                 shape: tuple[int, int, int]) -> list[str]:
    """Slice-attention figures of the first `count` predictions with a ground truth, and one grid of the
    questions asked about the first volume that has several; volumes shown as the model saw them
    (`shape`, the model's volume shape)."""
    from data_pipelines.preprocess import preprocess_volume
    from data_pipelines.readers import read_volume
    from med2e3_jax import viz

    by_id = {str(r["id"]): r for r in records}
    written, volumes = [], {}

    def volume_of(record):
        path = record["vision3d"][0]
        if path not in volumes:
            volumes[path] = preprocess_volume(read_volume(path), shape=shape, modality="auto")
        return volumes[path]

    grounded = [r for r in rows if r.get("slice_scores") and by_id[str(r["id"])].get("answer_slices")]
    for row in grounded[:count]:
        record = by_id[str(row["id"])]
        fig = viz.slice_attention_figure(volume_of(record), row["slice_scores"], record["question"],
                                         answer=f"{row['prediction']}  (reference: {row['reference']})",
                                         truth=record["answer_slices"])
        written.append(viz.save_figure(fig, run / "figures" / f"{prefix}_{row['id']}.png"))
    per_volume = defaultdict(list)
    for row in rows:
        if row.get("slice_scores"):
            per_volume[by_id[str(row["id"])]["vision3d"][0]].append(row)
    several = [group for group in per_volume.values() if len(group) > 1]
    if several:
        group = several[0][:4]
        record = by_id[str(group[0]["id"])]
        fig = viz.question_grid_figure(volume_of(record), [r["slice_scores"] for r in group],
                                       [by_id[str(r["id"])]["question"].split(" Choices:")[0] for r in group],
                                       answers=[r["prediction"] for r in group])
        written.append(viz.save_figure(fig, run / "figures" / f"{prefix}_questions_{group[0]['id']}.png"))
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from med2e3_jax.checkpoint.orbax_params import load_config
    from med2e3_jax.evaluation.grounding import grounding_summary, grounding_table
    from med2e3_jax.evaluation.metrics import exact_match_by_type

    run = pathlib.Path(FLAGS.run)
    annotations = run / "data" / "annotations" / "npy"
    cfg = load_config(run / "finetune" / "model")
    shape = tuple(int(s) for s in cfg.vision3d.img_size)

    out = ["# Quick start: the tiny Med-2E3 on the phantom set", "", "## Training", "", *training_lines(run), ""]
    grounding, figures = {}, []
    from data_pipelines.annotations import load_records

    for task, annotation in EVALUATIONS.items():
        folder = run / "eval" / task
        if not (folder / "metrics.md").exists():
            continue
        out += [(folder / "metrics.md").read_text(encoding="utf-8"), ""]
        rows = _read_json(folder / "predictions.json")
        records = load_records(annotations / annotation, run / "data", validate=False)
        train_records = load_records(annotations / annotation.replace("_test", "_train"), run / "data", validate=False)
        baseline = prior_baseline(train_records, records)
        if task == "m3d_vqa_closed":
            out += ["### Closed VQA (the authors' rule: the right letter) against answering from the question alone",
                    "", *comparison_lines(closed_accuracy(_read_json(folder / "metrics.json")), baseline, "25 %"), ""]
            figures += draw_figures(run, rows, records, FLAGS.figures, "phantom", shape)
        else:
            out += ["### Open VQA: exact answers against answering from the question alone", "",
                    *comparison_lines(exact_match_by_type(rows), baseline, "–"), ""]
        grounding[task] = grounding_summary(rows, records)

    real = run / "eval" / "real_ct" / "m3d_vqa_closed"
    if (real / "predictions.json").exists():
        rows = _read_json(real / "predictions.json")
        records = load_records(run / "real_ct" / "annotations" / "source" / "vqa_closed_test.json", run / "real_ct", validate=False)
        out += ["## Real CT (TotalSegmentator's example scan)", "", (real / "metrics.md").read_text(encoding="utf-8"), ""]
        grounding[REAL_CT] = grounding_summary(rows, records)
        figures += draw_figures(run, rows, records, 2, "real_ct", shape)

    out += ["## Where TG-IS looks", "",
            "Score mass on the slices that hold what the question asks about, against the share those slices "
            "would get from uniform scores (lift > 1: the model looks there more than by chance). Scores can "
            "beat uniform without reading the question (they favour the body, or one salient slice), so the "
            "last three columns hold the control, on the scans that were asked more than one question: the "
            "mass on this question's slices against the mass the *other* questions about the same scan put "
            "there, their ratio, the text lift (1.00× when the question changes nothing), and how far the "
            "scores move between those questions (total-variation distance: 0 when they do not move, 1 when "
            "two questions look at disjoint slices; a large shift with a text lift near 1 means the question "
            "moves the scores, but not towards what it asks about).", ""]
    for task, summary in grounding.items():
        if summary["overall"] is not None:
            out += [f"### {task}", "", grounding_table(summary)]
    out += ["## Figures", "", *(f"![{os.path.basename(p)}](figures/{os.path.basename(p)})" for p in figures), ""]
    (run / "grounding.json").write_text(json.dumps(grounding, indent=1) + "\n", encoding="utf-8")
    (run / "summary.md").write_text("\n".join(out), encoding="utf-8")
    print("\n".join(out))
    logging.info("report in %s", run / "summary.md")


if __name__ == "__main__":
    app.run(main)
