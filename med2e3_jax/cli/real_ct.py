"""Builds the grounded VQA set on real CTs: TotalSegmentator's example scans with their organ masks,
as volumes, closed and open questions and ground-truth slice ranges (data_pipelines/real_ct.py).

    med2e3-real-ct --out DIR [--seed 0] [--slices 32] [--cache DIR]

The scans come from the asset cache (`med2e3-fetch-assets`).
"""

import json
import pathlib

from absl import app, flags

from med2e3_jax.cli import run_command

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "folder to write (the image_root of the annotations)", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seeds the distractors, absent organs and letters", flag_values=flag_values)
    flags.DEFINE_integer("slices", 32, "depth of the model's volume: slice ranges are on it", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_string("cache", None, "the asset cache (default: $MED2E3_CACHE, else the XDG cache)",
                        flag_values=flag_values)
    flags.mark_flag_as_required("out", flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipelines.real_ct import CASES, SPLIT, build_grounded_set

    paths = build_grounded_set(FLAGS.out, seed=FLAGS.seed, slices=FLAGS.slices, cache=FLAGS.cache)
    counts = {name: len(json.loads(pathlib.Path(path).read_text()))
              for name, path in paths.items() if name != "ground_truth"}
    print(f"wrote {counts[SPLIT]} records ({counts[f'vqa_closed_{SPLIT}']} closed, {counts[f'vqa_open_{SPLIT}']} "
          f"open) about {len(CASES)} real CTs to {FLAGS.out}; annotations in {pathlib.Path(paths[SPLIT]).parent}")


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
