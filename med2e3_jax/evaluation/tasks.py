"""The benchmarks of the paper, and what each record of their annotation JSON contributes to a score.

A task names its metrics and how a sample is judged. Its records are the authors' annotation records
(`data_pipelines.annotations`): the prompt is the conversation up to its last human turn (a trailing
`gpt` turn is the reference and is not shown to the model); the reference is the record's `answer` when
it has one (what the authors' answer files hold), else the last `gpt` turn. The authors' evaluation
JSON keeps the answers in a separate file (`{"id", "answer", "answer_choice", "question_type"}` per
record); `load_task_records` joins such a file by id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from data_pipelines.annotations import load_records
from data_pipelines.errors import MissingFileError, RecordError
from med2e3_jax.evaluation.metrics import ACCURACY

# M3D-VQA's question types; 0 and 6 are the phantom set's report and size questions
# (data_pipelines/synthetic.py).
QUESTION_TYPE_NAMES = {0: "report", 1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location", 6: "size"}

_CAPTION = ("bleu1", "rouge1", "meteor", "bert_f1")
_REPORT = ("bleu1", "rouge1", "rougeL", "meteor", "bert_f1")


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark.

    Attributes:
      name: the key in TASKS and the folder name of its outputs.
      title: as the paper's tables say it.
      metrics: the per-sample metrics averaged, in table order ("accuracy" and TEXT_METRICS names).
      judge: how "accuracy" is decided: "closed_vqa" (the answer letter and a period in the output) or
        "choice" (CT-RATE: the reference's "(x)" in the output); None when the task has no accuracy.
    """

    name: str
    title: str
    metrics: tuple[str, ...]
    judge: Literal["closed_vqa", "choice"] | None = None


TASKS = {
    task.name: task
    for task in (
        Task("m3d_cap", "M3D-Cap", _CAPTION),
        Task("m3d_vqa_closed", "M3D-VQA closed", (ACCURACY,), judge="closed_vqa"),
        Task("m3d_vqa_open", "M3D-VQA open", _CAPTION),
        Task("ctrate_report", "CT-RATE report generation", _REPORT),
        Task("ctrate_long", "CT-RATE long answer", _REPORT),
        Task("ctrate_short", "CT-RATE short answer", _REPORT),
        # The authors' choice script runs the text metrics over the same outputs too.
        Task("ctrate_choice", "CT-RATE multiple choice", (ACCURACY, *_REPORT), judge="choice"),
    )
}


def get_task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]


def type_name(question_type) -> str:
    """"plane" for M3D-VQA's type 1 (also given as "1", a JSON key); the type itself when it has no name."""
    if isinstance(question_type, str) and question_type.lstrip("-").isdigit():
        question_type = int(question_type)
    return QUESTION_TYPE_NAMES.get(question_type, str(question_type))


# ---------------------------------------------------------------------------------------------------
# What a record contributes.


def record_id(record: Mapping, index: int) -> str:
    return str(record["id"]) if record.get("id") is not None else f"#{index}"


def reference(record: Mapping) -> str:
    """The text the prediction is scored against: `answer`, else the final `gpt` turn."""
    if isinstance(record.get("answer"), str):
        return record["answer"]
    turns = record.get("conversations") or []
    if turns and turns[-1].get("from") == "gpt" and isinstance(turns[-1].get("value"), str):
        return turns[-1]["value"]
    raise RecordError(
        f"record {record.get('id')!r} has no reference: neither an 'answer' nor a final gpt turn "
        "(pass the authors' answers file to load_task_records)",
        path=str(record.get("id")),
    )


_LETTER = re.compile(r"^\s*([A-Z])\.")


def answer_choice(record: Mapping) -> str:
    """M3D-VQA closed: the correct letter, `answer_choice`, else the letter that opens the final `gpt`
    turn ("B. Liver")."""
    if isinstance(record.get("answer_choice"), str) and record["answer_choice"]:
        return record["answer_choice"]
    turns = record.get("conversations") or []
    if turns and turns[-1].get("from") == "gpt":
        found = _LETTER.match(turns[-1].get("value") or "")
        if found:
            return found.group(1)
    raise RecordError(
        f"record {record.get('id')!r} has no 'answer_choice' and no final gpt turn opening with 'X.'",
        path=str(record.get("id")),
    )


# ---------------------------------------------------------------------------------------------------
# Loading.


def load_task_records(
    annotation_file: str | os.PathLike,
    *,
    answers_file: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[dict]:
    """The records of an annotation file, with the answers of `answers_file` merged in by id.

    `answers_file` is a JSON list of `{"id", "answer", ...}`; each entry's fields (except `id`) overwrite
    those of the record with the same id, and a record without an entry raises RecordError.
    `limit` keeps the first records only.
    """
    records = load_records(annotation_file, image_root)
    if limit is not None:
        records = records[:limit]
    if answers_file is None:
        return records
    path = pathlib.Path(answers_file)
    if not path.is_file():
        raise MissingFileError(f"answers file {path} does not exist", path=str(path))
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "id" in e for e in entries):
        raise RecordError(f"answers file {path}: expected a JSON list of objects with an 'id'", path=str(path))
    answers = {str(e["id"]): e for e in entries}
    merged = []
    for index, record in enumerate(records):
        key = record_id(record, index)
        if key not in answers:
            raise RecordError(f"answers file {path} has no entry for record {key!r}", path=key)
        merged.append({**record, **{k: v for k, v in answers[key].items() if k != "id"}})
    return merged


def check_unique_ids(ids: Sequence[str], source: str = "records") -> None:
    seen = set()
    for key in ids:
        if key in seen:
            raise RecordError(f"{source}: id {key!r} appears twice; predictions are kept by id", path=key)
        seen.add(key)
