"""Annotation records: loading, each malformation named by its record, and the dataset converters."""

import copy
import csv
import json

import pytest

from data_pipelines.annotations import (
    ctrate_reports_to_records,
    ctrate_volume_path,
    load_records,
    m3d_cap_to_records,
    m3d_vqa_to_records,
    validate_record,
)
from commands_for_tests import run_command
from data_pipelines.errors import MissingFileError, RecordError


def turn(role, value):
    return {"from": role, "value": value}


GOOD = {
    "id": "case_7",
    "conversations": [
        turn("human", "<image3d>\nWhich organ shows a lesion?"),
        turn("gpt", "The liver."),
        turn("human", "Where is it?"),
        turn("gpt", "In the left lobe."),
    ],
    "vision3d": ["ct/case_7.npy"],
    "question_type": "3",
}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_load_records_joins_image_root_derives_question_and_types_question_type(tmp_path):
    absolute = dict(GOOD, id="abs", vision3d=["/data/abs.npy"])
    path = write_json(tmp_path / "ann.json", [GOOD, absolute])
    records = load_records(path, image_root="/volumes")
    assert records[0]["vision3d"] == ["/volumes/ct/case_7.npy"]
    assert records[1]["vision3d"] == ["/data/abs.npy"]  # os.path.join, as the authors
    assert records[0]["question"] == "Which organ shows a lesion?"
    assert records[0]["question_type"] == 3
    assert records[0]["conversations"] == GOOD["conversations"]


def test_load_records_keeps_a_given_question_and_reads_json_lines(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(json.dumps(dict(GOOD, id=f"r{i}", question="liver?")) for i in range(3)) + "\n")
    records = load_records(path)
    assert [r["id"] for r in records] == ["r0", "r1", "r2"]
    assert all(r["question"] == "liver?" for r in records)


def test_unanswered_last_question_is_a_valid_prompt_record():
    validate_record(dict(GOOD, conversations=GOOD["conversations"][:3]))


def _bad(change):
    record = copy.deepcopy(GOOD)
    record["id"] = "bad_case"
    change(record)
    return record


