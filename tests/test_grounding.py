"""The TG-IS grounding score: mass on the ground-truth slices against their uniform share."""

import numpy as np
import pytest

from med2e3_jax.evaluation.grounding import grounding_summary, grounding_table, score_shift, slice_mass


def test_slice_mass_sums_the_range_inclusively():
    scores = [0.1, 0.2, 0.3, 0.4]
    mass, uniform = slice_mass(scores, [1, 2])
    assert mass == pytest.approx(0.5)
    assert uniform == 0.5


def test_uniform_scores_have_mass_equal_to_their_share():
    mass, uniform = slice_mass(np.full(32, 1 / 32), [4, 11])
    assert mass == pytest.approx(uniform) and uniform == 8 / 32


@pytest.mark.parametrize("bad", [[3, 2], [-1, 2], [0, 4], [1]])
def test_slice_mass_rejects_ranges_outside_the_scores(bad):
    with pytest.raises(ValueError, match="slice range"):
        slice_mass([0.25] * 4, bad)


def test_summary_per_type_and_overall_with_skips():
    records = [
        {"id": "a", "question_type": 5, "answer_slices": [0, 0]},
        {"id": "b", "question_type": 5, "answer_slices": [3, 3]},
        {"id": "c", "question_type": 4, "answer_slices": [2, 3]},
        {"id": "d", "question_type": 4, "answer_slices": None},
    ]
    predictions = [
        {"id": "a", "slice_scores": [0.7, 0.1, 0.1, 0.1]},  # mass 0.7 on a share of 0.25
        {"id": "b", "slice_scores": [0.4, 0.4, 0.1, 0.1]},  # mass 0.1
        {"id": "c", "slice_scores": [0.25, 0.25, 0.25, 0.25]},  # mass 0.5 = its share
        {"id": "d", "slice_scores": [0.25, 0.25, 0.25, 0.25]},  # nothing to look at
    ]
    summary = grounding_summary(predictions, records)
    assert summary["skipped"] == 1
    location = summary["per_type"]["location"]
    assert location["count"] == 2
    assert location["mass"] == pytest.approx(0.4) and location["uniform"] == pytest.approx(0.25)
    assert location["lift"] == pytest.approx(1.6) and location["above_uniform"] == 0.5
    overall = summary["overall"]
    assert overall["mass"] == pytest.approx((0.7 + 0.1 + 0.5) / 3)
    assert overall["uniform"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert overall["above_uniform"] == pytest.approx(1 / 3)
    table = grounding_table(summary)
    assert "| location | 2 | 0.400 | 0.250 | 1.60× | 50 % |" in table


def test_summary_names_a_prediction_without_its_record():
    with pytest.raises(KeyError, match="'z'"):
        grounding_summary([{"id": "z", "slice_scores": [1.0]}], [{"id": "a", "answer_slices": [0, 0]}])


def test_same_scan_control_compares_with_the_other_questions_about_the_volume():
    records = [
        {"id": "a", "question_type": 5, "answer_slices": [0, 0], "vision3d": ["v1.npy"]},
        {"id": "b", "question_type": 5, "answer_slices": [3, 3], "vision3d": ["v1.npy"]},
        {"id": "c", "question_type": 4, "answer_slices": [1, 1], "vision3d": ["v1.npy"]},
        {"id": "d", "question_type": 4, "answer_slices": [2, 2], "vision3d": ["v2.npy"]},  # alone on its scan
    ]
    predictions = [
        {"id": "a", "slice_scores": [0.7, 0.1, 0.1, 0.1]},
        {"id": "b", "slice_scores": [0.1, 0.1, 0.2, 0.6]},
        {"id": "c", "slice_scores": [0.1, 0.5, 0.3, 0.1]},
        {"id": "d", "slice_scores": [0.1, 0.1, 0.7, 0.1]},
    ]
    summary = grounding_summary(predictions, records)
    location = summary["per_type"]["location"]
    # a: own 0.7 on slice 0, b and c put 0.1 and 0.1 there; b: own 0.6 on slice 3, a and c put 0.1, 0.1.
    assert location["controlled"] == 2
    assert location["other"] == pytest.approx(0.1) and location["text_lift"] == pytest.approx(0.65 / 0.1)
    abnormality = summary["per_type"]["abnormality"]  # c: own 0.5 on slice 1; a and b put 0.1, 0.1. d: no control
    assert abnormality["count"] == 2 and abnormality["controlled"] == 1
    assert abnormality["other"] == pytest.approx(0.1) and abnormality["text_lift"] == pytest.approx(5.0)
    assert abnormality["controlled_mass"] == pytest.approx(0.5) and abnormality["mass"] == pytest.approx((0.5 + 0.7) / 2)
    table = grounding_table(summary)
    # Total variation: a-b 0.6, a-c 0.6, b-c 0.5; a's mean 0.6, b's and c's 0.55.
    assert location["shift"] == pytest.approx((0.6 + 0.55) / 2) and abnormality["shift"] == pytest.approx(0.55)
    assert "| location | 2 | 0.650 | 0.250 | 2.60× | 100 % | 2: 0.650 / 0.100 | 6.50× | 0.575 |" in table
    assert "| abnormality | 2 | 0.600 | 0.250 | 2.40× | 100 % | 1: 0.500 / 0.100 | 5.00× | 0.550 |" in table


def test_scores_that_ignore_the_question_have_a_text_lift_of_one():
    records = [{"id": k, "question_type": 5, "answer_slices": [i, i], "vision3d": ["v.npy"]} for i, k in enumerate("abc")]
    scores = [0.6, 0.2, 0.1, 0.1]
    summary = grounding_summary([{"id": k, "slice_scores": scores} for k in "abc"], records)
    assert summary["overall"]["lift"] == pytest.approx(0.3 / 0.25)
    assert summary["overall"]["text_lift"] == pytest.approx(1.0)
    assert summary["overall"]["shift"] == 0.0


def test_a_question_can_move_the_scores_without_moving_them_to_its_finding():
    """Two questions on one scan, each looking at the other's finding: the scores move (shift 0.8) yet
    the text lift is below 1."""
    records = [
        {"id": "a", "question_type": 5, "answer_slices": [0, 0], "vision3d": ["v.npy"]},
        {"id": "b", "question_type": 5, "answer_slices": [3, 3], "vision3d": ["v.npy"]},
    ]
    predictions = [
        {"id": "a", "slice_scores": [0.1, 0.0, 0.0, 0.9]},
        {"id": "b", "slice_scores": [0.9, 0.0, 0.0, 0.1]},
    ]
    overall = grounding_summary(predictions, records)["overall"]
    assert overall["shift"] == pytest.approx(0.8)
    assert overall["text_lift"] == pytest.approx(0.1 / 0.9)


def test_score_shift_needs_scores_over_the_same_slices():
    with pytest.raises(ValueError, match="4 and 3 slices"):
        score_shift([0.25] * 4, [1 / 3] * 3)
