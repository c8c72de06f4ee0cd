"""The fetched real assets in tests: their path, or a skip that says what is missing."""

import os
import pathlib

import pytest

from data_pipelines.assets import AssetError, asset_path


def fetched(name: str) -> str:
    """`asset_path(name)`, or skip the test (scripts/test.sh runs scripts/fetch_assets.py first)."""
    try:
        return asset_path(name)
    except AssetError as error:
        pytest.skip(f"{name} not fetched: {error}")


# The golden fixture(s): tiny Med-2E3 models run through the authors' PyTorch code (tests/fixtures/README.md).
# MED2E3_FIXTURES points the tests at another folder of fixtures (one subfolder each).
FIXTURES_ROOT = pathlib.Path(os.environ.get("MED2E3_FIXTURES", pathlib.Path(__file__).resolve().parent / "fixtures"))
PUBLIC_FIXTURE = FIXTURES_ROOT / "med2e3_public"
