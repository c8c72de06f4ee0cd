"""The installed commands (`med2e3-*`): one per module of med2e3_jax/cli, each with complete --help, bundled
configs by name, and a wheel that works without the checkout."""

import importlib
import importlib.util
from importlib import metadata
import pathlib
import shutil
import site
import subprocess
import sys
import venv

import pytest
from absl import app, flags

from med2e3_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = {  # console script -> module of med2e3_jax.cli, as setup.py declares them
    "med2e3-train": "train", "med2e3-generate": "generate", "med2e3-evaluate": "evaluate",
    "med2e3-convert": "convert", "med2e3-preprocess": "preprocess", "med2e3-phantoms": "phantoms",
    "med2e3-real-ct": "real_ct", "med2e3-annotations": "annotations", "med2e3-build-tfds": "build_tfds",
    "med2e3-fetch-assets": "fetch_assets", "med2e3-memory-plan": "memory_plan", "med2e3-device-check": "device_check",
    "med2e3-serve": "serve",
}


def test_the_installed_package_declares_one_command_per_cli_module():
    modules = {p.stem for p in (ROOT / "med2e3_jax" / "cli").glob("*.py") if p.stem != "__init__"}
    assert set(COMMANDS.values()) == modules
    installed = {e.name: e.value for e in metadata.entry_points(group="console_scripts") if e.name.startswith("med2e3-")}
    assert installed == {command: f"med2e3_jax.cli.{module}:run" for command, module in COMMANDS.items()}


@pytest.mark.parametrize("command, module_name", sorted(COMMANDS.items()))
def test_every_flag_has_help_and_the_docstring_shows_the_command(command, module_name):
    module = importlib.import_module(f"med2e3_jax.cli.{module_name}")
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    defined = [name for name in flag_values if not name.startswith("config.")]
    assert defined, f"{command} defines no flags"
    for name in defined:
        assert flag_values[name].help and len(flag_values[name].help) > 10, f"{command} --{name} has no help"
    assert command in module.__doc__, f"the docstring of {module.__name__} (its --help) shows no `{command}` usage"


def test_a_bundled_config_resolves_by_name_and_a_path_is_kept():
    path, _, args = cli.resolve_config("tiny:finetune,minilm").partition(":")
    assert pathlib.Path(path).samefile(ROOT / "configs" / "tiny.py") and args == "finetune,minilm"
    assert cli.resolve_config("configs/tiny.py:finetune") == "configs/tiny.py:finetune"
    assert cli.resolve_config_argv(["prog", "--config", "plans:finetune_8xh100", "--config.train.steps=3"]) == [
        "prog", "--config", f"{ROOT / 'configs' / 'plans.py'}:finetune_8xh100", "--config.train.steps=3"]
    with pytest.raises(app.UsageError, match=r"no bundled config of that name \(bundled: med2e3_m3d, medium, plans, tiny"):
        cli.resolve_config("tinyy:finetune")


@pytest.mark.parametrize("name, flag, value, message", [
    ("shape", "shape", ["8", "16"], "--shape takes three positive integers D,H,W, got '8,16'"),
    ("shape", "shape", ["8", "x", "16"], "got '8,x,16'"),
    ("window", "hu_window", ["100", "-100"], "--hu_window takes LOW,HIGH with LOW < HIGH, got '100,-100'"),
])
def test_list_flags_name_the_flag_and_the_value_at_fault(name, flag, value, message):
    parse = cli.shape_flag if name == "shape" else cli.window_flag
    with pytest.raises(app.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(flag, value)


def test_help_lists_the_commands_flags_and_usage(tmp_path):
    result = subprocess.run([sys.executable, "-m", "med2e3_jax.cli.train", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("Trains Med-2E3"), result.stderr  # absl exits 1 after --help
    assert "med2e3-train --config tiny:pretrain" in result.stdout
    assert "--workdir: checkpoints" in result.stdout and "--config: experiment config" in result.stdout


def test_an_unknown_config_name_is_a_usage_error_naming_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "med2e3_jax.cli.train", "--config=tiny_typo", "--workdir=w"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--config 'tiny_typo': no file 'tiny_typo' and no bundled config" in result.stderr


def test_the_installed_wheel_runs_its_commands_without_the_checkout(tmp_path):
    """`pip install .` into a fresh venv (the project built from a copy of the files a commit would hold,
    the dependencies on the path from this interpreter's site-packages), then its console scripts from
    another folder."""
    source = tmp_path / "source"
    listed = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]  # what a commit would hold
    tracked = subprocess.run(listed, cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    # The dependencies come from this interpreter's site-packages, added as plain paths: their .pth files
    # (among them this checkout's editable install) are not run, so the venv's copy is the only project.
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(venv_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # Build with this interpreter's setuptools where it has one (a Python 3.12 venv has none: pip then
    # builds in an isolated environment of its own).
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                              *isolation, "--ignore-installed", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    for command in COMMANDS:
        assert (bin_dir / command).is_file(), f"pip install . made no {command}"

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import med2e3_jax.cli as c; print(c.__file__); "
                            "print(c.resolve_config('tiny:finetune'))"], cwd=work, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    package_file, tiny = where.stdout.split()
    assert pathlib.Path(package_file).is_relative_to(env_dir), package_file
    assert pathlib.Path(tiny.partition(":")[0]).is_relative_to(env_dir) and tiny.endswith("/tiny.py:finetune")

    out = work / "phantoms"
    made = subprocess.run([str(bin_dir / "med2e3-phantoms"), f"--out={out}", "--num=2", "--shape=8,16,16",
                           "--format=npy"], cwd=work, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert "wrote 2 phantoms" in made.stdout
    assert len(list((out / "npy").glob("*.npy"))) == 2
    helped = subprocess.run([str(bin_dir / "med2e3-train"), "--help"], cwd=work, capture_output=True, text=True,
                            timeout=120)
    assert "--workdir: checkpoints" in helped.stdout, helped.stderr
