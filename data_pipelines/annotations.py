"""The authors' annotation JSON: loading, validation, and converters from the public datasets' CSVs.

A record is what Med-2E3's `MultiModalDataset` reads:

    {"id": ..., "conversations": [{"from": "human", "value": "<image3d>\\n..."}, {"from": "gpt", ...}, ...],
     "vision3d": [path], "question": str, "question_type": int}

`question` is the text BERT encodes for TG-IS (the first question without the placeholder);
`question_type` is M3D-VQA's type (1 plane, 2 phase, 3 organ, 4 abnormality, 5 location). Converted
VQA records also carry `answer` and, when closed, `answer_choice`, which is what the authors'
evaluation scripts score against.

Command line: `med2e3-annotations` (med2e3_jax/cli/annotations.py).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.errors import MissingFileError, RecordError
from data_pipelines.image_placeholder import IMAGE3D_TOKEN

IMAGE2D_TOKEN = "<image>"
ROLES = ("human", "gpt")

CAPTION_QUESTIONS = ("Can you provide a caption consists of findings for this medical image?",)
REPORT_QUESTIONS = (
    "Generate radiology report for the CT.",
    "Please give the radiology report for the specified chest CT image.",
    "Can you produce the radiology report for the attached chest CT image?",
)
VQA_COLUMNS = (
    "Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer",
    "Answer Choice",
)
CTRATE_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")


# ---------------------------------------------------------------------------------------------------
# Validation.


def _fail(record_id, message: str, source=None):
    where = f"{source}: " if source else ""
    raise RecordError(f"{where}record {record_id!r}: {message}", path=str(record_id))


def validate_record(record: Any, *, source: str | os.PathLike | None = None, index: int | None = None) -> None:
    """Raise RecordError, naming the record id (and `source` file), unless `record` is well formed.

    Well formed: a non-empty conversation of alternating human/gpt turns starting with a human one,
    every value a non-empty string, exactly one `<image3d>`, in the first human turn, no 2D `<image>`,
    exactly one volume path in `vision3d`, a string `question` and an integer `question_type` if given.
    A last human turn without an answer is allowed (a prompt to answer).
    """
    if not isinstance(record, Mapping):
        _fail(f"#{index}", f"is a {type(record).__name__}, not an object", source)
    record_id = record.get("id", f"#{index}")
    validate_conversation(record.get("conversations"), record_id=record_id, source=source)
    volumes = record.get("vision3d")
    if volumes is None:
        hint = " ('image3d' is MedM-VL's name for it)" if "image3d" in record else ""
        _fail(record_id, f"has no 'vision3d' volume{hint}", source)
    if isinstance(volumes, str):
        volumes = [volumes]
    if not isinstance(volumes, list) or len(volumes) != 1 or not isinstance(volumes[0], str) or not volumes[0]:
        _fail(record_id, f"'vision3d' must list exactly one volume path, found {volumes!r}", source)
    if "question" in record and not isinstance(record["question"], str):
        _fail(record_id, f"'question' must be a string, found {type(record['question']).__name__}", source)
    if "question_type" in record:
        try:
            _as_int(record["question_type"])
        except (TypeError, ValueError):
            _fail(record_id, f"'question_type' must be an integer, found {record['question_type']!r}", source)


def validate_conversation(turns: Any, *, record_id: Any = None, source: str | os.PathLike | None = None) -> None:
    """Raise RecordError, naming `record_id`, unless `turns` is a well formed conversation (see
    `validate_record`)."""
    if not isinstance(turns, list) or not turns:
        _fail(record_id, "has no conversation ('conversations' must be a non-empty list)", source)
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or turn.get("from") not in ROLES:
            found = turn.get("from") if isinstance(turn, Mapping) else turn
            _fail(record_id, f"turn {i} has role {found!r}; expected one of {ROLES}", source)
        expected = ROLES[i % 2]
        if turn["from"] != expected:
            _fail(record_id, f"turn {i} is from {turn['from']!r}; turns must alternate human/gpt from human", source)
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            _fail(record_id, f"turn {i} ({turn['from']}) has no text", source)
        if IMAGE2D_TOKEN in value:
            _fail(record_id, f"turn {i} holds the 2D placeholder {IMAGE2D_TOKEN}; Med-2E3 takes a volume only", source)
    placeholders = [turn["value"].count(IMAGE3D_TOKEN) for turn in turns]
    if sum(placeholders) == 0:
        _fail(record_id, f"has no {IMAGE3D_TOKEN} in its first human turn", source)
    if sum(placeholders) > 1:
        _fail(record_id, f"has {sum(placeholders)} {IMAGE3D_TOKEN} placeholders; expected one (one volume)", source)
    if placeholders[0] != 1:
        _fail(
            record_id,
            f"has its {IMAGE3D_TOKEN} in turn {placeholders.index(1)}; expected it in the first human turn",
            source,
        )

def _as_int(value) -> int:
    if isinstance(value, bool):
        raise TypeError("bool")
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def question_text(value: str) -> str:
    """The TG-IS question: the human turn without its `<image3d>` placeholder."""
    return value.replace(IMAGE3D_TOKEN, "").strip()


def _normalise(record: Mapping, image_root) -> dict:
    record = dict(record)
    volumes = record.get("vision3d")
    if isinstance(volumes, str):
        volumes = [volumes]
    if isinstance(volumes, list) and image_root:
        # os.path.join, as the authors: an absolute path in the record wins over the root.
        volumes = [os.path.join(os.fspath(image_root), v) if isinstance(v, str) else v for v in volumes]
    if volumes is not None:
        record["vision3d"] = volumes
    turns = record.get("conversations")
    first = turns[0] if isinstance(turns, list) and turns else None
    if "question" not in record and isinstance(first, Mapping) and isinstance(first.get("value"), str):
        record["question"] = question_text(first["value"])
    if "question_type" in record:
        try:
            record["question_type"] = _as_int(record["question_type"])
        except (TypeError, ValueError):
            pass  # left for validate_record to name
    return record


def load_records(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, validate: bool = True
) -> list[dict]:
    """The records of an annotation file (a JSON list, or JSON lines for `.jsonl`).

    Relative `vision3d` paths are joined to `image_root`; a missing `question` is derived from the
    first human turn; `question_type` becomes an int. With `validate` the first malformed record
    raises RecordError naming it; without, records come back unchecked — for a pipeline that validates
    each record itself (`validate_record`) and counts bad ones as skips.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"annotation file {path} does not exist", path=str(path)) from None
    try:
        if path.suffix == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"annotation file {path} is not valid JSON: {error}", path=str(path)) from None
    if not isinstance(data, list):
        raise RecordError(
            f"annotation file {path} holds a {type(data).__name__}; expected a list of records", path=str(path)
        )
    if validate:
        for index, record in enumerate(data):
            validate_record(record, source=path, index=index)
    return [_normalise(r, image_root) if isinstance(r, Mapping) else r for r in data]


