"""`med2e3-fetch-assets` from a checkout (med2e3_jax/cli/fetch_assets.py): `python scripts/fetch_assets.py --help`."""

from med2e3_jax.cli.fetch_assets import run

if __name__ == "__main__":
    run()
