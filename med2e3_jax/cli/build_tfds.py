"""Preprocesses every volume of the given splits once and stores volumes and records as two TFDS
ArrayRecord datasets, the pipeline's fastest source (data_pipelines/tfds_builder.py).

    med2e3-build-tfds --out STORE --image_root DIR --split train=train.json --split test=test.json \
        [--shape 32,256,256] [--modality auto] [--dtype uint8] [--threads 4] [--skip_bad] [--overwrite]
"""

import logging
import os

from absl import app, flags

from med2e3_jax.cli import run_command, shape_flag, window_flag

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    from data_pipelines.preprocess import MODALITIES
    from data_pipelines.tfds_builder import DTYPES

    flags.DEFINE_string("out", None, "folder for the two TFDS datasets", flag_values=flag_values)
    flags.DEFINE_multi_string("split", None, "NAME=ANNOTATIONS.json: a split and its annotation file (repeat for "
                              "each split)", flag_values=flag_values)
    flags.DEFINE_string("image_root", None, "prefix for relative vision3d paths; every volume must resolve inside it",
                        flag_values=flag_values)
    flags.DEFINE_bool("allow_outside_root", False, "also read volumes outside --image_root", flag_values=flag_values)
    flags.DEFINE_list("shape", ["32", "256", "256"], "the model's volume D,H,W", flag_values=flag_values)
    flags.DEFINE_enum("modality", "auto", list(MODALITIES),
                      "as the data config's modality; auto: CT for NIfTI/DICOM, unit for .npy", flag_values=flag_values)
    flags.DEFINE_list("hu_window", ["-1000", "1000"], "LOW,HIGH: the HU window of modality ct",
                      flag_values=flag_values)
    flags.DEFINE_enum("dtype", "uint8", sorted(DTYPES), "stored voxel type", flag_values=flag_values)
    flags.DEFINE_integer("threads", os.cpu_count() or 1, "volumes preprocessed at once", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_bool("skip_bad", False, "log and leave out unreadable volumes", flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "replace an existing store", flag_values=flag_values)
    flags.mark_flags_as_required(["out", "split"], flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipelines.annotations import load_records
    from data_pipelines.tfds_builder import build_preprocessed, open_preprocessed

    # Absolute, so that joining it again (build_preprocessed confines to it) leaves the paths as they are.
    root = os.path.abspath(FLAGS.image_root) if FLAGS.image_root else None
    splits = {}
    for item in FLAGS.split:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--split takes NAME=ANNOTATIONS.json, got {item!r}")
        splits[name] = load_records(path, root)
    logging.getLogger().setLevel(logging.INFO)
    build_preprocessed(splits, FLAGS.out, shape=shape_flag("shape", FLAGS.shape), modality=FLAGS.modality,
                       window=window_flag("hu_window", FLAGS.hu_window), dtype=FLAGS.dtype, threads=FLAGS.threads,
                       strict=not FLAGS.skip_bad, overwrite=FLAGS.overwrite, image_root=root,
                       allow_outside_root=FLAGS.allow_outside_root)
    for name in splits:
        print(f"{name}: {len(open_preprocessed(FLAGS.out, name))} records in {FLAGS.out}")


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
