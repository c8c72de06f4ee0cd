"""`med2e3-train` from a checkout (med2e3_jax/cli/train.py): `python scripts/train.py --help`."""

from med2e3_jax.cli.train import run

if __name__ == "__main__":
    run()
