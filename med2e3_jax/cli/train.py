r"""Trains Med-2E3: one stage of the two-stage recipe, on one device, a mesh of devices, or many hosts.

    med2e3-train --config tiny:pretrain --workdir runs/pretrain \
        --config.data.annotation_file=DATA/annotations/npy/train.json --config.data.image_root=DATA \
        --config.data.tokenizer_path=TOK/phi3 --config.data.question_tokenizer_path=TOK/bert
    med2e3-train --config tiny:finetune --workdir runs/finetune \
        --config.train.init_from=runs/pretrain --config.train.steps=400 ...

Rerunning the same command resumes from the latest checkpoint in `--workdir`. SIGTERM saves a
checkpoint and exits 0; a NaN/inf loss exits non-zero with the step and the last good checkpoint.
`--config` is a bundled config by name (`tiny`, `med2e3_m3d`, `plans`, ...) or a config file's path
(`configs/tiny.py:finetune`); `--config.KEY=VALUE` overrides any of its values.
Multi-host: on every host, the same command plus --config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from med2e3_jax.cli import run_command

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config: a bundled name (tiny:finetune) or a file "
                                    "(configs/tiny.py:finetune)", flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, tensorboard/ and config.json go here",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax reports every save step by step through absl's logger; keep the console to our own lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from med2e3_jax.train.loop import train

    result = train(FLAGS.config, FLAGS.workdir)
    state = "preempted" if result.preempted else "finished"
    logging.getLogger(__name__).info("%s at step %d: %s", state, result.step, result.metrics)


def run() -> None:
    run_command(__name__, define_flags, main, config_file_flag="config")


if __name__ == "__main__":
    run()
