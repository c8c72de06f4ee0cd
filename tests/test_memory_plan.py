"""The memory plan: the trainer's step compiled from abstract inputs on a fake mesh, and the analytic
estimate beside it (med2e3_jax/memory.py, scripts/memory_plan.py)."""

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from batches_for_tests import small_config  # noqa: E402

from configs import med2e3_m3d, plans, tiny  # noqa: E402
from med2e3_jax import memory, sharding  # noqa: E402
from med2e3_jax.checkpoint.importer import param_counts  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def _counted(model_cfg) -> dict[str, int]:
    """Parameters per top-level submodule of the model itself (abstract: nothing allocated)."""
    return param_counts(nnx.eval_shape(lambda: Med2E3(model_cfg, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("ablation", [{}, {"vision_tokens": "3d"}, {"slice_weighting": "mean"}])
def test_analytic_parameter_counts_equal_the_models(ablation):
    model_cfg = tiny.tiny_model()
    model_cfg.tgis.update(ablation)
    model_cfg.llm.update(qkv_bias=True, fused_qkv=False, fused_gate_up=False)  # the Qwen2-style layout too
    assert memory.param_counts(model_cfg) == _counted(model_cfg)


def test_analytic_parameter_counts_of_the_released_model_match_the_published_models():
    counts = memory.param_counts(med2e3_m3d.get_config().model)
    assert counts["llm"] == 3_821_079_552  # Phi-3-mini-128k-instruct
    assert counts["question_encoder"] == 109_482_240  # bert-base-uncased
    assert round(counts["vision2d"] / 1e6) == 303  # siglip-large-patch16-256 vision tower without its head
    assert round(counts["vision3d"] / 1e5) == 874  # M3D-CLIP ViT-B


def test_estimate_splits_state_over_the_mesh_and_remat_keeps_less():
    config = plans.get_config("finetune_8xh100")
    one = memory.estimate(config, mesh_shape=dict(data=1, fsdp=1, tensor=1))
    eight = memory.estimate(config, mesh_shape=dict(data=1, fsdp=8, tensor=1))
    assert eight.parameters * 8 == pytest.approx(one.parameters, rel=1e-6)
    # float32 gradients and two float32 Adam moments of the 4.15B trained parameters.
    assert one.gradients == pytest.approx(4 * one.trainable_parameters, rel=1e-6)
    assert one.optimizer == 2 * one.gradients
    kept = {}
    for policy in ("none", "dots", "full"):
        config.model.remat_policy = policy
        kept[policy] = memory.estimate(config).activation_parts["vision2d"]
    assert kept["full"] < kept["dots"] < kept["none"]


def test_every_plan_is_sized_for_its_machine():
    for name, plan in plans.PLANS.items():
        config = plans.get_config(name)
        mesh = config.mesh
        assert config.hardware.devices == mesh.data * mesh.fsdp * mesh.tensor, name
        # The authors' batches, except on 128 chips, which cannot split pretraining's 64 rows.
        authors = {"pretrain": 64, "finetune": 128}[plan["stage"]]
        assert config.train.global_batch_size == (128 if name == "pretrain_v5p256" else authors), name
        rows = config.train.global_batch_size / config.train.micro_batches / (mesh.data * mesh.fsdp)
        assert rows == int(rows) >= 1, f"{name}: {rows} rows per device"
        for rate in ("peak_flops", "hbm_bandwidth", "link_bandwidth"):
            assert config.hardware[rate] > 0, (name, rate)
    assert plans.get_config("finetune_v5p32").hardware.devices == 16  # v5p-32 counts TensorCores
    assert plans.get_config("finetune_v5p256").hardware.devices == 128  # and v5p-256 too
    pod = plans.get_config("finetune_64xh100").hardware
    assert pod.devices == 64 and pod.devices_per_host == 8 and pod.host_link_bandwidth < pod.link_bandwidth
    with pytest.raises(ValueError, match="finetune_8xh100"):
        plans.get_config("finetune_8xa100")


@needs_8_devices
def test_fsdp_keeps_each_device_on_its_share_of_the_batch():
    """Under FSDP each device's temporaries are those of its share of the batch plus the gathered
    weights, not those of the whole batch: XLA gathers the weights rather than running layers on every
    row (sharding.constrain, the embeddings' rules). On 4 devices with 4 rows each, the step needs less
    beyond one device's 4-row step than half of what one device's 16-row step needs beyond it."""
    temporaries = {}
    for fsdp, rows in ((1, 4), (1, 16), (4, 16)):
        config = small_config("finetune")
        config.train.global_batch_size = rows
        config.mesh.update(data=1, fsdp=fsdp, tensor=1)
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:fsdp])
        temporaries[fsdp, rows] = memory.xla_memory(memory.lower_abstract_train_step(config, mesh).compile())[
            "temporaries"]
    share, whole = temporaries[1, 4], temporaries[1, 16]
    assert temporaries[4, 16] - share < 0.5 * (whole - share), temporaries


def test_memory_plan_script_compiles_the_step_on_a_fake_mesh(tmp_path):
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own device count
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "memory_plan.py"),
         f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}:finetune", "--devices=2", "--config.mesh.data=1",
         "--config.mesh.fsdp=2", "--config.train.micro_batches=2", f"--json_out={out}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "XLA's CPU compiler" in run.stdout and "XLA:CPU" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("RESULT total_gb=")
    result = json.loads(out.read_text())
    assert result["devices"] == 2 and result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    for key in ("arguments", "outputs", "temporaries", "total"):
        assert result["xla"][key] > 0, key
    # The counts the estimate starts from equal the model's own.
    counted = _counted(tiny.get_config().model)
    assert result["total_parameters"] == sum(counted.values())
    trainable = tiny.get_config().train.trainable
    assert result["trainable_parameters"] == sum(v for k, v in counted.items() if k in trainable)
    # The compiled step's matmuls against the model FLOPs counted from the config (flops.py): the same
    # work up to recomputation and the LM head's empty slots.
    step = result["step"]
    assert 0.8 < step["hlo_matmul_flops"] / step["model_flops"] < 1.5, step
    # FSDP gathers the weights and reduces the gradients (XLA:CPU may reduce by all-reduce or reduce-scatter).
    moved = step["collective_bytes"]
    assert moved["all-gather"] > 0 and moved["reduce-scatter"] + moved["all-reduce"] > 0, step
    assert "per device and step" in run.stdout
    # Each device holds about half of the float32 parameters and Adam state (FSDP over 2 devices).
    state_bytes = 4 * (result["total_parameters"] + 2 * result["trainable_parameters"])
    assert 0.4 * state_bytes < result["xla"]["arguments"] < 0.75 * state_bytes

    # The tables of `--all` again from its JSON, with and without a roofline: every row has the header's
    # columns, and the roofline's step time and MFU are printed.
    planned = dict(result, config="planned", device_kind="H100", device_memory=80e9)
    planned["step"] = dict(step, roofline=dict(compute_s=0.1, memory_s=0.3, network_s=0.2, network_between_hosts_s=0.0,
                                               step_s=0.3, bound="memory", mfu=0.25))
    tables = tmp_path / "plans.json"
    tables.write_text(json.dumps([result, planned]))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "memory_plan.py"), f"--tables_from={tables}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 * 4  # two tables: header, rule, two plans
    for table in (rows[:4], rows[4:]):
        assert {row.count("|") for row in table} == {table[0].count("|")}, table
    assert rows[-1].endswith("| **300** | 25% |"), rows[-1]
