"""Scoring Med-2E3 on the paper's benchmarks, with the authors' metrics (see `metrics`, `tasks`, `runner`)."""

from med2e3_jax.evaluation.metrics import (
    BertScore,
    MetricUnavailable,
    aggregate,
    bleu1,
    closed_vqa_correct,
    ctrate_choice_correct,
    meteor,
    prepare_nltk_data,
    rouge,
    text_scores,
)
from med2e3_jax.evaluation.runner import evaluate, markdown_table, read_predictions
from med2e3_jax.evaluation.tasks import TASKS, Task, get_task, load_task_records

__all__ = [
    "TASKS",
    "BertScore",
    "MetricUnavailable",
    "Task",
    "aggregate",
    "bleu1",
    "closed_vqa_correct",
    "ctrate_choice_correct",
    "evaluate",
    "get_task",
    "load_task_records",
    "markdown_table",
    "meteor",
    "prepare_nltk_data",
    "read_predictions",
    "rouge",
    "text_scores",
]
