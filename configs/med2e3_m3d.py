"""The released Med-2E3-M3D (arXiv 2411.12783): 32x256x256 CT, 512 vision tokens, Phi-3-mini-128k."""

from med2e3_jax.config import model_config


def get_config():
    config = model_config()
    # Real inference and training run in bf16 with float32 master weights.
    config.dtype = "bfloat16"
    return config
