"""The evaluation runner: predictions kept and resumed, metrics aggregated per question type and overall."""

import json

import pytest

from data_pipelines.errors import RecordError
from med2e3_jax.evaluation import evaluate, load_task_records
from med2e3_jax.evaluation.runner import PREDICTIONS_LOG, read_predictions


def _closed(record_id, question_type, letter, volume="vol.npy"):
    return {
        "id": record_id,
        "conversations": [
            {"from": "human", "value": "<image3d>\nWhich plane? Choices: A. Axial B. Coronal C. Sagittal D. Oblique"},
            {"from": "gpt", "value": f"{letter}. Whatever"},
        ],
        "vision3d": [volume],
        "question_type": question_type,
        "answer_choice": letter,
        "answer": "Whatever",
    }


# Type 1 (plane): 1 of 2 correct; type 2 (phase): 2 of 3 correct.
RECORDS = [_closed("q0", 1, "A"), _closed("q1", 1, "B"), _closed("q2", 2, "C"), _closed("q3", 2, "D"),
           _closed("q4", 2, "A")]
OUTPUTS = {"q0": "A. Axial", "q1": "C. Sagittal", "q2": "The answer is C. Sagittal", "q3": "D", "q4": "A."}


class FakePredictor:
    def __init__(self, outputs, fail_after_calls=None):
        self.outputs, self.fail_after_calls = outputs, fail_after_calls
        self.calls, self.seen = 0, []

    def __call__(self, batch):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.seen += [r["id"] for r in batch]
        return [{"prediction": self.outputs[r["id"]], "slice_scores": [0.5, 0.25, 0.25]} for r in batch]


@pytest.fixture
def annotation_file(tmp_path):
    path = tmp_path / "vqa_closed.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_evaluate_writes_predictions_metrics_json_and_markdown(tmp_path, annotation_file):
    records = load_task_records(annotation_file)
    out = tmp_path / "out"
    summary = evaluate("m3d_vqa_closed", records, FakePredictor(OUTPUTS), out, batch_size=2, progress=False)

    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["id"] for p in predictions] == ["q0", "q1", "q2", "q3", "q4"]
    assert predictions[2] == {
        "id": "q2",
        "question": "Which plane? Choices: A. Axial B. Coronal C. Sagittal D. Oblique",
        "reference": "Whatever",
        "question_type": 2,
        "answer_choice": "C",
        "prediction": "The answer is C. Sagittal",
        "slice_scores": [0.5, 0.25, 0.25],
        "scores": {"accuracy": True},
    }
    assert json.loads((out / "metrics.json").read_text()) == summary
    assert summary["per_type"] == {"1": {"count": 2, "accuracy": 0.5}, "2": {"count": 3, "accuracy": 2 / 3}}
    assert summary["mean_of_types"]["accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert summary["overall"] == {"count": 5, "accuracy": 0.6}
    table = (out / "metrics.md").read_text()
    assert "| plane | 2 | 50.00 |" in table
    assert "| phase | 3 | 66.67 |" in table
    assert "| mean of types |  | 58.33 |" in table
    assert "| **overall** | 5 | 60.00 |" in table


def test_rerun_generates_only_the_samples_not_yet_predicted(tmp_path, annotation_file):
    records = load_task_records(annotation_file)
    out = tmp_path / "out"
    interrupted = FakePredictor(OUTPUTS, fail_after_calls=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate("m3d_vqa_closed", records, interrupted, out, batch_size=2, progress=False)
    assert sorted(read_predictions(out / PREDICTIONS_LOG)) == ["q0", "q1"]
    assert not (out / "metrics.json").exists()

    resumed = FakePredictor(OUTPUTS)
    summary = evaluate("m3d_vqa_closed", records, resumed, out, batch_size=2, progress=False)
    assert resumed.seen == ["q2", "q3", "q4"] and resumed.calls == 2
    assert summary["overall"]["accuracy"] == 0.6

    finished = FakePredictor(OUTPUTS)
    evaluate("m3d_vqa_closed", records, finished, out, batch_size=2, progress=False)
    assert finished.calls == 0


def test_a_line_cut_short_by_an_interruption_is_predicted_again(tmp_path, annotation_file):
    records = load_task_records(annotation_file)
    out = tmp_path / "out"
    evaluate("m3d_vqa_closed", records[:2], FakePredictor(OUTPUTS), out, progress=False)
    with open(out / PREDICTIONS_LOG, "a") as log:
        log.write('{"id": "q2", "predic')
    predictor = FakePredictor(OUTPUTS)
    summary = evaluate("m3d_vqa_closed", records, predictor, out, batch_size=8, progress=False)
    assert predictor.seen == ["q2", "q3", "q4"]
    assert summary["overall"]["accuracy"] == 0.6
    assert len((out / PREDICTIONS_LOG).read_text().splitlines()) == 5


def test_open_task_scores_text_and_says_when_bertscore_is_skipped(tmp_path):
    records = [
        {"id": "o0", "conversations": [{"from": "human", "value": "<image3d>\nWhich organ?"}], "vision3d": ["v.npy"],
         "question_type": 3, "answer": "the liver"},
        {"id": "o1", "conversations": [{"from": "human", "value": "<image3d>\nWhich organ?"}], "vision3d": ["v.npy"],
         "question_type": 3, "answer": "the left kidney"},
    ]
    outputs = {"o0": "the liver", "o1": "   "}
    summary = evaluate("m3d_vqa_open", records, FakePredictor(outputs), tmp_path, metrics=("bleu1", "bert_f1"),
                       progress=False)
    assert summary["metrics"] == ["bleu1"]
    assert "bertscore_model" in summary["skipped"]["bert_f1"]
    assert summary["overall"] == {"count": 2, "bleu1": 0.5}  # 1.0 and an empty answer's 0
    assert "BERTScore-F1 not computed" in (tmp_path / "metrics.md").read_text()


def test_answers_file_is_joined_by_id(tmp_path):
    # The authors' evaluation JSON: the question only; the answers in a second file.
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "<image3d>\nCaption?"}],
                "vision3d": ["v.npy"]} for i in range(2)]
    (tmp_path / "cap.json").write_text(json.dumps(records))
    (tmp_path / "answers.json").write_text(json.dumps([{"id": "c1", "answer": "two"}, {"id": "c0", "answer": "one"}]))
    loaded = load_task_records(tmp_path / "cap.json", answers_file=tmp_path / "answers.json")
    assert [r["answer"] for r in loaded] == ["one", "two"]
    (tmp_path / "answers.json").write_text(json.dumps([{"id": "c0", "answer": "one"}]))
    with pytest.raises(RecordError, match="'c1'"):
        load_task_records(tmp_path / "cap.json", answers_file=tmp_path / "answers.json")


def test_records_are_checked_before_any_generation(tmp_path):
    no_reference = {"id": "x", "conversations": [{"from": "human", "value": "<image3d>\nCaption?"}],
                    "vision3d": ["v.npy"]}
    predictor = FakePredictor({})
    with pytest.raises(RecordError, match="no reference"):
        evaluate("m3d_cap", [no_reference], predictor, tmp_path, progress=False)
    with pytest.raises(RecordError, match="twice"):
        evaluate("m3d_vqa_closed", [_closed("q0", 1, "A"), _closed("q0", 1, "B")], predictor, tmp_path,
                 progress=False)
    assert predictor.calls == 0
