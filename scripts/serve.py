"""`med2e3-serve` from a checkout (med2e3_jax/cli/serve.py): `python scripts/serve.py --help`."""

from med2e3_jax.cli.serve import run

if __name__ == "__main__":
    run()
