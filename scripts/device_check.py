"""`med2e3-device-check` from a checkout (med2e3_jax/cli/device_check.py): `python scripts/device_check.py --help`."""

from med2e3_jax.cli.device_check import run

if __name__ == "__main__":
    run()
