"""Imports point one way: data_pipelines below the model package, benchmarks and scripts above both,
none of them reaching into tests/ or into each other."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stems(folder: str) -> set[str]:
    # Helpers in tests/, benchmarks/ and scripts/ are imported by bare name once their folder is on sys.path.
    return {path.stem for path in (ROOT / folder).glob("*.py")}


TESTS = {"tests"} | _stems("tests")
BENCHMARKS = {"benchmarks"} | _stems("benchmarks")
SCRIPTS = {"scripts"} | _stems("scripts")


def _imports(path: pathlib.Path):
    """(line, top-level module name) of every absolute import in the file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def _check(folder: str, forbidden_of) -> None:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        forbidden = forbidden_of(path)
        for line, name in _imports(path):
            if name in forbidden:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not found, "imports against the direction:\n" + "\n".join(found)


def test_data_pipelines_import_neither_the_model_package_nor_anything_above_it():
    forbidden = {"med2e3_jax", "configs"} | TESTS | BENCHMARKS | SCRIPTS
    _check("data_pipelines", lambda path: forbidden)


def test_the_package_imports_no_checkout_folder():
    forbidden = {"configs"} | TESTS | BENCHMARKS | SCRIPTS
    _check("med2e3_jax", lambda path: forbidden)


def test_benchmarks_import_no_test_helper_and_no_other_benchmark():
    _check("benchmarks", lambda path: TESTS | SCRIPTS | (BENCHMARKS - {path.stem}))


def test_scripts_import_no_test_helper_no_benchmark_and_no_other_script():
    _check("scripts", lambda path: TESTS | BENCHMARKS | (SCRIPTS - {path.stem}))


def test_importing_every_data_pipelines_module_loads_neither_the_model_package_nor_flax():
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "data_pipelines").rglob("*.py") if path.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('med2e3_jax', 'flax')))\n"
    )
    # A fresh interpreter: this one has imported the model package already.
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", f"importing {modules} loaded {run.stdout.strip()}"
