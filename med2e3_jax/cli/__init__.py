"""The installed commands: one module per `med2e3-*` console script (setup.py's `entry_points`).

Each module has `define_flags(flag_values)` (absl flags, ml_collections configs), `main(argv)` and
`run()`, the entry point; `scripts/*.py` are wrappers that call `run()`. Flags are defined when the
command starts rather than at import, so that tests and other programs can import several commands.

`--config NAME[:ARGS]` names a config bundled with the package (`configs/NAME.py`, installed as
`med2e3_jax.configs`): `med2e3-train --config tiny:finetune` works without a checkout, and a path
(`--config configs/tiny.py:finetune`, `--config my_experiment.py`) works as before.

A command that fails ends in one line on stderr, `<command>: error: <what and where>`, and exits 1: the
full traceback, with the tracebacks that libraries log or leave unraised along the way (Orbax's
threads after a failed write, say), goes to a trace file named on that line. `--verbose` prints
everything instead. The commands that serve a model (`generate`, `evaluate`, `serve`) set the XLA
flags a bf16 model needs on CPU (`CPU_BF16_SERVING_FLAGS`) themselves.
"""

from __future__ import annotations

import collections
import datetime
import errno
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import traceback
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


# --- bf16 serving on CPU --------------------------------------------------------------------------

