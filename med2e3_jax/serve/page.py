"""The page's HTML fragments: the slice-score bars beside the axial view and the answers side by side.

Pure functions from the answers to HTML strings (every text escaped), so that the handlers' tests read
them without a browser. The bars: one row per slice (0 at the top, superior), one column per question,
each cell a bar as wide as the score on a scale from 0 to the largest score shown or twice the uniform
weight 1 / slices, whichever is more (viz.py's colour scale), a dashed tick at the uniform weight; the current axial slice's row is marked, and a click on a row (handled by `BARS_JS` in the
browser) jumps to that slice. The browser tests find them by `BAR_CLASS` and `data-slice`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from med2e3_jax.serve.engine import Answer

BAR_CLASS = "slice-bar"
BARS_JS = """
element.addEventListener('click', (event) => {
  const row = event.target.closest('[data-slice]');
  if (row) trigger('click', {slice: Number(row.dataset.slice)});
});
"""
CSS = """
.slice-bars { font: 11px/1.1 monospace; user-select: none; }
.slice-bars .bars-row { display: flex; align-items: center; cursor: pointer; height: var(--row-height, 13px); }
.slice-bars .bars-row:hover { background: #eef3fb; }
.slice-bars .bars-row.current { background: #ffe9a8; }
.slice-bars .bars-head { display: flex; font-weight: bold; margin-bottom: 2px; }
.slice-bars .bars-index { width: 2.6em; text-align: right; padding-right: 4px; color: #555; flex: none; }
.slice-bars .bars-cell { position: relative; flex: 1; height: 80%; margin: 0 3px; background: #f4f4f4; }
.slice-bars .slice-bar { position: absolute; left: 0; top: 0; bottom: 0; background: #fd8d3c; }
.slice-bars .slice-bar.above { background: #d7301f; }
.slice-bars .bars-uniform { position: absolute; top: -1px; bottom: -1px; border-left: 1px dashed #333; }
.answers { display: flex; gap: 10px; flex-wrap: wrap; }
.answers .answer { flex: 1 1 220px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; }
.answers .question { font-weight: bold; margin-bottom: 4px; }
.answers .answer-text { white-space: pre-wrap; min-height: 1.4em; }
.answers .answer.pending .answer-text::after { content: "▌"; color: #999; }
.answers .meta { color: #666; font-size: 0.85em; margin-top: 6px; }
.scan-status { white-space: pre-wrap; }
.answers .error, .scan-status.error { color: #b00020; white-space: pre-wrap; }
"""


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def bars_html(answers: Sequence[Answer], slices: int, current: int) -> str:
    """One row per slice, one bar per answered question; '' before any answer has scores."""
    scored = [a for a in answers if a.slice_scores is not None]
    if not scored or slices < 1:
        return ""
    scores = np.stack([np.asarray(a.slice_scores, np.float32).reshape(-1) for a in scored])
    if scores.shape[1] != slices:
        raise ValueError(f"{scores.shape[1]} slice scores for a scan of {slices} slices")
    largest = max(float(scores.max()), 2.0 / slices)
    uniform = 100.0 / slices / largest
    row_height = max(6, min(14, 440 // slices))
    head = "".join(f'<span class="bars-cell" title="{_e(a.question)}">Q{i + 1}</span>' for i, a in enumerate(scored))
    rows = []
    for k in range(slices):
        cells = []
        for q, answer in enumerate(scored):
            score = float(scores[q, k])
            above = " above" if score > 1.0 / slices else ""
            cells.append(
                f'<span class="bars-cell"><span class="{BAR_CLASS}{above}" data-question="{q}" '
                f'style="width: {100.0 * score / largest:.2f}%" title="slice {k}, Q{q + 1}: {score:.4f}"></span>'
                f'<span class="bars-uniform" style="left: {uniform:.2f}%"></span></span>')
        marked = " current" if k == current else ""
        rows.append(f'<div class="bars-row{marked}" data-slice="{k}"><span class="bars-index">{k}</span>'
                    f'{"".join(cells)}</div>')
    return (f'<div class="slice-bars" style="--row-height: {row_height}px">'
            f'<div class="bars-head"><span class="bars-index">slice</span>{head}</div>{"".join(rows)}'
            f'<div class="bars-head"><span class="bars-index"></span><span class="bars-cell">dashed: uniform '
            f'1/{slices}; click a row to show that slice</span></div></div>')


def answers_html(answers: Sequence[Answer]) -> str:
    """The questions side by side, each with its answer (growing while `pending`), its latencies and
    the slice it weighted most."""
    cards = []
    for i, answer in enumerate(answers):
        state = "done" if answer.done else "pending"
        body = (f'<div class="error">{_e(answer.error)}</div>' if answer.error
                else f'<div class="answer-text">{_e(answer.text)}</div>')
        meta = []
        if answer.slice_scores is not None:
            top = int(np.argmax(answer.slice_scores))
            meta.append(f"most weight on slice {top} ({float(answer.slice_scores[top]):.3f})")
        if answer.first_token_s is not None:
            meta.append(f"first token {answer.first_token_s:.3f} s")
        if answer.total_s is not None:
            meta.append(f"answer {answer.total_s:.3f} s, {len(answer.tokens)} tokens")
        cards.append(f'<div class="answer {state}" data-question="{i}"><div class="question">Q{i + 1}: '
                     f'{_e(answer.question)}</div>{body}<div class="meta">{_e(" · ".join(meta))}</div></div>')
    return f'<div class="answers">{"".join(cards)}</div>' if cards else ""


def status_html(text: str, *, error: bool = False) -> str:
    """The scan line (or a reader's error) under the upload field."""
    return f'<div class="scan-status{" error" if error else ""}">{_e(text)}</div>'
