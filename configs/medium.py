"""A 1.06B-parameter Med-2E3 for checking an accelerator in minutes (`scripts/device_check.sh`).

    --config configs/medium.py            (finetune: LLM, SigLIP and connectors train)

The released encoders at full size (M3D-CLIP ViT-B 87M, SigLIP-L/16-256 303M, BERT-base 109M) on the
released 32x256x256 volume and 768-token prompt, and a Phi-3-family LLM of half the width and layers
(hidden 1536, 16 layers, 16 heads of 96 like Phi-3-mini, so that its LongRoPE factors apply; 551M),
bf16 compute over float32 weights, cuDNN attention where it accepts the call, remat 'full', global
batch 4 (a multiple of the device count is taken on more devices: scripts/device_check.py), which
fits one 80 GB device by both of `scripts/memory_plan.py --config configs/medium.py --devices 1`'s
figures, where batch 8 would come too close to an H200's 141 GB.
"""

from med2e3_jax.configs import med2e3_m3d


def get_config(stage="finetune"):
    config = med2e3_m3d.get_config(stage)
    config.model.llm.update(hidden_size=1536, intermediate_size=4096, num_layers=16, num_heads=16, num_kv_heads=16)
    config.model.update(attention_impl="cudnn", remat_policy="full")
    config.train.update(global_batch_size=4, micro_batches=1, steps=100, warmup_ratio=0.0)
    return config
