"""The installed commands: one module per `med2e3-*` console script (setup.py's `entry_points`).

Each module has `define_flags(flag_values)` (absl flags, ml_collections configs), `main(argv)` and
`run()`, the entry point; `scripts/*.py` are wrappers that call `run()`. Flags are defined when the
command starts rather than at import, so that tests and other programs can import several commands.

`--config NAME[:ARGS]` names a config bundled with the package (`configs/NAME.py`, installed as
`med2e3_jax.configs`): `med2e3-train --config tiny:finetune` works without a checkout, and a path
(`--config configs/tiny.py:finetune`, `--config my_experiment.py`) works as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from importlib import resources

from absl import app, flags

CONFIGS_PACKAGE = "med2e3_jax.configs"


def bundled_configs() -> list[str]:
    """Names of the configs installed with the package (`tiny`, `med2e3_m3d`, `plans`, ...)."""
    root = resources.files(CONFIGS_PACKAGE)
    return sorted(entry.name[:-3] for entry in root.iterdir() if entry.name.endswith(".py")
                  and not entry.name.startswith("_"))


def resolve_config(value: str) -> str:
    """`NAME[:ARGS]` of a bundled config -> `PATH/NAME.py[:ARGS]`; a path is returned unchanged.

    Raises:
      app.UsageError: `value` is a bare name (no `/`, no `.py`) that is neither a file nor a bundled config.
    """
    path, sep, args = value.partition(":")
    if not path or os.path.exists(path) or os.sep in path or "/" in path or path.endswith(".py"):
        return value
    candidate = resources.files(CONFIGS_PACKAGE) / f"{path}.py"
    if not candidate.is_file():
        raise app.UsageError(f"--config {value!r}: no file {path!r} and no bundled config of that name "
                             f"(bundled: {', '.join(bundled_configs())})")
    return f"{candidate}{sep}{args}"


def resolve_config_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """`argv` with the value of `--FLAG` (`--FLAG=V` or `--FLAG V`) passed through `resolve_config`."""
    out, expect_value = [], False
    for arg in argv:
        if expect_value:
            arg, expect_value = resolve_config(arg), False
        elif arg in (f"--{flag}", f"-{flag}"):
            expect_value = True
        elif arg.startswith((f"--{flag}=", f"-{flag}=")):
            name, _, value = arg.partition("=")
            arg = f"{name}={resolve_config(value)}"
        out.append(arg)
    return out


def shape_flag(name: str, values: list[str]) -> tuple[int, int, int] | None:
    """`--NAME=D,H,W` as three positive ints (None when empty), or a UsageError naming the flag."""
    if not values:
        return None
    try:
        shape = tuple(int(v) for v in values)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise app.UsageError(f"--{name} takes three positive integers D,H,W, got {','.join(values)!r}")
    return shape


def window_flag(name: str, values: list[str]) -> tuple[float, float]:
    """`--NAME=LOW,HIGH` as two floats, LOW < HIGH, or a UsageError naming the flag."""
    try:
        low, high = (float(v) for v in values)
    except ValueError:
        low = high = 0.0
    if not low < high:
        raise app.UsageError(f"--{name} takes LOW,HIGH with LOW < HIGH, got {','.join(values)!r}")
    return low, high


def run_command(module_name: str, define_flags: Callable[[flags.FlagValues], None],
                main: Callable[[list[str]], None], *, config_file_flag: str | None = None) -> None:
    """Defines the command's flags on absl's global FLAGS and runs `main` under `absl.app`."""
    # absl's --help prints the docstring of __main__, which for a console script is pip's wrapper.
    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    known = set(flags.FLAGS)
    define_flags(flags.FLAGS)
    # --help lists the key flags of sys.argv[0]'s module, and ours are defined in another.
    for name in set(flags.FLAGS) - known:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    if config_file_flag:
        try:
            sys.argv[:] = resolve_config_argv(sys.argv, config_file_flag)
        except app.UsageError as error:
            sys.exit(f"{os.path.basename(sys.argv[0])}: {error}")
    app.run(main)
