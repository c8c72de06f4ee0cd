"""`med2e3-memory-plan` from a checkout (med2e3_jax/cli/memory_plan.py): `python scripts/memory_plan.py --help`."""

from med2e3_jax.cli.memory_plan import run

if __name__ == "__main__":
    run()
