"""Figures over seeds: mean ± standard deviation per variant, and each variant's paired difference to a
reference variant with its 95 % t interval (seed i of a variant against seed i of the reference: the same
initialization and data order, so the difference removes what the seed does to both)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def paired_interval(differences: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval of the mean); the half-width is nan for one value."""
    from scipy import stats

    values = np.asarray(differences, np.float64)
    if values.size == 0:
        raise ValueError("no differences to average")
    if values.size < 2:
        return float(values.mean()), math.nan
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


def over_seeds(results: Mapping[str, Sequence[Mapping[str, float | None]]], reference: str) -> dict:
    """variant -> one figure dict per seed (in seed order; None where a figure does not apply) =>
    metric -> variant -> dict(mean, std (nan for one seed), n, and for variants other than `reference`:
    diff, half_width — the paired difference variant − reference over the seeds both have)."""
    metrics = sorted({key for rows in results.values() for row in rows for key in row})
    table = {}
    for metric in metrics:
        table[metric] = {}
        for variant, rows in results.items():
            values = [row[metric] for row in rows if row.get(metric) is not None]
            if not values:
                continue
            entry = dict(mean=float(np.mean(values)), n=len(values),
                         std=float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
            if variant != reference:
                pairs = [row[metric] - base[metric] for row, base in zip(rows, results.get(reference, ()))
                         if row.get(metric) is not None and base.get(metric) is not None]
                if pairs:
                    entry["diff"], entry["half_width"] = paired_interval(pairs)
            table[metric][variant] = entry
    return table
