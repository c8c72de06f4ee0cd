"""`med2e3-convert` from a checkout (med2e3_jax/cli/convert.py): `python scripts/convert_checkpoint.py --help`."""

from med2e3_jax.cli.convert import run

if __name__ == "__main__":
    run()
