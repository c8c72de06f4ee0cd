"""Trains Med-2E3: one stage of the two-stage recipe, on one device, a mesh of devices, or many hosts.

    python scripts/train.py --config configs/tiny.py:pretrain --workdir runs/pretrain \
        --config.data.annotation_file=DATA/annotations/npy/train.json --config.data.image_root=DATA \
        --config.data.tokenizer_path=TOK/phi3 --config.data.question_tokenizer_path=TOK/bert
    python scripts/train.py --config configs/tiny.py:finetune --workdir runs/finetune \
        --config.train.init_from=runs/pretrain --config.train.steps=400 ...

Rerunning the same command resumes from the latest checkpoint in `--workdir`. SIGTERM saves a
checkpoint and exits 0; a NaN/inf loss exits non-zero with the step and the last good checkpoint.
Multi-host: on every host, the same command plus --config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from med2e3_jax.train.loop import train

config_flags.DEFINE_config_file("config", None, "experiment config file, e.g. configs/tiny.py:finetune",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, tensorboard/ and config.json go here")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax reports every save step by step through absl's logger; keep the console to our own lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    result = train(FLAGS.config, FLAGS.workdir)
    state = "preempted" if result.preempted else "finished"
    logging.getLogger(__name__).info("%s at step %d: %s", state, result.step, result.metrics)


if __name__ == "__main__":
    app.run(main)
