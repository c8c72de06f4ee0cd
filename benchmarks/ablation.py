r"""The paper's ablation at small scale: which vision tokens and which slice weighting, over several seeds.

    python benchmarks/ablation.py                          # every variant x 3 seeds, under runs/ablation/
    python benchmarks/ablation.py --variants=tgis,mean --seeds=2 --finetune_steps=400
    python benchmarks/ablation.py --smoke                  # two variants, one seed, a few steps

Each run is the quick start's recipe (`scripts/quickstart.sh`): the phantom set (generated once, fixed
for every run), the tiny config with MiniLM as TG-IS's question encoder, pretrain on the reports, then
finetune on closed and open VQA, then greedy answers on the held-out phantoms. A variant is config
values only, routed through the one model (`tgis.vision_tokens`, `tgis.slice_weighting`,
`vision2d.slice_windows`); a seed sets
both the model's initialization (`train.seed`) and the data order (`data.seed`).

Every stage is one of the documented commands, run as a subprocess, so an interrupted ablation resumes
where it stopped: a finished stage is skipped (training resumes from its checkpoints, evaluation from its
predictions) and a finished run's figures are read from its `result.json`.

Per run: closed-VQA accuracy per question type and overall (the authors' letter rule), open-VQA exact
match and METEOR, the TG-IS score mass on the asked-about finding's slices over its uniform share (lift)
and over the mass the other questions about the scan put there (text lift), and the format claim: the
total-variation distance between the slice scores of the same question type about the same scan asked
closed and asked open, against the distance between different question types about that scan.
Written to OUT/ablation.md (mean ± std over seeds, and each variant's paired difference to TG-IS with a
95 % t interval), OUT/ablation.json and OUT/ablation.png (the bars with their error bars).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import subprocess
import sys

from absl import app, flags

from med2e3_jax.config import CT_SLICE_WINDOWS

# name -> config overrides of the experiment config (both stages).
VARIANTS = {
    "3d": {"model.tgis.vision_tokens": "3d"},
    "2d_tgis": {"model.tgis.vision_tokens": "2d"},
    "mean": {"model.tgis.slice_weighting": "mean"},
    "max": {"model.tgis.slice_weighting": "max"},
    "uniform": {"model.tgis.slice_weighting": "uniform"},
    "tgis": {},
    "windows": {"model.vision2d.slice_windows": str(CT_SLICE_WINDOWS)},
}
# What each stage trains when the variant lacks modules of the default recipe (train_config.TRAINABLE).
# `3d` has no slice branch; `mean`, `max` and `uniform` have no TG-IS parameters (no text_mlp).
_NO_TEXT = {"pretrain": ("vision2d_connector", "vision3d_connector"),
            "finetune": ("llm", "vision2d", "vision2d_connector", "vision3d_connector")}
TRAINABLE = {"3d": {"pretrain": ("vision3d_connector",), "finetune": ("llm", "vision3d_connector")},
             "mean": _NO_TEXT, "max": _NO_TEXT, "uniform": _NO_TEXT}
REFERENCE = "tgis"
# Variants whose slice scores come from the question: they read it with MiniLM, as the quick start does,
# and their grounding figures mean something.
SCORED = {"2d_tgis", "tgis", "windows"}
EVALUATIONS = (("m3d_vqa_closed", "vqa_closed_test.json", 16), ("m3d_vqa_open", "vqa_open_test.json", 32))
SMOKE = dict(variants="tgis,3d", seeds=1, phantoms=24, pretrain_steps=2, finetune_steps=3, eval_limit=4)

flags.DEFINE_string("out", "runs/ablation", "runs, the phantom set and the tables go here")
flags.DEFINE_list("variants", list(VARIANTS), f"which of {list(VARIANTS)}")
flags.DEFINE_integer("seeds", 3, "seeds per variant (0, 1, ...)")
flags.DEFINE_integer("phantoms", 1000, "phantom volumes (generated once into OUT/data)")
flags.DEFINE_integer("pretrain_steps", 100, "stage 1 steps")
flags.DEFINE_integer("finetune_steps", 800, "stage 2 steps (the quick start trains 1200)")
flags.DEFINE_integer("eval_limit", 0, "held-out records per evaluation (0: all)")
flags.DEFINE_bool("smoke", False, f"a few steps of two variants: {SMOKE}")
FLAGS = flags.FLAGS

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    out: pathlib.Path
    variants: tuple[str, ...]
    seeds: int
    phantoms: int
    pretrain_steps: int
    finetune_steps: int
    eval_limit: int

    @property
    def data(self) -> pathlib.Path:
        return self.out / "data"

    @property
    def annotations(self) -> pathlib.Path:
        return self.data / "annotations" / "npy"


def command(name: str, *args) -> None:
    """Runs the command med2e3-NAME with this interpreter: its log goes to stderr, its stdout (the figures are
    read from the run folder) is dropped."""
    argv = [sys.executable, "-m", f"med2e3_jax.cli.{name.replace('-', '_')}", *map(str, args)]
    logger.info("%s", " ".join(argv[2:]))
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def make_data(plan: Plan) -> None:
    if (plan.data / "ground_truth.json").exists():
        return
    command("phantoms", "--out", plan.data, "--num", plan.phantoms, "--seed", 0, "--shape", "32,64,64",
            "--format", "npy", "--choice_order", "natural", "--contrast", "enhanced")


def train_run(plan: Plan, variant: str, seed: int, run: pathlib.Path) -> None:
    overrides = [f"--config.{key}={value}" for key, value in VARIANTS[variant].items()]
    encoder = ",minilm" if variant in SCORED else ""  # the others build no question encoder
    overrides += [f"--config.train.seed={seed}", f"--config.data.seed={seed}", f"--config.data.image_root={plan.data}"]
    stages = (("pretrain", "report_train.json", plan.pretrain_steps, []),
              ("finetune", "vqa_train.json", plan.finetune_steps, [f"--config.train.init_from={run / 'pretrain'}"]))
    for stage, annotation, steps, extra in stages:
        if (run / stage / "model" / "model_config.json").exists():
            continue
        if stage in TRAINABLE.get(variant, {}):
            extra = [*extra, f"--config.train.trainable={TRAINABLE[variant][stage]}"]
        command("train", "--config", f"tiny:{stage}{encoder}", "--workdir", run / stage,
                f"--config.data.annotation_file={plan.annotations / annotation}", f"--config.train.steps={steps}",
                *overrides, *extra)
    for task, annotation, tokens in EVALUATIONS:
        if (run / "eval" / task / "metrics.json").exists():
            continue
        command("evaluate", f"--config.task={task}", f"--config.checkpoint={run / 'finetune' / 'model'}",
                f"--config.annotation_file={plan.annotations / annotation}", f"--config.image_root={plan.data}",
                f"--config.output_dir={run / 'eval'}", "--config.question_max_length=32", "--config.batch_size=16",
                f"--config.limit={plan.eval_limit}", f"--config.max_new_tokens={tokens}", "--config.progress=false")


def _read_json(path: pathlib.Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def summarize_run(plan: Plan, variant: str, run: pathlib.Path) -> dict:
    """The figures of one finished run (see the module docstring)."""
    from data_pipelines.annotations import load_records
    from med2e3_jax.evaluation.grounding import format_shift, grounding_summary
    from med2e3_jax.evaluation.metrics import exact_match_by_type
    from med2e3_jax.evaluation.tasks import type_name

    closed, opened = (run / "eval" / task for task, _, _ in EVALUATIONS)
    closed_metrics, open_metrics = _read_json(closed / "metrics.json"), _read_json(opened / "metrics.json")
    closed_rows, open_rows = _read_json(closed / "predictions.json"), _read_json(opened / "predictions.json")
    result = {f"closed/{type_name(k)}": v["accuracy"] for k, v in closed_metrics["per_type"].items()}
    result["closed/overall"] = closed_metrics["overall"]["accuracy"]
    result["open/exact_match"] = exact_match_by_type(open_rows)["overall"]
    result["open/meteor"] = open_metrics["overall"]["meteor"]
    if variant in SCORED:
        records = load_records(plan.annotations / EVALUATIONS[0][1], plan.data, validate=False)
        grounding = grounding_summary(closed_rows, records)["overall"] or {}
        result["tgis/lift"] = grounding.get("lift")
        result["tgis/text_lift"] = grounding.get("text_lift")
        distances = format_shift(closed_rows, open_rows)
        result["format/same_question_tv"] = distances["same"]
        result["format/other_question_tv"] = distances["different"]
    return result


def run_all(plan: Plan) -> dict[str, list[dict]]:
    """variant -> one result per seed, training and evaluating what is not done yet."""
    make_data(plan)
    results = {}
    for variant, seed in itertools.product(plan.variants, range(plan.seeds)):
        run = plan.out / variant / f"seed{seed}"
        done = run / "result.json"
        if not done.exists():
            logger.info("variant %s, seed %d", variant, seed)
            train_run(plan, variant, seed, run)
            partial = done.with_suffix(".json.tmp")
            partial.write_text(json.dumps(summarize_run(plan, variant, run), indent=1) + "\n", encoding="utf-8")
            os.replace(partial, done)
        results.setdefault(variant, []).append(_read_json(done))
    return results


def _plus_minus(value: float, spread: float, sign: str) -> str:
    """`value ± spread`, or the value alone when there is no spread (one seed)."""
    return f"{value:{sign}.3f}" if math.isnan(spread) else f"{value:{sign}.3f} ± {spread:.3f}"


def markdown(table: dict, plan: Plan) -> str:
    variants = list(plan.variants)
    lines = [f"Seeds: {plan.seeds}; pretrain {plan.pretrain_steps} steps, finetune {plan.finetune_steps} steps, "
             f"{plan.phantoms} phantoms. Cells: mean ± std over seeds; below each, the paired difference to "
             f"{REFERENCE} with its 95 % interval.", "",
             "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for metric, entries in table.items():
        cells, diffs = [], []
        for variant in variants:
            entry = entries.get(variant)
            cells.append("–" if entry is None else _plus_minus(entry["mean"], entry["std"], ""))
            diffs.append(_plus_minus(entry["diff"], entry["half_width"], "+") if entry and "diff" in entry else "")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        if any(diffs):
            lines.append("| (− " + REFERENCE + ") | " + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, plan: Plan, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in ("closed/overall", "open/exact_match", "open/meteor", "tgis/lift", "tgis/text_lift")
             if m in table]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], shown):
        variants = [v for v in plan.variants if v in table[metric]]
        means = [table[metric][v]["mean"] for v in variants]
        errors = [0.0 if math.isnan(table[metric][v]["std"]) else table[metric][v]["std"] for v in variants]
        axis.bar(range(len(variants)), means, yerr=errors, capsize=3, color="tab:blue")
        axis.set_xticks(range(len(variants)), variants, rotation=45, ha="right")
        axis.set_title(metric, fontsize=9)
    figure.suptitle(f"mean ± std over {plan.seeds} seed(s)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {name: FLAGS[name].value for name in ("variants", "seeds", "phantoms", "pretrain_steps", "finetune_steps",
                                                   "eval_limit")}
    if FLAGS.smoke:
        values.update(SMOKE, variants=SMOKE["variants"].split(","))
    unknown = set(values["variants"]) - set(VARIANTS)
    if unknown:
        raise app.UsageError(f"--variants: unknown {sorted(unknown)}; expected some of {list(VARIANTS)}")
    plan = Plan(out=pathlib.Path(FLAGS.out).resolve(), variants=tuple(values.pop("variants")), **values)
    plan.out.mkdir(parents=True, exist_ok=True)
    from med2e3_jax.evaluation.seeds import over_seeds

    table = over_seeds(run_all(plan), REFERENCE)
    (plan.out / "ablation.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    text = markdown(table, plan)
    (plan.out / "ablation.md").write_text(text, encoding="utf-8")
    bar_chart(table, plan, plan.out / "ablation.png")
    print(text)
    # The paper's claim in one line: TG-IS's closed-VQA accuracy against the best other variant run.
    closed = table["closed/overall"]
    others = [(entry["mean"], variant) for variant, entry in closed.items() if variant != REFERENCE]
    if REFERENCE in closed and others:
        best, name = max(others)
        ratio = closed[REFERENCE]["mean"] / best if best > 0 else math.nan
        print(f"RESULT tgis={closed[REFERENCE]['mean']:.4f} {name}={best:.4f} ratio={ratio:.3f}")

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app.run(main)