# XLA's CPU backend multiplies bf16 in float32 and converts each weight first. With these two defaults
# every weight lives in float32 at once (26 GB for the full model on top of its 8.7 GB): the
# concurrency-optimised scheduler runs all the independent conversions up front, and loop-invariant code
# motion lifts them out of the decoding loop. Off, each conversion lives only for its matmul; decoding
# then converts the LLM's weights at every step, which costs time, not memory (docs/full_size.md).
CPU_BF16_SERVING_FLAGS = {
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
}
# The modules whose commands serve a model and so get CPU_BF16_SERVING_FLAGS on CPU.
SERVING_COMMANDS = ("med2e3_jax.cli.generate", "med2e3_jax.cli.evaluate", "med2e3_jax.cli.serve")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def runs_on_cpu_only() -> bool:
    """Whether JAX will find no accelerator: JAX_PLATFORMS names only cpu, or no accelerator plugin is
    installed (decided without starting a backend)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def set_cpu_serving_flags() -> list[str]:
    """Appends `CPU_BF16_SERVING_FLAGS` to XLA_FLAGS where it is safe: JAX runs on CPU only (one of them,
    `xla_disable_hlo_passes`, would reach an accelerator's compiler too), no backend has started yet
    (XLA reads its flags once, when the first starts), and XLA_FLAGS does not set that flag already
    (the user's value wins). Returns the flags added."""
    if not runs_on_cpu_only():
        return []
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        logging.warning("the JAX backend started before the command could set XLA_FLAGS for bf16 on CPU (%s); "
                        "a bf16 model may need up to 3x its size", CPU_BF16_SERVING_FLAGS)
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_BF16_SERVING_FLAGS.items() if f"--{name}=" not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


# --- one line per failure --------------------------------------------------------------------------

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def failure_summary(error: BaseException) -> str:
    """One line saying what failed: the exception's own message (ours name the file, key or value), the
    root cause's first line where the outer message does not contain it, and 'the disk is full' where
    any exception of the chain says so."""
    chain = _chain(error)
    text = _one_line(str(error)) or type(error).__name__
    summary = f"{type(error).__name__}: {text}" if not text.startswith(type(error).__name__) else text
    root = chain[-1]
    root_text = (str(root).strip().splitlines() or [type(root).__name__])[0].strip()
    if root is not error and root_text and root_text not in text:
        summary += f" (caused by {type(root).__name__}: {root_text})"
    full = next((e for e in chain if (isinstance(e, OSError) and e.errno in _DISK_FULL)
                 or any(t in str(e) for t in _DISK_FULL_TEXT)), None)
    if full is not None:
        where = f" writing {full.filename}" if isinstance(full, OSError) and full.filename else ""
        summary = f"the disk is full{where}: {summary}"
    return summary


class _TraceKeeper(logging.Filter):
    """Keeps what would print a traceback on stderr for the trace file instead: log records' exception
    info (the record still prints, its message only) and unraisable and thread exceptions."""

    def __init__(self):
        super().__init__()
        self.kept: collections.deque[str] = collections.deque(maxlen=2000)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            trace = record.exc_text or "".join(traceback.format_exception(*record.exc_info))
            self.kept.append(f"{record.levelname} {record.name}: {record.getMessage()}\n{trace}")
            record.exc_info, record.exc_text = None, None
        return True

    def unraisable(self, unraisable) -> None:
        trace = "".join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
        self.kept.append(f"unraisable exception ({unraisable.err_msg or 'ignored'} {unraisable.object!r}):\n{trace}")

    def thread_exception(self, args) -> None:
        trace = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        self.kept.append(f"exception in thread {getattr(args.thread, 'name', '?')}:\n{trace}")
        if args.exc_type is not SystemExit:
            logging.warning("thread %s failed: %s", getattr(args.thread, "name", "?"),
                            _one_line(str(args.exc_value)) or args.exc_type.__name__)


def _write_trace(command: str, keeper: _TraceKeeper, error: BaseException) -> str | None:
    """The trace file of a failure: what `keeper` kept, then the failure's traceback; None if it
    cannot be written (the disk that is full may be this one)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(tempfile.gettempdir(), f"{command}-{stamp}-{os.getpid()}.trace.txt")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{' '.join(sys.argv)}\n\n")
            for text in keeper.kept:
                f.write(text + "\n")
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return path


def _failing_in_one_line(main: Callable[[list[str]], None], command: str) -> Callable[[list[str]], None]:
    """`main`, where an exception ends the command in one line on stderr (see the module docstring)."""

    def run_main(argv):
        if flags.FLAGS.verbose:
            return main(argv)
        keeper = _TraceKeeper()
        for handler in logging.getLogger().handlers:
            handler.addFilter(keeper)
        sys.unraisablehook, threading.excepthook = keeper.unraisable, keeper.thread_exception
        try:
            return main(argv)
        except (SystemExit, KeyboardInterrupt, app.UsageError):
            raise
        except Exception as error:  # noqa: BLE001 - every failure of the command ends here, in one line
            path = _write_trace(command, keeper, error)
            where = f"full trace in {path}" if path else "the trace file could not be written"
            sys.stderr.write(f"{command}: error: {failure_summary(error)} ({where}; --verbose prints it)\n")
            sys.stderr.flush()
            # What the interpreter still reports on its way out (the threads of a failed save, futures
            # never awaited) belongs to the trace, not under the line.
            try:
                target = os.open(path or os.devnull, os.O_WRONLY | os.O_APPEND)
                os.dup2(target, 2)
            except OSError:
                pass
            sys.exit(1)

    return run_main


def run_command(module_name: str, define_flags: Callable[[flags.FlagValues], None],
                main: Callable[[list[str]], None], *, config_file_flag: str | None = None) -> None:
    """Defines the command's flags on absl's global FLAGS and runs `main` under `absl.app`: a failure
    ends in one line (`--verbose`: the whole traceback); a serving command on CPU gets
    `CPU_BF16_SERVING_FLAGS`."""
    # absl's --help prints the docstring of __main__, which for a console script is pip's wrapper.
    sys.modules["__main__"].__doc__ = sys.modules[module_name].__doc__
    known = set(flags.FLAGS)
    define_flags(flags.FLAGS)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "on failure, print the full traceback and every library's log of it "
                          "instead of one line (the trace file named on that line has them too)")
    # --help lists the key flags of sys.argv[0]'s module, and ours are defined in another.
    for name in set(flags.FLAGS) - known:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    if config_file_flag:
        try:
            sys.argv[:] = resolve_config_argv(sys.argv, config_file_flag)
        except app.UsageError as error:
            sys.exit(f"{os.path.basename(sys.argv[0])}: {error}")
    spec = getattr(sys.modules[module_name], "__spec__", None)  # `python -m` runs the module as __main__
    if (spec.name if spec else module_name) in SERVING_COMMANDS:
        set_cpu_serving_flags()
    app.run(_failing_in_one_line(main, os.path.basename(sys.argv[0]) or "med2e3"))