# ---------------------------------------------------------------------------------------------------
# Converters.


def _read_csv(path, required: Sequence[str]) -> list[dict[str, str]]:
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(f"CSV file {path} does not exist", path=str(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise RecordError(f"{path}: missing columns {missing}; found {reader.fieldnames}", path=str(path))
        return list(reader)


def _cell(row: Mapping[str, str], column: str, path, index: int) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise RecordError(f"{path}: row {index} has an empty {column!r}", path=f"{path}:{index}")
    return value


def _record(record_id, question: str, reply: str, volume: str, **extra) -> dict:
    record = dict(
        id=record_id,
        conversations=[
            {"from": "human", "value": f"{IMAGE3D_TOKEN}\n{question}"},
            {"from": "gpt", "value": reply},
        ],
        vision3d=[volume],
        question=question,
        **extra,
    )
    validate_record(record)
    return record


def _pick(questions: Sequence[str], rng: np.random.Generator) -> str:
    return questions[int(rng.integers(len(questions)))] if len(questions) > 1 else questions[0]


def m3d_cap_to_records(
    path: str | os.PathLike,
    *,
    split: str = "train",
    text_root: str | os.PathLike | None = None,
    questions: Sequence[str] = CAPTION_QUESTIONS,
    seed: int = 0,
) -> list[dict]:
    """M3D-Cap to records: one caption question (drawn from `questions`, seeded) → the caption.

    `path` is M3D's `M3D_Cap.json` (`{split: [{"image", "text"}]}`, `text` naming a `.txt` file) or a
    CSV with columns `image` (or `Image Path`) and `text` (or `Text`): the caption itself, or a `.txt`
    file. Text files are read relative to `text_root` (default: the annotation file's folder).
    """
    path = pathlib.Path(path)
    root = pathlib.Path(text_root) if text_root is not None else path.parent
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if split not in data:
            raise RecordError(f"{path}: no split {split!r}; found {sorted(data)}", path=str(path))
        rows = [{"image": r.get("image", ""), "text": r.get("text", "")} for r in data[split]]
    else:
        raw = _read_csv(path, ())
        columns = list(raw[0]) if raw else []
        image_column = next((c for c in ("image", "Image Path") if c in columns), None)
        text_column = next((c for c in ("text", "Text") if c in columns), None)
        if raw and (image_column is None or text_column is None):
            raise RecordError(
                f"{path}: needs columns image (or Image Path) and text (or Text); found {columns}", path=str(path)
            )
        rows = [{"image": r[image_column], "text": r[text_column]} for r in raw]
    rng = np.random.default_rng(seed)
    records = []
    for index, row in enumerate(rows):
        image, text = _cell(row, "image", path, index), _cell(row, "text", path, index)
        if text.endswith(".txt"):
            text_file = root / text
            if not text_file.exists():
                raise MissingFileError(
                    f"{path}: row {index}: caption file {text_file} does not exist", path=str(text_file)
                )
            text = text_file.read_text(encoding="utf-8").strip()
        records.append(_record(f"m3d_cap_{index}", _pick(questions, rng), text, image))
    return records


def m3d_vqa_to_records(path: str | os.PathLike, *, closed: bool = True) -> list[dict]:
    """M3D-VQA CSV to records, as M3D's `VQADataset` builds the texts.

    Closed: `"{Question} Choices: A. {A} B. {B} C. {C} D. {D}"` → `"{Answer Choice}. {Answer}"`.
    Open: `"{Question}"` → `"{Answer}"`.
    """
    rows = _read_csv(path, VQA_COLUMNS)
    kind = "closed" if closed else "open"
    records = []
    for index, row in enumerate(rows):
        question, answer = _cell(row, "Question", path, index), _cell(row, "Answer", path, index)
        try:
            question_type = _as_int(_cell(row, "Question Type", path, index))
        except (TypeError, ValueError):
            raise RecordError(
                f"{path}: row {index}: 'Question Type' {row['Question Type']!r} is not an integer",
                path=f"{path}:{index}",
            ) from None
        extra = {"question_type": question_type, "answer": answer}
        if closed:
            choices = [_cell(row, f"Choice {c}", path, index) for c in "ABCD"]
            letter = _cell(row, "Answer Choice", path, index)
            if letter not in "ABCD" or len(letter) != 1:
                raise RecordError(
                    f"{path}: row {index}: 'Answer Choice' {letter!r} is not one of A-D", path=f"{path}:{index}"
                )
            question = f"{question} Choices: A. {choices[0]} B. {choices[1]} C. {choices[2]} D. {choices[3]}"
            extra["answer_choice"] = letter
            answer = f"{letter}. {answer}"
        image = _cell(row, "Image Path", path, index)
        records.append(_record(f"m3d_vqa_{kind}_{index}", question, answer, image, **extra))
    return records


def ctrate_volume_path(volume_name: str, *, split_dir: bool = True, suffix: str | None = None) -> str:
    """CT-RATE's folder layout: `train_1_a_1.nii.gz` → `train/train_1/train_1_a/train_1_a_1.nii.gz`.

    `split_dir=False` drops the leading split folder (the layout of preprocessed copies);
    `suffix` replaces `.nii.gz` (e.g. `.npy`).
    """
    name = volume_name.strip()
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else None
    parts = stem.split("_") if stem else []
    if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
        raise RecordError(
            f"VolumeName {volume_name!r} is not CT-RATE's '<split>_<patient>_<scan>_<reconstruction>.nii.gz'",
            path=volume_name,
        )
    split, patient, scan, _ = parts
    folders = [f"{split}_{patient}", f"{split}_{patient}_{scan}"]
    if split_dir:
        folders.insert(0, split)
    return "/".join(folders + [stem + (".nii.gz" if suffix is None else suffix)])


def ctrate_reports_to_records(
    path: str | os.PathLike,
    *,
    split_dir: bool = True,
    suffix: str | None = None,
    questions: Sequence[str] = REPORT_QUESTIONS,
    seed: int = 0,
) -> list[dict]:
    """CT-RATE reports CSV to report-generation records: a report question (seeded draw) →
    `"Findings: {Findings_EN} Impression: {Impressions_EN}"`, as the authors' group writes them; the
    record id is the volume's name. Volume paths follow `ctrate_volume_path`."""
    rows = _read_csv(path, CTRATE_COLUMNS)
    rng = np.random.default_rng(seed)
    records = []
    for index, row in enumerate(rows):
        name = _cell(row, "VolumeName", path, index)
        findings = (row.get("Findings_EN") or "").strip()
        impressions = (row.get("Impressions_EN") or "").strip()
        if not findings and not impressions:
            raise RecordError(f"{path}: row {index} ({name}) has neither findings nor impressions", path=name)
        sections = [f"Findings: {findings}"] if findings else []
        sections += [f"Impression: {impressions}"] if impressions else []
        volume = ctrate_volume_path(name, split_dir=split_dir, suffix=suffix)
        records.append(_record(name[: -len(".nii.gz")], _pick(questions, rng), " ".join(sections), volume))
    return records


def write_records(records: Iterable[Mapping], path: str | os.PathLike) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), ensure_ascii=False, indent=1), encoding="utf-8")
