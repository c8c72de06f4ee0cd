"""The released Med-2E3-M3D (arXiv 2411.12783): 32x256x256 CT, 512 vision tokens, Phi-3-mini-128k.

    --config configs/med2e3_m3d.py:pretrain   (stage 1: connectors and text_mlp)
    --config configs/med2e3_m3d.py:finetune   (stage 2: LLM, SigLIP, connectors; the default)
"""

from med2e3_jax.config import model_config
from med2e3_jax.train_config import experiment_config


def get_config(stage="finetune"):
    model = model_config()
    # Real training and inference run in bf16 compute with float32 master weights.
    model.dtype = "bfloat16"
    return experiment_config(model, stage)
