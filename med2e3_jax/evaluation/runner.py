"""Scoring a model on a task: generate over the records in batches, keep every prediction, score them.

    records ── not yet in predictions.jsonl ── batches ── predict_fn ── appended to predictions.jsonl
    every record's prediction ── per-sample scores (metrics.py) ── per type / overall ── metrics.json, .md

The model is behind `predict_fn(records) -> [{"prediction": str, "slice_scores": [float] | None}, ...]`
(one dict per record, in order), so the loop is the same for the JAX model (`scripts/evaluate.py`), a
PyTorch reference, or a fake in tests. Predictions are appended to `predictions.jsonl` and flushed to
disk after each batch: a rerun of the same command reads them back and generates only what is missing,
so an interrupted evaluation loses at most one batch. A line cut short by the interruption is dropped.
Each line carries the fingerprint of the record it answered (`input_fingerprint`): a record whose
question, volume or prompt changed since is predicted again rather than given the old answer.

Outputs in `out_dir`:
  predictions.jsonl  the log: one line per generated sample
  predictions.json   every record in order: id, question, reference, prediction, question_type,
                     slice_scores (and answer_choice for closed VQA) plus its per-sample scores
  metrics.json       the task's summary (see `metrics.aggregate`) and any metric skipped, with why
  metrics.md         the same as a Markdown table, scores × 100
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from data_pipelines.model_inputs import tgis_question
from med2e3_jax.evaluation import metrics as M
from med2e3_jax.evaluation.tasks import (
    Task,
    answer_choice,
    check_unique_ids,
    get_task,
    record_id,
    reference,
    type_name,
)

logger = logging.getLogger(__name__)

PredictFn = Callable[[list[dict]], Sequence[Mapping]]

PREDICTIONS_LOG = "predictions.jsonl"
PREDICTIONS = "predictions.json"
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"


def evaluate(
    task: str | Task,
    records: Sequence[Mapping],
    predict_fn: PredictFn,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    bertscore: M.BertScore | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Predict every record not yet predicted in `out_dir`, score all of them, write the outputs.

    Args:
      task: a name in `tasks.TASKS` or a Task.
      records: annotation records (`tasks.load_task_records`), each with a unique id.
      predict_fn: a batch of records -> one {"prediction", "slice_scores"} per record.
      out_dir: where the outputs go (see the module docstring); created if missing.
      batch_size: records per `predict_fn` call.
      bertscore: the BERTScore model; without it bert_f1 is skipped, and said so in metrics.json.
      metrics: a subset of the task's metrics to compute (default all).
      progress: show a progress bar.

    Returns:
      The summary written to metrics.json.
    """
    task = get_task(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = tuple(task.metrics if metrics is None else metrics)
    unknown = [m for m in wanted if m not in task.metrics]
    if unknown:
        raise ValueError(f"task {task.name} has no metrics {unknown}; it has {task.metrics}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Every record's reference is checked before the first (slow) generation, not after it.
    samples = [_sample(task, record, index) for index, record in enumerate(records)]
    check_unique_ids([s["id"] for s in samples])
    log_path = out / PREDICTIONS_LOG
    done = read_predictions(log_path)
    inputs = [input_fingerprint(record) for record in records]
    todo = [i for i, s in enumerate(samples) if done.get(s["id"], {}).get("input") != inputs[i]]
    changed = sum(1 for i in todo if samples[i]["id"] in done)
    if changed:
        logger.info("%s: %d records changed since %s predicted them (or it predates fingerprints): predicting "
                    "them again", task.name, changed, log_path)
    if done:
        logger.info("%s: %d of %d records already predicted in %s", task.name, len(samples) - len(todo),
                    len(samples), log_path)

    with open(log_path, "a", encoding="utf-8") as log, tqdm(
        total=len(samples), initial=len(samples) - len(todo), desc=task.name, unit="sample", disable=not progress
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            results = list(predict_fn([dict(records[i]) for i in batch]))
            if len(results) != len(batch):
                raise ValueError(f"predict_fn returned {len(results)} results for a batch of {len(batch)} records")
            for i, result in zip(batch, results):
                row = {"id": samples[i]["id"], "input": inputs[i], **_prediction(result, samples[i]["id"])}
                log.write(json.dumps(row) + "\n")
                done[row["id"]] = row
            log.flush()
            os.fsync(log.fileno())
            bar.update(len(batch))

    rows = [{**s, "prediction": done[s["id"]]["prediction"], "slice_scores": done[s["id"]]["slice_scores"]}
            for s in samples]
    scores, skipped = score_predictions(task, rows, wanted, bertscore=bertscore)
    computed = [m for m in wanted if m not in skipped]
    summary = {
        "task": task.name,
        "title": task.title,
        "metrics": computed,
        "skipped": skipped,
        **M.aggregate([{**r, **s} for r, s in zip(rows, scores)], computed),
    }
    _write_atomic(out / PREDICTIONS, json.dumps([{**r, "scores": s} for r, s in zip(rows, scores)], indent=1))
    _write_atomic(out / METRICS_JSON, json.dumps(summary, indent=1))
    _write_atomic(out / METRICS_MD, markdown_table(summary))
    return summary


def input_fingerprint(record: Mapping) -> str:
    """A digest of what a prediction depends on: the record without its references (`answer`,
    `answer_choice`, the final gpt turn), which are scored against but never shown to the model."""
    prompt = {key: value for key, value in record.items() if key not in ("answer", "answer_choice")}
    turns = list(prompt.get("conversations") or [])
    if turns and isinstance(turns[-1], Mapping) and turns[-1].get("from") == "gpt":
        prompt["conversations"] = turns[:-1]
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sample(task: Task, record: Mapping, index: int) -> dict:
    sample = {
        "id": record_id(record, index),
        "question": tgis_question(record),
        "reference": reference(record),
        "question_type": record.get("question_type"),
    }
    if task.judge == "closed_vqa":
        sample["answer_choice"] = answer_choice(record)
    return sample


def _prediction(result: Mapping, key: str) -> dict:
    if not isinstance(result, Mapping) or not isinstance(result.get("prediction"), str):
        raise ValueError(f"predict_fn result for record {key!r} must be a dict with a str 'prediction', got {result!r}")
    slice_scores = result.get("slice_scores")
    if slice_scores is not None:
        slice_scores = np.asarray(slice_scores, np.float64).reshape(-1).tolist()
    return {"prediction": result["prediction"], "slice_scores": slice_scores}


def read_predictions(path: str | os.PathLike) -> dict[str, dict]:
    """The predictions logged in `path` by id (empty when there is no log). A last line without its
    newline — the write an interruption cut short — is removed from the file."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path,
                       len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error}); delete the line or the file to redo it") from None
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("prediction"), str):
            raise ValueError(f"{path}:{number} is not a prediction {{'id', 'prediction', ...}}: {line[:200]}")
        row.setdefault("slice_scores", None)
        done[str(row["id"])] = row
    return done


def score_predictions(
    task: Task, rows: Sequence[Mapping], metrics: Sequence[str], *, bertscore: M.BertScore | None = None
) -> tuple[list[dict], dict[str, str]]:
    """Per-sample scores of `rows` ({"prediction", "reference", "answer_choice"?}) and the metrics
    skipped, with the reason."""
    skipped = {}
    if "bert_f1" in metrics and bertscore is None:
        skipped["bert_f1"] = "no BERTScore model given (set bertscore_model to a local model folder)"
        logger.warning("%s: BERTScore skipped: %s", task.name, skipped["bert_f1"])
    text = [m for m in metrics if m in M.TEXT_METRICS and m not in skipped]
    scores = M.text_scores([r["prediction"] for r in rows], [r["reference"] for r in rows], text,
                           bertscore=bertscore)
    if M.ACCURACY in metrics:
        for row, score in zip(rows, scores):
            if task.judge == "closed_vqa":
                score[M.ACCURACY] = M.closed_vqa_correct(row["prediction"], row["answer_choice"])
            else:
                score[M.ACCURACY] = M.ctrate_choice_correct(row["prediction"], row["reference"])
    return [{m: s[m] for m in metrics if m in s} for s in scores], skipped


# ---------------------------------------------------------------------------------------------------
# Writing.


def markdown_table(summary: Mapping) -> str:
    """The summary of `evaluate` as a Markdown table: one row per question type (when there are
    several or the task is typed), their mean, and all samples; scores × 100."""
    names = list(summary["metrics"])
    header = "| | n | " + " | ".join(_METRIC_TITLES.get(m, m) for m in names) + " |"
    lines = [f"### {summary['title']}", "", header, "|" + "---|" * (len(names) + 2)]

    def row(label, stats, count=True):
        cells = [f"{100 * stats[m]:.2f}" if stats.get(m) is not None else "–" for m in names]
        return f"| {label} | {stats['count'] if count else ''} | " + " | ".join(cells) + " |"

    for key, stats in summary.get("per_type", {}).items():
        label = type_name(key)
        lines.append(row(label, stats))
    if "per_type" in summary:
        lines.append(row("mean of types", summary["mean_of_types"], count=False))
    lines.append(row("**overall**", summary["overall"]))
    for name, why in summary.get("skipped", {}).items():
        lines.append(f"\n{_METRIC_TITLES.get(name, name)} not computed: {why}.")
    return "\n".join(lines) + "\n"


_METRIC_TITLES = {
    "accuracy": "Accuracy", "bleu1": "BLEU-1", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR",
    "bert_f1": "BERTScore-F1",
}


def _write_atomic(path: pathlib.Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
