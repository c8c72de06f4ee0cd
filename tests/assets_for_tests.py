"""The fetched real assets in tests: their path, or a skip that says what is missing."""

import pytest

from data_pipelines.assets import AssetError, asset_path


def fetched(name: str) -> str:
    """`asset_path(name)`, or skip the test (scripts/test.sh runs scripts/fetch_assets.py first)."""
    try:
        return asset_path(name)
    except AssetError as error:
        pytest.skip(f"{name} not fetched: {error}")
