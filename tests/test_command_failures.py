"""A failed med2e3-* command ends in one line naming what is wrong, with the full trace kept in a file
(or printed with --verbose); the serving commands set the XLA flags a bf16 model needs on CPU."""

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from assets_for_tests import PUBLIC_FIXTURE

REPO = os.path.join(os.path.dirname(__file__), "..")
CONFIG = f"--reference_config={PUBLIC_FIXTURE}/config.json"
WEIGHTS = PUBLIC_FIXTURE / "model.safetensors"


def _command(name, *args, cwd, preexec_fn=None, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", f"med2e3_jax.cli.{name}", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env, preexec_fn=preexec_fn)


def _last_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _trace_file(line):
    found = re.search(r"full trace in (\S+);", line)
    return found.group(1) if found else None


def _assert_one_line_failure(result, *expected):
    line = _last_line(result)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"^\S+: error: ", line), line
    for text in expected:
        assert re.search(text, line), (text, line)
    trace = _trace_file(line)
    if trace is not None:
        with open(trace, encoding="utf-8") as f:
            assert "Traceback" in f.read()
        os.remove(trace)
    return line


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_convert_of_a_broken_checkpoint_ends_in_one_line_naming_the_file(tmp_path, damage):
    if damage == "truncated":
        broken = tmp_path / "model.safetensors"
        broken.write_bytes(WEIGHTS.read_bytes()[:100_000])
        expected = (r"CorruptCheckpointError: .*model\.safetensors",)
    else:
        torch = pytest.importorskip("torch")
        broken = tmp_path / "pytorch_model.bin"
        torch.save({"w": torch.ones(2), "x": _Call(os.system, "true")}, broken)
        expected = (r"UnsafeCheckpointError: .*pytorch_model\.bin: refused",)
    result = _command("convert", CONFIG, f"--checkpoint={broken}", f"--out={tmp_path}/orbax", cwd=tmp_path)
    line = _assert_one_line_failure(result, *expected)
    assert "weights_only" not in result.stderr and _trace_file(line) is not None


class _Call:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def test_verbose_prints_the_full_trace(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 3)
    result = _command("convert", CONFIG, f"--checkpoint={broken}", f"--out={tmp_path}/orbax", "--verbose",
                      cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "CorruptCheckpointError" in result.stderr


@pytest.fixture(scope="module")
def orbax_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "orbax"
    result = _command("convert", CONFIG, f"--checkpoint={WEIGHTS}", f"--out={out}", cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_damaged_orbax_chunk_is_one_line_not_the_readers_cascade(orbax_model, tmp_path):
    copy = tmp_path / "orbax"
    shutil.copytree(orbax_model, copy)
    chunk = copy / "params" / "llm.layers.0.self_attn.o_proj.kernel.value" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    result = _command("convert", f"--orbax={copy}", f"--out={tmp_path}/back.safetensors", cwd=tmp_path)
    _assert_one_line_failure(result, r"CorruptCheckpointError: .*o_proj\.kernel\.value/0\.0")
    assert "Event loop is closed" not in result.stderr


def _file_size_limit(limit):
    def apply():
        # Past RLIMIT_FSIZE a write fails with EFBIG, as on a full disk, instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _tmpfs(path, size):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return mounted.returncode == 0


@pytest.mark.parametrize("disk", ["file size limit", "small tmpfs"])
def test_a_full_disk_during_a_save_is_one_line(tmp_path, disk):
    out, preexec = tmp_path / "out", None
    if disk == "small tmpfs":
        if not _tmpfs(out, "300k"):
            pytest.skip("cannot mount a tmpfs here")
    else:
        preexec = _file_size_limit(200_000)
    try:
        result = _command("convert", CONFIG, f"--checkpoint={WEIGHTS}", f"--out={out}/orbax", cwd=tmp_path,
                          preexec_fn=preexec)
    finally:
        if disk == "small tmpfs":
            subprocess.run(["umount", str(out)], check=False)
    line = _assert_one_line_failure(result, r"error: the disk is full")
    assert "orbax" in line and len(result.stderr.splitlines()) < 60, result.stderr[-3000:]


def test_a_config_value_that_cannot_work_is_one_line_before_any_work(tmp_path):
    result = _command("train", "--config=tiny:finetune", "--config.train.checkpoint_every=0",
                      f"--workdir={tmp_path}/run", cwd=tmp_path)
    _assert_one_line_failure(result, r"ConfigError: train\.checkpoint_every=0: expected an integer >= 1")
    assert not (tmp_path / "run").exists()


_SERVING_PROBE = textwrap.dedent(
    """
    import os, sys
    from med2e3_jax import cli

    def main(argv):
        import jax, jax.numpy as jnp
        weight = jnp.ones((64, 64), jnp.bfloat16)
        def decode(weight, x):
            return jax.lax.fori_loop(0, 4, lambda i, x: jnp.tanh(x @ weight.astype(jnp.float32)), x)
        hlo = jax.jit(decode).lower(weight, jnp.ones((2, 64), jnp.float32)).compile().as_text()
        # With loop-invariant code motion the f32 copy of the weight is made once, before the loop, and
        # the loop carries it; without, the loop carries the bf16 weight and converts it for each step.
        carried = [line for line in hlo.splitlines() if " while(" in line][0]
        print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
        print("loop carries", "bf16" if "bf16[64,64]" in carried else "f32")

    module = sys.argv.pop(1)
    __import__(module)
    cli.run_command(module, lambda flag_values: None, main)
    """)


@pytest.mark.parametrize("module, user_flags, carried", [
    ("med2e3_jax.cli.generate", "", "bf16"),
    ("med2e3_jax.cli.evaluate", "", "bf16"),
    ("med2e3_jax.cli.train", "", "f32"),
    ("med2e3_jax.cli.generate", "--xla_disable_hlo_passes=", "f32"),
])
def test_serving_commands_set_the_cpu_bf16_flags_themselves(tmp_path, module, user_flags, carried):
    env = dict(os.environ, XLA_FLAGS=user_flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SERVING_PROBE, module], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loop carries {carried}" in result.stdout, result.stdout
    flags_line = next(line for line in result.stdout.splitlines() if line.startswith("XLA_FLAGS="))
    if user_flags:
        assert user_flags in flags_line and "xla_disable_hlo_passes=while" not in flags_line


def test_preprocess_prints_the_file_it_writes(tmp_path):
    import numpy as np

    volume = np.random.default_rng(0).uniform(0, 1, (1, 8, 16, 16)).astype(np.float32)
    np.save(tmp_path / "in.npy", volume)
    result = _command("preprocess", f"--input={tmp_path}/in.npy", f"--output={tmp_path}/out/volume",
                      "--shape=8,16,16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = re.search(r"wrote (\S+):", result.stdout).group(1)
    assert os.path.isfile(written) and written == f"{tmp_path}/out/volume.npy"
