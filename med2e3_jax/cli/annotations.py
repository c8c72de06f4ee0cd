"""Converts the datasets' own annotation files to the records the pipeline reads, or validates records
(data_pipelines/annotations.py).

    med2e3-annotations m3d-vqa --csv M3D_VQA_train.csv --out train.json [--open]
    med2e3-annotations m3d-cap --csv M3D_Cap.json --out cap.json [--split train] [--text_root DIR] [--seed 0]
    med2e3-annotations ct-rate --csv reports.csv --out ctrate.json [--nosplit_dir] [--suffix .npy] [--seed 0]
    med2e3-annotations validate train.json

m3d-vqa: M3D-VQA's CSV (closed, four choices; open with --open). m3d-cap: M3D-Cap (M3D_Cap.json or a
CSV). ct-rate: CT-RATE's reports CSV to report-generation records. validate: checks an annotation JSON
and names the first bad record.
"""

from absl import app, flags

from med2e3_jax.cli import run_command

FLAGS = flags.FLAGS
COMMANDS = ("m3d-vqa", "m3d-cap", "ct-rate", "validate")


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("csv", None, "the dataset's CSV (or M3D_Cap.json)", flag_values=flag_values)
    flags.DEFINE_string("out", None, "annotation JSON to write", flag_values=flag_values)
    flags.DEFINE_bool("open", False, "m3d-vqa: open-ended questions (default: closed, four choices)",
                      flag_values=flag_values)
    flags.DEFINE_string("split", "train", "m3d-cap: the split to read", flag_values=flag_values)
    flags.DEFINE_string("text_root", None, "m3d-cap: folder the caption .txt paths are relative to",
                        flag_values=flag_values)
    flags.DEFINE_bool("split_dir", True, "ct-rate: volumes are under a train/ or valid/ folder",
                      flag_values=flag_values)
    flags.DEFINE_string("suffix", None, "ct-rate: volume file suffix instead of .nii.gz (e.g. .npy)",
                        flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "m3d-cap, ct-rate: seeds the choice of question per record",
                         flag_values=flag_values)


def main(argv):
    from data_pipelines import annotations

    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"the first argument is one of {', '.join(COMMANDS)}; got {argv[1:] or 'none'}")
    command, rest = argv[1], argv[2:]
    if command == "validate":
        if len(rest) != 1:
            raise app.UsageError(f"validate takes one annotation file, got {rest}")
        records = annotations.load_records(rest[0])
        print(f"{rest[0]}: {len(records)} records, all valid")
        return
    if rest:
        raise app.UsageError(f"unexpected arguments: {rest}")
    missing = [name for name in ("csv", "out") if not FLAGS[name].value]
    if missing:
        raise app.UsageError(f"{command} needs {' and '.join('--' + m for m in missing)}")
    if command == "m3d-cap":
        records = annotations.m3d_cap_to_records(FLAGS.csv, split=FLAGS.split, text_root=FLAGS.text_root,
                                                 seed=FLAGS.seed)
    elif command == "m3d-vqa":
        records = annotations.m3d_vqa_to_records(FLAGS.csv, closed=not FLAGS.open)
    else:
        records = annotations.ctrate_reports_to_records(FLAGS.csv, split_dir=FLAGS.split_dir, suffix=FLAGS.suffix,
                                                        seed=FLAGS.seed)
    annotations.write_records(records, FLAGS.out)
    print(f"wrote {len(records)} records to {FLAGS.out}")


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
