r"""A local web viewer: load a CT, scroll it in three planes, ask, and see where the model looked.

    med2e3-serve                                     # the quick start's model, runs/quickstart/finetune/model
    med2e3-serve --checkpoint /path/to/orbax --port 7860
    med2e3-serve --pytorch /path/to/Med-2E3-M3D --config med2e3_m3d

then open http://127.0.0.1:7860. The model comes from an Orbax checkpoint written by `save_params`
(`--checkpoint`, its config inside) or from the authors' PyTorch checkpoint (`--pytorch` with
`--config`). Tokenizers default to the fetched assets (`med2e3-fetch-assets`).

The server listens on localhost unless `--host` says otherwise, compiles the model once before it
accepts a request, answers one question at a time (other users queue), keeps uploads in a private
temporary folder (at most `--max_upload_mb` each, removed once read; the folder is removed on exit) and
serves no file outside it. Needs the `serve` extra: `pip install '.[serve]'`. The page: docs/serve.md.
"""

import logging
import os
import signal

from absl import app, flags
from ml_collections import config_flags

from med2e3_jax.cli import run_command

FLAGS = flags.FLAGS
QUICKSTART_MODEL = "runs/quickstart/finetune/model"


def define_flags(flag_values: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config (a bundled name or configs/*.py): the model "
                                    "of --pytorch; its data.template and data.question_max_length are used when given",
                                    lock_config=False, flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, f"Orbax checkpoint directory written by save_params (default, without "
                        f"--pytorch: the quick start's {QUICKSTART_MODEL})", flag_values=flag_values)
    flags.DEFINE_string("pytorch", None, "the authors' PyTorch checkpoint (state_dict file or release directory)",
                        flag_values=flag_values)
    flags.DEFINE_string("tokenizer", None, "LLM tokenizer directory (default: the fetched Phi-3 tokenizer)",
                        flag_values=flag_values)
    flags.DEFINE_string("question_tokenizer", None, "BERT tokenizer directory (default: the fetched MiniLM vocabulary)",
                        flag_values=flag_values)
    flags.DEFINE_string("template", None, "chat template (default: the config's data.template, else 'phi')",
                        flag_values=flag_values)
    flags.DEFINE_integer("question_max_length", None, "BERT tokens of the TG-IS question (default: config or 32, "
                         "the quick start's)", flag_values=flag_values)
    flags.DEFINE_integer("max_new_tokens", 64, "tokens per answer at most", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0 exposes the page to the network)",
                        flag_values=flag_values)
    flags.DEFINE_integer("port", 7860, "port to listen on", lower_bound=1, upper_bound=65535, flag_values=flag_values)
    flags.DEFINE_integer("max_upload_mb", 512, "the largest upload (and unzipped DICOM series), MiB", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("phantoms", 4, "embedded phantom CTs to offer (written into the private folder)",
                         lower_bound=0, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "an empty folder to use as the private folder instead of a new temporary "
                        "one (kept on exit)", flag_values=flag_values)
    flags.DEFINE_string("cache", None, "the asset cache (default: $MED2E3_CACHE, else the XDG cache)",
                        flag_values=flag_values)


def _data_setting(name, default):
    data = FLAGS.config.get("data") if FLAGS.config is not None else None
    return data.get(name, default) if data is not None else default


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipelines.assets import asset_path
    from med2e3_jax.serve.app import launch
    from med2e3_jax.serve.engine import Engine, load_model
    from med2e3_jax.serve.scans import embedded_scans
    from med2e3_jax.serve.uploads import UploadFolder
    from med2e3_jax.serve.viewer import Viewer

    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise app.UsageError(f"med2e3-serve needs gradio ({error}): pip install '.[serve]'") from error
    checkpoint = FLAGS.checkpoint or (None if FLAGS.pytorch else QUICKSTART_MODEL)
    if checkpoint and FLAGS.pytorch:
        raise app.UsageError("pass one of --checkpoint (Orbax) and --pytorch (with --config), not both")
    if FLAGS.pytorch and FLAGS.config is None:
        raise app.UsageError("--pytorch needs --config (a bundled name or configs/<name>.py): the model's architecture")
    if checkpoint and not os.path.isdir(checkpoint):
        hint = " (run `bash scripts/quickstart.sh` first)" if checkpoint == QUICKSTART_MODEL else ""
        raise app.UsageError(f"--checkpoint {checkpoint}: no such checkpoint folder{hint}")
    model = load_model(checkpoint=checkpoint, pytorch=FLAGS.pytorch,
                       model_config=FLAGS.config.model if FLAGS.config is not None else None)
    engine = Engine.from_paths(
        model, FLAGS.tokenizer or asset_path("tokenizers/phi3", FLAGS.cache),
        FLAGS.question_tokenizer or asset_path("minilm", FLAGS.cache),
        template=FLAGS.template or _data_setting("template", "phi"),
        question_max_length=FLAGS.question_max_length or _data_setting("question_max_length", 32),
        max_new_tokens=FLAGS.max_new_tokens)
    logging.info("compiling the model (once)")
    engine.warm_up()
    uploads = UploadFolder(FLAGS.max_upload_mb << 20, root=FLAGS.workdir)
    # SIGTERM ends the server as Ctrl-C does, so that the private folder is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        embedded = embedded_scans(uploads.folder("embedded"), engine.spec, phantoms=FLAGS.phantoms, cache=FLAGS.cache)
        viewer = Viewer(engine, embedded, uploads)
        demo = launch(viewer, host=FLAGS.host, port=FLAGS.port, max_file_size=uploads.max_bytes, block=False)
        print(f"med2e3-serve: open http://{FLAGS.host}:{FLAGS.port} (private folder {uploads.root})", flush=True)
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        uploads.close()


def run() -> None:
    run_command(__name__, define_flags, main, config_file_flag="config")


if __name__ == "__main__":
    run()
