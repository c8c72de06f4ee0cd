"""`med2e3-evaluate` from a checkout (med2e3_jax/cli/evaluate.py): `python scripts/evaluate.py --help`."""

from med2e3_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
