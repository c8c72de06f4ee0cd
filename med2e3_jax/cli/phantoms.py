"""Writes the phantom CT set: volumes with organs and lesions, reports, closed and open VQA, and the
ground-truth slice ranges TG-IS is scored against (data_pipelines/synthetic.py).

    med2e3-phantoms --out DIR --num 200 [--seed 0] [--shape 32,64,64] [--format both] \
        [--choice_order shuffled] [--contrast plain]
"""

from absl import app, flags

from med2e3_jax.cli import run_command, shape_flag

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    from data_pipelines.synthetic import CHOICE_ORDERS, CONTRASTS

    flags.DEFINE_string("out", None, "folder to write (the image_root of the annotations)", flag_values=flag_values)
    flags.DEFINE_integer("num", None, "number of phantom volumes", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seeds the phantoms, their findings and the questions", flag_values=flag_values)
    flags.DEFINE_list("shape", ["32", "64", "64"], "model resolution D,H,W: the .npy volumes and every slice index",
                      flag_values=flag_values)
    flags.DEFINE_list("source_shape", [], "the NIfTI volumes' resolution D,H,W (default: 2*D,H,W)",
                      flag_values=flag_values)
    flags.DEFINE_enum("format", "both", ["npy", "nifti", "both"], "volume files to write", flag_values=flag_values)
    flags.DEFINE_enum("choice_order", "shuffled", list(CHOICE_ORDERS),
                      "closed VQA: letters dealt evenly over A-D, or choices in their natural order",
                      flag_values=flag_values)
    flags.DEFINE_enum("contrast", "plain", list(CONTRASTS),
                      "plain organs and subtle lesions, or enhanced organs and conspicuous lesions",
                      flag_values=flag_values)
    flags.mark_flags_as_required(["out", "num"], flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipelines.synthetic import generate

    formats = ("npy", "nifti") if FLAGS.format == "both" else (FLAGS.format,)
    truth = generate(FLAGS.out, num=FLAGS.num, seed=FLAGS.seed, shape=shape_flag("shape", FLAGS.shape),
                     source_shape=shape_flag("source_shape", FLAGS.source_shape), formats=formats,
                     choice_order=FLAGS.choice_order, contrast=FLAGS.contrast)
    findings = sum(len(v["findings"]) for v in truth["volumes"])
    print(f"wrote {len(truth['volumes'])} phantoms ({findings} lesions, formats {', '.join(formats)}) to {FLAGS.out}")


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
