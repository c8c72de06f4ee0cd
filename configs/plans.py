"""Sharding plans: the released Med-2E3-M3D trained at the authors' batch sizes on five machines.

    --config configs/plans.py:finetune_8xh100     (every name of `PLANS`: *_8xh100, *_8xh200, *_v5p32,
                                                   *_v5p256, *_64xh100, finetune_8xh100_tp)

A plan is a name for a set of config overrides (`PLANS`): the stage of `configs/med2e3_m3d.py`
(pretrain: global batch 64; finetune: 128), the machine (`HARDWARE`, which also picks the attention
implementation), and dotted config paths with their values, the paths the command line takes as
`--config.<path>=<value>`: the mesh, the gradient-accumulation micro-batches, the remat policy and,
for a layout other than the default, sharding rules. A new plan is a new entry; the command line
overrides any of its values in turn. The config records the machine in a `hardware` section.
`scripts/memory_plan.py` compiles the real training step of a plan on a fake mesh of that many
devices and prints its memory per device, FLOPs, collective traffic and roofline (docs/sharding.md).

The machines (vendor figures, decimal GB):
  - 8xh100: 8 NVIDIA H100 SXM, 80 GB HBM3 each;
  - 8xh200: 8 NVIDIA H200 SXM, 141 GB HBM3e each;
  - v5p32:  a TPU v5p-32 slice. Google counts v5p slices in TensorCores, two per chip: v5p-32 is 16
    chips (topology 2x2x4) with 95 GB HBM2e each, and JAX sees 16 devices (one per chip, megacore);
  - v5p256: a TPU v5p-256 slice, 128 chips, 128 devices;
  - 64xh100: 8 hosts of 8 H100 SXM, NVLink within a host and InfiniBand between hosts.

The pod-scale plans: pretrain, which keeps no optimizer state beyond the connectors', replicates the
model and splits the batch only (`mesh.data` = device count); finetune on v5p-256 is FSDP over all 128
chips, on 64 x H100 FSDP within a host and data parallelism across the 8 hosts, so that the weight
gathers stay on NVLink.

The `*_8xh100`, `*_8xh200` and `*_v5p32` plans use FSDP over every device (`mesh.fsdp` = device
count) with the default rules: parameters, gradients and AdamW state are split 8 or 16 ways, so that
the float32 master weights and moments of the 4.15B finetuned parameters (about 50 GB) take about
6 GB per GPU. The batch is split over the same axis. Compute is bfloat16 (`model.dtype`) over float32
weights. In finetune the LLM and SigLIP layers keep only their inputs for the backward pass
(`remat_policy='full'`), because SigLIP trains on every one of the 32 slices of a volume (8192 tokens
per sample). Pretrain trains the connectors only: SigLIP runs forward, and the backward pass goes
through the LLM alone, whose activations fit without remat. GPU plans ask for cuDNN attention
(`cudnn`), which falls back to XLA's where cuDNN declines a shape.

`finetune_8xh100_tp` is a different layout written as config only (`LLM_TENSOR_PARALLEL`): the LLM
splits its heads, MLP units and vocabulary over a tensor axis of 2 and its weights over fsdp = 4,
while the encoders take no tensor parallelism: their weights are FSDP-split over all 8 devices and
their rows (SigLIP's: the 32 slices of every volume, folded into the batch) over all 8 too, so that
no device idles or repeats work in the encoders, and SigLIP's unsplit heads stay within cuDNN's reach.
"""

from __future__ import annotations

import ml_collections

from med2e3_jax.configs import med2e3_m3d
from med2e3_jax.train_config import apply_overrides

# Peak rates per device, vendor figures in decimal units. Link bandwidths are per direction, the bytes
# a device can send per second (a ring collective sends and receives at once):
#   H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s in total = 450 GB/s each way
#     (https://www.nvidia.com/en-us/data-center/h100/; the same figures, from NVIDIA's Hopper
#     material, in https://glennklockwood.com/garden/processors/h100).
#   H200 SXM: the H100's compute and NVLink, 4.8 TB/s HBM3e (https://www.nvidia.com/en-us/data-center/h200/;
#     NVLink as in MLCommons' H200 system description, "18x 4th Gen NVLink, 900GB/s", https://raw.
#     githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json).
#   Between H100 hosts: one 400 Gb/s InfiniBand NIC per GPU (the HGX/DGX H100 compute fabric) = 50 GB/s each way.
#   TPU v5p: 459 TFLOP/s bf16, 2765 GB/s HBM2e, ICI 1200 GB/s per chip bidirectional = 600 GB/s each
#     way, which the page's older version gives as 4800 Gbps (https://cloud.google.com/tpu/docs/v5p-training).
HARDWARE = {
    "8xh100": dict(devices=8, platform="gpu", device_kind="NVIDIA H100 80GB HBM3", memory_bytes=80e9,
                   attention_impl="cudnn", peak_flops=989e12, hbm_bandwidth=3.35e12, link_bandwidth=450e9,
                   devices_per_host=8),
    "8xh200": dict(devices=8, platform="gpu", device_kind="NVIDIA H200", memory_bytes=141e9, attention_impl="cudnn",
                   peak_flops=989e12, hbm_bandwidth=4.8e12, link_bandwidth=450e9, devices_per_host=8),
    # 16 chips: v5p-32 counts TensorCores. TPUs have no cuDNN: XLA's attention.
    "v5p32": dict(devices=16, platform="tpu", device_kind="TPU v5", memory_bytes=95e9, attention_impl="xla",
                  topology="v5p:2x2x4", peak_flops=459e12, hbm_bandwidth=2765e9, link_bandwidth=600e9),
    # 128 chips (v5p-256 counts TensorCores), topology 4x4x8.
    "v5p256": dict(devices=128, platform="tpu", device_kind="TPU v5", memory_bytes=95e9, attention_impl="xla",
                   topology="v5p:4x4x8", peak_flops=459e12, hbm_bandwidth=2765e9, link_bandwidth=600e9),
    # 8 hosts of 8 H100 SXM: NVLink inside a host, InfiniBand between hosts.
    "64xh100": dict(devices=64, platform="gpu", device_kind="NVIDIA H100 80GB HBM3", memory_bytes=80e9,
                    attention_impl="cudnn", peak_flops=989e12, hbm_bandwidth=3.35e12, link_bandwidth=450e9,
                    host_link_bandwidth=50e9, devices_per_host=8),
}


def mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> dict:
    """The mesh overrides of a plan (every axis given, so that no -1 default is left to resolve)."""
    return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}


# Tensor parallelism for the LLM only: the default rules already split the LLM's heads, MLP units and
# vocabulary over `tensor`; these rules take the encoders off it and spread them over every device.
LLM_TENSOR_PARALLEL = {
    "sharding.logical_axis_rules.encoder_batch": ("data", "fsdp", "tensor"),
    "sharding.logical_axis_rules.encoder_embed": ("fsdp", "tensor"),
    "sharding.logical_axis_rules.encoder_heads": (),
    "sharding.logical_axis_rules.encoder_mlp": (),
}

# plan -> {"stage": ..., "hardware": ..., dotted config path: value, ...}. The global batch is the
# stage's (64 / 128); micro-batch rows per device = global / micro_batches / (data * fsdp).
PLANS = {
    "pretrain_8xh100": {"stage": "pretrain", "hardware": "8xh100", **mesh(fsdp=8), "train.micro_batches": 2,
                        "model.remat_policy": "none"},
    "pretrain_8xh200": {"stage": "pretrain", "hardware": "8xh200", **mesh(fsdp=8), "train.micro_batches": 1,
                        "model.remat_policy": "none"},
    "pretrain_v5p32": {"stage": "pretrain", "hardware": "v5p32", **mesh(fsdp=16), "train.micro_batches": 1,
                       "model.remat_policy": "none"},
    "finetune_8xh100": {"stage": "finetune", "hardware": "8xh100", **mesh(fsdp=8), "train.micro_batches": 8,
                        "model.remat_policy": "full"},
    "finetune_8xh200": {"stage": "finetune", "hardware": "8xh200", **mesh(fsdp=8), "train.micro_batches": 4,
                        "model.remat_policy": "full"},
    "finetune_v5p32": {"stage": "finetune", "hardware": "v5p32", **mesh(fsdp=16), "train.micro_batches": 4,
                       "model.remat_policy": "full"},
    "finetune_8xh100_tp": {"stage": "finetune", "hardware": "8xh100", **mesh(fsdp=4, tensor=2),
                           "train.micro_batches": 8, "model.remat_policy": "full", **LLM_TENSOR_PARALLEL},
    "pretrain_v5p256": {"stage": "pretrain", "hardware": "v5p256", **mesh(data=128), "train.micro_batches": 1,
                        "model.remat_policy": "none", "train.global_batch_size": 128},
    "pretrain_64xh100": {"stage": "pretrain", "hardware": "64xh100", **mesh(data=64), "train.micro_batches": 1,
                         "model.remat_policy": "none"},
    "finetune_v5p256": {"stage": "finetune", "hardware": "v5p256", **mesh(fsdp=128), "train.micro_batches": 1,
                        "model.remat_policy": "full"},
    "finetune_64xh100": {"stage": "finetune", "hardware": "64xh100", **mesh(data=8, fsdp=8), "train.micro_batches": 1,
                         "model.remat_policy": "full"},
}
# pretrain_v5p256 doubles the authors' global batch of 64: 128 chips cannot split 64 rows.


def get_config(plan: str = "finetune_8xh100") -> ml_collections.ConfigDict:
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; configs/plans.py has {sorted(PLANS)}")
    overrides = dict(PLANS[plan])
    stage, hardware = overrides.pop("stage"), overrides.pop("hardware")
    if hardware not in HARDWARE:
        raise ValueError(f"configs/plans.py:{plan}: hardware {hardware!r} is not one of {sorted(HARDWARE)}")
    machine = HARDWARE[hardware]
    config = med2e3_m3d.get_config(stage)
    config.model.attention_impl = machine["attention_impl"]
    apply_overrides(config, overrides, where=f"configs/plans.py:{plan}")
    config.hardware = ml_collections.ConfigDict(dict(plan=plan, name=hardware, **machine))
    return config
