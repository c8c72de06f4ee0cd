"""Does TG-IS look where the answer is? The slice-score mass on the ground-truth slices, against the
share those slices would get from uniform scores.

A record's `answer_slices` is the inclusive [first, last] range of the slices that hold what its answer
is about (the synthetic phantoms and the real-CT grounded set store it; null when there is nothing to
look at). For one prediction, `mass` is the sum of its slice scores over that range and `uniform` the
range's length over the number of slices: a model that ignores the question scores mass ≈ uniform, one
that looks at the finding scores mass > uniform. The summary gives their means, their ratio (`lift`)
and how often mass exceeds uniform, overall and per question type.

A lift above 1 can also come from where the scores go whatever the question (towards the body, or a
salient slice). The control that isolates the text is the same scan asked something else: `other` is
the mass that the scores of the *other* questions about the same volume put on this question's range,
and `text_lift` = mass / other. Scores that ignore the question give text_lift = 1 exactly; scores the
question moves towards its own finding give more. `shift` tells the two ways of scoring a text lift of 1
apart: how far the scores move between questions about the same volume, as the total-variation distance
(half the L1 distance) between this question's scores and each other question's, averaged: 0 when the
question changes nothing, 1 when two questions look at disjoint slices. A large shift with a text lift
of 1 means the question moves the scores, but not towards what it asks about.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from med2e3_jax.evaluation.tasks import record_id, type_name


def slice_mass(slice_scores: Sequence[float], slice_range: Sequence[int]) -> tuple[float, float]:
    """(score mass on slices first..last inclusive, the range's uniform share) for one sample.

    Args:
      slice_scores: (slices,) non-negative scores; normalised here, so they need not sum to 1 exactly.
      slice_range: [first, last] slice indices, 0 <= first <= last < slices.
    """
    scores = np.asarray(slice_scores, np.float64).reshape(-1)
    if len(slice_range) != 2:
        raise ValueError(f"slice range {slice_range!r}: expected [first, last]")
    first, last = (int(i) for i in slice_range)
    if not 0 <= first <= last < scores.size:
        raise ValueError(f"slice range [{first}, {last}] is outside the {scores.size} scored slices")
    total = scores.sum()
    if not np.isfinite(total) or total <= 0 or np.any(scores < 0):
        raise ValueError(f"slice scores must be non-negative with a positive sum, got sum {total}")
    return float(scores[first:last + 1].sum() / total), (last - first + 1) / scores.size


def score_shift(slice_scores: Sequence[float], other_scores: Sequence[float]) -> float:
    """Total-variation distance between two score vectors over the same slices, each normalised."""
    p, q = (np.asarray(s, np.float64).reshape(-1) for s in (slice_scores, other_scores))
    if p.shape != q.shape:
        raise ValueError(f"scores over {p.size} and {q.size} slices cannot be compared")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def _stats(samples: list[tuple[float, float, float | None, float | None]]) -> dict:
    mass = np.array([m for m, _, _, _ in samples])
    uniform = np.array([u for _, u, _, _ in samples])
    controlled = [(m, o) for m, _, o, _ in samples if o is not None]
    shifts = [d for _, _, o, d in samples if o is not None]
    stats = {
        "count": len(samples),
        "mass": float(mass.mean()),
        "uniform": float(uniform.mean()),
        "lift": float(mass.mean() / uniform.mean()),
        "above_uniform": float(np.mean(mass > uniform)),
        "controlled": len(controlled),  # samples whose volume was asked other questions too
        "controlled_mass": None,
        "other": None,
        "text_lift": None,
        "shift": None,
    }
    if controlled:
        own, other = np.array(controlled).T
        stats.update(controlled_mass=float(own.mean()), other=float(other.mean()),
                     text_lift=float(own.mean() / other.mean()) if other.mean() > 0 else None,
                     shift=float(np.mean(shifts)))
    return stats


def grounding_summary(predictions: Sequence[Mapping], records: Sequence[Mapping]) -> dict:
    """Score mass on the ground truth over every prediction that has slice scores and whose record has
    `answer_slices`.

    Args:
      predictions: rows with `id`, `slice_scores` (and optionally `question_type`), as in the
        evaluation runner's predictions.json.
      records: the annotation records the predictions were made for (matched by id).

    Returns:
      {"overall": stats, "per_type": {type name: stats}, "skipped": n} with stats = count, mass,
      uniform, lift (mass / uniform), above_uniform (fraction of samples with mass > uniform),
      controlled (samples whose volume — the record's `vision3d` — has other scored predictions),
      controlled_mass (their mean mass), other (their mean mass under those other predictions'
      scores), text_lift (controlled_mass / other) and shift (their mean total-variation distance to
      those other predictions' scores); the last four None without such samples; "overall" is None when
      no prediction qualifies.
    """
    slices_of = {record_id(r, i): r.get("answer_slices") for i, r in enumerate(records)}
    type_of = {record_id(r, i): r.get("question_type") for i, r in enumerate(records)}
    volume_of = {record_id(r, i): tuple(r.get("vision3d") or ()) or None for i, r in enumerate(records)}
    for row in predictions:
        if str(row["id"]) not in slices_of:
            raise KeyError(f"prediction {str(row['id'])!r} has no record among the {len(records)} given")
    scored = [row for row in predictions if row.get("slice_scores") is not None]
    on_volume = defaultdict(list)
    for row in scored:
        on_volume[volume_of[str(row["id"])]].append(row)
    overall, per_type, skipped = [], defaultdict(list), 0
    for row in predictions:
        key = str(row["id"])
        slice_range, scores = slices_of[key], row.get("slice_scores")
        if slice_range is None or scores is None:
            skipped += 1
            continue
        others = [r for r in on_volume[volume_of[key]] if str(r["id"]) != key] if volume_of[key] else []
        try:
            mass, uniform = slice_mass(scores, slice_range)
            other = float(np.mean([slice_mass(r["slice_scores"], slice_range)[0] for r in others])) if others else None
            shift = float(np.mean([score_shift(scores, r["slice_scores"]) for r in others])) if others else None
        except ValueError as error:
            raise ValueError(f"prediction {key!r}: {error}") from None
        sample = (mass, uniform, other, shift)
        overall.append(sample)
        kind = type_of[key]
        per_type[type_name(kind) if kind is not None else "untyped"].append(sample)
    return {
        "overall": _stats(overall) if overall else None,
        "per_type": {name: _stats(pairs) for name, pairs in per_type.items()},
        "skipped": skipped,
    }


def grounding_table(summary: Mapping) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| | n | mass on the finding's slices | uniform share | lift | mass > uniform "
        "| scans asked more: n, mass / other questions' mass there | text lift | shift between their questions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label, stats):
        control, text_lift, shift = "–", "–", "–"
        if stats.get("other") is not None:
            control = f"{stats['controlled']}: {stats['controlled_mass']:.3f} / {stats['other']:.3f}"
            shift = f"{stats['shift']:.3f}"
        if stats.get("text_lift") is not None:
            text_lift = f"{stats['text_lift']:.2f}×"
        return (f"| {label} | {stats['count']} | {stats['mass']:.3f} | {stats['uniform']:.3f} | "
                f"{stats['lift']:.2f}× | {100 * stats['above_uniform']:.0f} % | {control} | {text_lift} | {shift} |")

    lines += [row(name, stats) for name, stats in summary["per_type"].items()]
    if summary["overall"] is not None:
        lines.append(row("**overall**", summary["overall"]))
    return "\n".join(lines) + "\n"


def format_shift(closed: Sequence[Mapping], opened: Sequence[Mapping]) -> dict:
    """The paper's format claim, on predictions whose ids are `<scan>_<kind>_<closed|open>` (the phantom
    generator's): is the same question about the same scan scored alike whether asked closed or open?

    Returns dict(same: mean `score_shift` between the closed and the open form of one question kind about
    one scan, different: mean shift between two different kinds about one scan (either form), pairs: how
    many closed/open pairs `same` averages). None where nothing pairs.
    """
    scores = {}
    for row in (*closed, *opened):
        stem, _, form = str(row["id"]).rpartition("_")
        scan, _, kind = stem.rpartition("_")
        if form not in ("closed", "open") or not scan:
            raise ValueError(f"prediction id {row['id']!r}: expected <scan>_<kind>_<closed|open>")
        scores[(scan, kind, form)] = row["slice_scores"]
    same = [score_shift(value, scores[(scan, kind, "open")]) for (scan, kind, form), value in scores.items()
            if form == "closed" and (scan, kind, "open") in scores]
    keys = sorted(scores)
    different = [score_shift(scores[a], scores[b]) for i, a in enumerate(keys) for b in keys[i + 1:]
                 if a[0] == b[0] and a[1] != b[1]]
    return dict(same=float(np.mean(same)) if same else None,
                different=float(np.mean(different)) if different else None, pairs=len(same))