BAD_RECORDS = {
    "no conversations": (lambda r: r.pop("conversations"), "no conversation"),
    "empty conversations": (lambda r: r.update(conversations=[]), "no conversation"),
    "two human turns in a row": (
        lambda r: r["conversations"].__setitem__(1, turn("human", "Again?")), "alternate"
    ),
    "starts with gpt": (
        lambda r: r.update(conversations=[turn("gpt", "<image3d>\nHello"), turn("human", "Hi")]), "alternate"
    ),
    "unknown role": (lambda r: r["conversations"].__setitem__(1, turn("assistant", "x")), "role 'assistant'"),
    "empty answer": (lambda r: r["conversations"].__setitem__(1, turn("gpt", "  ")), "no text"),
    "no placeholder": (
        lambda r: r["conversations"].__setitem__(0, turn("human", "Which organ?")), "no <image3d>"
    ),
    "placeholder in a later turn": (
        lambda r: (
            r["conversations"].__setitem__(0, turn("human", "Which organ?")),
            r["conversations"].__setitem__(2, turn("human", "<image3d> Where?")),
        ),
        "turn 2",
    ),
    "two placeholders": (
        lambda r: r["conversations"].__setitem__(0, turn("human", "<image3d><image3d> Which?")), "2 <image3d>"
    ),
    "2D placeholder": (
        lambda r: r["conversations"].__setitem__(2, turn("human", "<image> Where?")), "2D placeholder"
    ),
    "no vision3d": (lambda r: r.pop("vision3d"), "no 'vision3d'"),
    "MedM-VL image3d key": (lambda r: r.update(image3d=r.pop("vision3d")), "MedM-VL"),
    "two volumes": (lambda r: r.update(vision3d=["a.npy", "b.npy"]), "exactly one volume"),
    "question not text": (lambda r: r.update(question=["Which?"]), "'question'"),
    "question_type not an integer": (lambda r: r.update(question_type="organ"), "'question_type'"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_each_malformed_record_is_named_by_id_and_file(tmp_path, name):
    change, message = BAD_RECORDS[name]
    path = write_json(tmp_path / "ann.json", [GOOD, _bad(change)])
    with pytest.raises(RecordError, match=message) as error:
        load_records(path)
    assert "bad_case" in str(error.value) and "ann.json" in str(error.value)
    assert error.value.path == "bad_case"


def test_record_without_id_is_named_by_its_position(tmp_path):
    record = _bad(lambda r: r.update(conversations=[]))
    record.pop("id")
    path = write_json(tmp_path / "ann.json", [GOOD, record])
    with pytest.raises(RecordError, match="#1"):
        load_records(path)


def test_validate_false_returns_bad_records_for_the_pipeline_to_skip(tmp_path):
    bad = _bad(lambda r: r.pop("vision3d"))
    path = write_json(tmp_path / "ann.json", [GOOD, bad])
    records = load_records(path, validate=False)
    assert [r["id"] for r in records] == ["case_7", "bad_case"]
    with pytest.raises(RecordError, match="bad_case"):
        validate_record(records[1])


@pytest.mark.parametrize(
    "content, message", [("{not json", "not valid JSON"), ('{"id": 1}', "expected a list")]
)
def test_unreadable_annotation_file_is_named(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(RecordError, match=message) as error:
        load_records(path)
    assert "broken.json" in str(error.value)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere.json"):
        load_records(tmp_path / "nowhere.json")


# --- converters --------------------------------------------------------------------------------------

VQA_HEADER = [
    "Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
    "Answer", "Answer Choice",
]
VQA_ROWS = [
    ["ct/001/Axial.npy", "A report.", "1", "In which plane is this image?", "Sagittal", "Axial", "Coronal",
     "Oblique", "Axial", "B"],
    ["ct/002/Axial.npy", "Another, longer report.", "3", 'Which organ shows the "mass", if any?', "Liver",
     "Kidney", "Spleen", "Pancreas", "Kidney", "B"],
]


def test_m3d_vqa_closed_lists_the_choices_and_answers_letter_dot_text(tmp_path):
    records = m3d_vqa_to_records(write_csv(tmp_path / "vqa.csv", VQA_HEADER, VQA_ROWS), closed=True)
    assert records[1] == {
        "id": "m3d_vqa_closed_1",
        "conversations": [
            turn("human", '<image3d>\nWhich organ shows the "mass", if any? '
                 "Choices: A. Liver B. Kidney C. Spleen D. Pancreas"),
            turn("gpt", "B. Kidney"),
        ],
        "vision3d": ["ct/002/Axial.npy"],
        "question": 'Which organ shows the "mass", if any? Choices: A. Liver B. Kidney C. Spleen D. Pancreas',
        "question_type": 3,
        "answer": "Kidney",
        "answer_choice": "B",
    }


def test_m3d_vqa_open_asks_the_question_and_answers_the_text(tmp_path):
    records = m3d_vqa_to_records(write_csv(tmp_path / "vqa.csv", VQA_HEADER, VQA_ROWS), closed=False)
    assert records[0] == {
        "id": "m3d_vqa_open_0",
        "conversations": [turn("human", "<image3d>\nIn which plane is this image?"), turn("gpt", "Axial")],
        "vision3d": ["ct/001/Axial.npy"],
        "question": "In which plane is this image?",
        "question_type": 1,
        "answer": "Axial",
    }


def test_m3d_vqa_missing_column_and_empty_cell_are_named(tmp_path):
    header = [c for c in VQA_HEADER if c != "Answer Choice"]
    short = write_csv(tmp_path / "short.csv", header, [row[:-1] for row in VQA_ROWS])
    with pytest.raises(RecordError, match="Answer Choice"):
        m3d_vqa_to_records(short)
    rows = copy.deepcopy(VQA_ROWS)
    rows[1][3] = ""
    with pytest.raises(RecordError, match="row 1 has an empty 'Question'"):
        m3d_vqa_to_records(write_csv(tmp_path / "empty.csv", VQA_HEADER, rows))
    rows = copy.deepcopy(VQA_ROWS)
    rows[0][9] = "E"
    with pytest.raises(RecordError, match="row 0"):
        m3d_vqa_to_records(write_csv(tmp_path / "letter.csv", VQA_HEADER, rows))


def test_m3d_cap_from_csv_reads_inline_captions_and_caption_files(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "b.txt").write_text("Caption from a file.\n")
    path = write_csv(
        tmp_path / "cap.csv",
        ["image", "text"],
        [["a/Axial.npy", "An inline caption."], ["b/Axial.npy", "captions/b.txt"]],
    )
    records = m3d_cap_to_records(path, questions=("Describe this scan.",))
    assert records[0] == {
        "id": "m3d_cap_0",
        "conversations": [turn("human", "<image3d>\nDescribe this scan."), turn("gpt", "An inline caption.")],
        "vision3d": ["a/Axial.npy"],
        "question": "Describe this scan.",
    }
    assert records[1]["conversations"][1]["value"] == "Caption from a file."


def test_m3d_cap_from_the_split_json_draws_questions_reproducibly(tmp_path):
    (tmp_path / "t.txt").write_text("Liver lesion.")
    data = {"train": [{"image": f"v{i}.npy", "text": "t.txt"} for i in range(6)], "test": []}
    path = write_json(tmp_path / "M3D_Cap.json", data)
    questions = ("Q one?", "Q two?", "Q three?")
    first = m3d_cap_to_records(path, split="train", questions=questions, seed=3)
    again = m3d_cap_to_records(path, split="train", questions=questions, seed=3)
    assert first == again
    assert {r["question"] for r in first} <= set(questions)
    assert all(r["conversations"][1]["value"] == "Liver lesion." for r in first)
    with pytest.raises(RecordError, match="no split 'validation'"):
        m3d_cap_to_records(path, split="validation")


CTRATE_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]


def test_ctrate_reports_become_findings_and_impression_with_the_dataset_layout(tmp_path):
    path = write_csv(
        tmp_path / "reports.csv",
        CTRATE_HEADER,
        [
            ["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Trachea is open.", "No acute finding."],
            ["valid_12_b_2.nii.gz", "", "", "", "Emphysema."],
        ],
    )
    records = ctrate_reports_to_records(path, questions=("Generate the report.",))
    assert records[0] == {
        "id": "train_1_a_1",
        "conversations": [
            turn("human", "<image3d>\nGenerate the report."),
            turn("gpt", "Findings: Trachea is open. Impression: No acute finding."),
        ],
        "vision3d": ["train/train_1/train_1_a/train_1_a_1.nii.gz"],
        "question": "Generate the report.",
    }
    assert records[1]["vision3d"] == ["valid/valid_12/valid_12_b/valid_12_b_2.nii.gz"]
    assert records[1]["conversations"][1]["value"] == "Impression: Emphysema."


def test_ctrate_volume_path_for_preprocessed_copies_and_bad_names():
    preprocessed = ctrate_volume_path("train_3_a_2.nii.gz", split_dir=False, suffix=".npy")
    assert preprocessed == "train_3/train_3_a/train_3_a_2.npy"
    for bad in ("train_1_a.nii.gz", "scan.nii.gz", "train_1_a_1.npy"):
        with pytest.raises(RecordError, match="VolumeName"):
            ctrate_volume_path(bad)


def test_ctrate_report_without_text_is_named(tmp_path):
    path = write_csv(tmp_path / "r.csv", CTRATE_HEADER, [["train_2_a_1.nii.gz", "x", "y", "", " "]])
    with pytest.raises(RecordError, match="train_2_a_1.nii.gz"):
        ctrate_reports_to_records(path)


def test_command_converts_and_the_output_loads_back(tmp_path):
    csv_path = write_csv(tmp_path / "vqa.csv", VQA_HEADER, VQA_ROWS)
    out = tmp_path / "out" / "vqa_open.json"
    result = run_command("annotations", "m3d-vqa", "--open", "--csv", csv_path, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_records(out) == m3d_vqa_to_records(csv_path, closed=False)
    result = run_command("annotations", "validate", out, cwd=tmp_path)
    assert result.returncode == 0 and f"{out}: 2 records, all valid" in result.stdout, result.stderr


def test_command_converts_ctrate_and_names_a_missing_flag(tmp_path):
    csv_path = write_csv(tmp_path / "r.csv", CTRATE_HEADER, [["train_1_a_1.nii.gz", "", "", "Clear lungs.", ""]])
    out = tmp_path / "rg.json"
    result = run_command("annotations", "ct-rate", "--csv", csv_path, cwd=tmp_path)
    assert result.returncode != 0 and "ct-rate needs --out" in result.stderr
    result = run_command("annotations", "ct-rate", "--csv", csv_path, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_records(out)[0]["vision3d"] == ["train/train_1/train_1_a/train_1_a_1.nii.gz"]
