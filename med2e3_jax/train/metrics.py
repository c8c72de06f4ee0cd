"""Where training metrics go: a JSONL file, TensorBoard event files and a console progress bar.

    workdir/metrics.jsonl     one JSON object per logged step: {"step": 10, "loss": ..., ...}
    workdir/tensorboard/      event files (`tensorboard --logdir workdir/tensorboard`)

Only process 0 writes; on the other processes every method is a no-op, so the loop calls them
unconditionally. A resumed run appends: steps between the last checkpoint and a kill appear twice,
and the later line is the one that belongs to the surviving run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Self

import jax
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

logger = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int = 0,
                 enabled: bool | None = None, progress_bar: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._file = self._tensorboard = self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)
        # Imported here so that a process that never writes metrics does not need tensorboardX.
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(logdir=os.path.join(os.fspath(workdir), TENSORBOARD_DIR))
        if progress_bar:
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                                  desc="train")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """One line of the JSONL, one scalar per metric in TensorBoard, the loss on the progress bar."""
        if not self.enabled:
            return
        values = {name: float(value) for name, value in metrics.items()}
        # JSON has no NaN/inf: write them as strings so the file stays parseable by any reader.
        record = {"step": int(step), **{k: v if math.isfinite(v) else str(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f"train/{name}", value, global_step=int(step))
        self._tensorboard.flush()
        if self._bar is not None:
            self._bar.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "learning_rate") if k in values},
                                  refresh=False)
        logger.info("step %d: %s", step, " ".join(f"{k}={v:.5g}" for k, v in values.items()))

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._file is not None:
            self._file.close()
        self._file = self._tensorboard = self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The JSONL records, the last record of each step winning (a resumed run rewrites some steps)."""
    by_step: dict[int, dict] = {}
    with open(os.path.join(os.fspath(workdir), METRICS_FILE), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
