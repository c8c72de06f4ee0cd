"""The slice-attention figures: what they show and that they render to PNG."""

import numpy as np
import pytest

from med2e3_jax import viz

SLICES = 32


def _volume_and_scores():
    rng = np.random.default_rng(0)
    volume = rng.uniform(size=(1, SLICES, 24, 24)).astype(np.float32)
    logits = rng.normal(size=(3, SLICES))
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return volume, scores


def test_eight_evenly_spaced_thumbnails_span_the_volume():
    np.testing.assert_array_equal(viz.thumbnail_slices(32), [0, 4, 9, 13, 18, 22, 27, 31])
    np.testing.assert_array_equal(viz.thumbnail_slices(5), [0, 1, 2, 3, 4])


def test_figure_shows_every_score_as_a_bar_the_uniform_line_and_the_question(tmp_path):
    volume, scores = _volume_and_scores()
    question = "Which organ shows a lesion?"
    fig = viz.slice_attention_figure(volume, scores[0], question, answer="The liver.")
    *thumbnails, bars = fig.axes
    assert len(thumbnails) == 8
    assert [ax.get_xlabel().split("\n")[0] for ax in thumbnails] == [f"slice {i}" for i in viz.thumbnail_slices(SLICES)]
    np.testing.assert_allclose([p.get_height() for p in bars.patches], scores[0], rtol=1e-6)
    (uniform,) = bars.get_lines()
    np.testing.assert_allclose(uniform.get_ydata(), 1 / SLICES)
    assert fig.get_suptitle() == question
    path = viz.save_figure(fig, tmp_path / "figure" / "slices.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_question_grid_has_one_bar_chart_per_question_on_one_scale(tmp_path):
    volume, scores = _volume_and_scores()
    questions = ["Which organ?", "Is the kidney normal?", "Describe the scan."]
    fig = viz.question_grid_figure(volume[0], scores, questions, answers=["liver", "yes", "normal"])
    bar_axes = fig.axes[8:]
    assert len(bar_axes) == 3
    assert len({ax.get_ylim() for ax in bar_axes}) == 1
    assert [ax.get_title(loc="left").rsplit(" → ", 1)[0] for ax in bar_axes] == questions
    path = viz.save_figure(fig, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 10_000 and path.endswith("grid.png")


def test_mismatched_scores_are_refused_with_their_shapes():
    volume, scores = _volume_and_scores()
    with pytest.raises(ValueError, match="31 slice scores for a volume of 32 slices"):
        viz.slice_attention_figure(volume, scores[0, :31], "q")
    with pytest.raises(ValueError, match="questions=2"):
        viz.question_grid_figure(volume, scores, ["a", "b"])


def test_ground_truth_slices_are_shaded_behind_the_bars():
    volume, scores = _volume_and_scores()
    fig = viz.slice_attention_figure(volume, scores[0], "Where is the lesion?", truth=[5, 9])
    bars = fig.axes[-1]
    (span,) = [p for p in bars.patches if p.get_width() > 1]  # the bars are 0.8 wide
    assert (span.get_x(), span.get_x() + span.get_width()) == (4.5, 9.5)
    with pytest.raises(ValueError, match="outside the 32 slices"):
        viz.slice_attention_figure(volume, scores[0], "?", truth=[30, 32])
