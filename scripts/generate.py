"""`med2e3-generate` from a checkout (med2e3_jax/cli/generate.py): `python scripts/generate.py --help`."""

from med2e3_jax.cli.generate import run

if __name__ == "__main__":
    run()
