"""Slice-attention figures: where TG-IS looked, as in the paper's figure 4.

`slice_attention_figure`: the question as the title, eight evenly spaced slices as thumbnails (each
labelled with its index and score, framed in the colour of its score), and below them the score of every
slice as a bar, with the uniform weight 1 / slices dashed — bars above it are the slices the question
drew the model to. `question_grid_figure` stacks one bar chart per question under one row of
thumbnails, to compare what different questions select in the same volume.

Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas: no pyplot, no global state, no
display needed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

NUM_THUMBNAILS = 8
_CMAP = colormaps["YlOrRd"]


def thumbnail_slices(num_slices: int, count: int = NUM_THUMBNAILS) -> np.ndarray:
    """`count` evenly spaced slice indices from the first to the last, e.g. 0, 4, 9, …, 31 of 32."""
    return np.unique(np.round(np.linspace(0, num_slices - 1, min(count, num_slices))).astype(int))


def _slices(volume) -> np.ndarray:
    """(slices, height, width) from a volume with any leading singleton axes (batch, channel)."""
    volume = np.asarray(volume, np.float32)
    while volume.ndim > 3 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, height, width) up to leading singleton axes, got {volume.shape}")
    return volume


def _scores(slice_scores, num_slices: int) -> np.ndarray:
    scores = np.asarray(slice_scores, np.float32).reshape(-1)
    if scores.size != num_slices:
        raise ValueError(f"{scores.size} slice scores for a volume of {num_slices} slices")
    return scores


def _score_norm(scores: np.ndarray) -> colors.Normalize:
    # From 0 to twice the uniform weight at least: a flat distribution stays a middle colour, not the top.
    return colors.Normalize(0.0, max(float(scores.max()), 2.0 / scores.size))


def _draw_thumbnails(fig, grid, volume: np.ndarray, scores_for_colour: np.ndarray | None, picks):
    axes = []
    norm = None if scores_for_colour is None else _score_norm(scores_for_colour)
    for column, index in enumerate(picks):
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(volume[index], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        label = f"slice {index}"
        if scores_for_colour is not None:
            label += f"\n{scores_for_colour[index]:.3f}"
            for spine in ax.spines.values():
                spine.set_edgecolor(_CMAP(norm(scores_for_colour[index])))
                spine.set_linewidth(3)
        ax.set_xlabel(label, fontsize=8)
        axes.append(ax)
    return axes


def _draw_bars(ax, scores: np.ndarray, picks, *, show_xlabel: bool = True, ymax: float | None = None,
               norm: colors.Normalize | None = None, truth: Sequence[int] | None = None):
    slices = scores.size
    norm = norm or _score_norm(scores)
    shown = {int(p) for p in picks}
    if truth is not None:
        first, last = (int(i) for i in truth)
        if not 0 <= first <= last < slices:
            raise ValueError(f"ground-truth slices [{first}, {last}] are outside the {slices} slices")
        ax.axvspan(first - 0.5, last + 0.5, color="#9ecae1", alpha=0.35, linewidth=0,
                   label=f"ground truth {first}–{last}")
    ax.bar(np.arange(slices), scores, color=[_CMAP(norm(s)) for s in scores], width=0.8,
           edgecolor=["#222222" if i in shown else "none" for i in range(slices)], linewidth=1.2)
    ax.axhline(1.0 / slices, color="#333333", linestyle="--", linewidth=1, label=f"uniform 1/{slices}")
    ax.set_xlim(-0.7, slices - 0.3)
    ax.set_ylim(0, ymax if ymax is not None else 1.15 * max(float(scores.max()), 1.0 / slices))
    ax.set_xticks(list(picks))
    ax.set_ylabel("slice score", fontsize=9)
    if show_xlabel:
        ax.set_xlabel("slice (superior → inferior)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper right", fontsize=8, frameon=False)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(" ".join(text.split()), width)) or text


def slice_attention_figure(volume, slice_scores, question: str, *, answer: str | None = None,
                           truth: Sequence[int] | None = None, num_thumbnails: int = NUM_THUMBNAILS) -> Figure:
    """The paper's figure 4 for one question.

    Args:
      volume: (slices, height, width) in [0, 1] (leading singleton axes are dropped).
      slice_scores: (slices,) TG-IS scores (they sum to 1).
      question: the title.
      answer: printed under the bars when given.
      truth: [first, last] slices that hold what the question asks about (e.g. a record's
        `answer_slices`), shaded behind the bars when given.
    """
    volume = _slices(volume)
    scores = _scores(slice_scores, volume.shape[0])
    picks = thumbnail_slices(volume.shape[0], num_thumbnails)
    fig = Figure(figsize=(1.35 * len(picks) + 0.6, 4.6 + (0.35 if answer else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(picks), height_ratios=(1.0, 1.25))
    _draw_thumbnails(fig, grid, volume, scores, picks)
    bars = fig.add_subplot(grid[1, :])
    _draw_bars(bars, scores, picks, truth=truth)
    fig.suptitle(_wrap(question, 90), fontsize=11)
    if answer:
        bars.set_title(_wrap(f"Answer: {answer}", 110), fontsize=9, loc="left", style="italic")
    return fig


def question_grid_figure(volume, slice_scores, questions: Sequence[str], *, answers: Sequence[str] | None = None,
                         num_thumbnails: int = NUM_THUMBNAILS) -> Figure:
    """Several questions about one volume: the thumbnails once, then one bar chart per question, on one
    y scale so that the heights compare.

    Args:
      slice_scores: (questions, slices).
      questions, answers: one per row of slice_scores (answers optional).
    """
    volume = _slices(volume)
    scores = np.asarray(slice_scores, np.float32)
    if scores.ndim != 2 or scores.shape[0] != len(questions):
        raise ValueError(f"slice_scores must be (questions={len(questions)}, slices), got {scores.shape}")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    scores = np.stack([_scores(row, volume.shape[0]) for row in scores])
    picks = thumbnail_slices(volume.shape[0], num_thumbnails)
    rows = len(questions)
    fig = Figure(figsize=(1.35 * len(picks) + 0.6, 1.9 + 2.1 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + rows, len(picks), height_ratios=(1.0,) + (1.05,) * rows)
    _draw_thumbnails(fig, grid, volume, None, picks)
    ymax = 1.15 * max(float(scores.max()), 1.0 / volume.shape[0])
    norm = _score_norm(scores.max(axis=0))  # one colour scale for every question
    for row, question in enumerate(questions):
        ax = fig.add_subplot(grid[1 + row, :])
        _draw_bars(ax, scores[row], picks, show_xlabel=row == rows - 1, ymax=ymax, norm=norm)
        title = question if answers is None else f"{question} → {answers[row]}"
        ax.set_title(_wrap(title, 110), fontsize=9, loc="left")
    fig.suptitle("Slice scores per question", fontsize=11)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 130) -> str:
    """Writes `fig` as a PNG (folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
