"""Writes one volume preprocessed exactly as the evaluation pipeline feeds the model.

    med2e3-preprocess --input scan.nii.gz --output scan.npy [--modality auto] [--shape 32,256,256]

Reads INPUT (`.npy`, `.nii` / `.nii.gz` or a DICOM series directory) with
`data_pipelines.readers.read_volume` and writes `data_pipelines.preprocess.preprocess_volume` of it (the
evaluation transform, no augmentation) as float32 (1, depth, height, width). Prints the source's shape,
spacing and value range.
"""

import os

import numpy as np
from absl import app, flags

from med2e3_jax.cli import run_command, shape_flag, window_flag

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    from data_pipelines.preprocess import MODALITIES

    flags.DEFINE_string("input", None, "a .npy, .nii / .nii.gz file or a DICOM series directory",
                        flag_values=flag_values)
    flags.DEFINE_string("output", None, "the .npy file to write", flag_values=flag_values)
    flags.DEFINE_enum("modality", "auto", list(MODALITIES),
                      "ct: HU window then min-max; mr: min-max; unit: already in [0, 1] (M3D's .npy); auto (the "
                      "pipeline's default): unit for .npy, ct for NIfTI and CT DICOM, mr for other DICOM",
                      flag_values=flag_values)
    flags.DEFINE_list("shape", ["32", "256", "256"], "the model's volume D,H,W", flag_values=flag_values)
    flags.DEFINE_list("hu_window", ["-1000", "1000"], "LOW,HIGH: the HU window of modality ct",
                      flag_values=flag_values)
    flags.mark_flags_as_required(["input", "output"], flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipelines.errors import DataError
    from data_pipelines.preprocess import preprocess_volume
    from data_pipelines.readers import read_volume

    shape, window = shape_flag("shape", FLAGS.shape), window_flag("hu_window", FLAGS.hu_window)
    try:
        volume = read_volume(FLAGS.input)
        array = preprocess_volume(volume, shape=shape, modality=FLAGS.modality, window=window)
    except DataError as error:
        raise SystemExit(f"error: {type(error).__name__}: {error}") from None
    modality = volume.modality_hint if FLAGS.modality == "auto" else FLAGS.modality
    spacing = "unknown (no geometry in the file)" if volume.spacing is None else (
        " x ".join(f"{s:g}" for s in volume.spacing) + " mm")
    print(f"source: {volume.source}")
    print(f"  shape (depth, height, width): {volume.array.shape}, spacing {spacing}")
    print(f"  values {float(volume.array.min()):g} .. {float(volume.array.max()):g} (read as {modality})")
    # np.save appends .npy to a name without it: name the file it writes, not the one asked for.
    output = FLAGS.output if FLAGS.output.endswith(".npy") else FLAGS.output + ".npy"
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    np.save(output, array)
    print(f"wrote {output}: {array.dtype} {array.shape}, "
          f"values {float(array.min()):g} .. {float(array.max()):g}")


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
