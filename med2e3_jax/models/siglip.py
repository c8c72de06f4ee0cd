"""SigLIP vision tower: the slice encoder of Med-2E3.

Every axial slice of the volume is encoded on its own as a 2D image (the caller folds slices into the
batch). Med-2E3 takes `hidden_states[-1]` of HF's `SiglipVisionModel`, i.e. the output of the last
encoder layer *before* `post_layernorm`, all tokens (SigLIP has no CLS token). `post_layernorm` and the
MAP head run in the authors' code but their results are discarded, so they are not modelled here; their
checkpoint tensors are listed as unused in `checkpoint/siglip_port.py`.

Attribute names follow HF (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...) so
that the port table reads as an identity on names.

Config (`vision2d`): image_size, patch_size, num_channels, hidden_size, intermediate_size, num_layers,
num_heads, layer_norm_eps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax import sharding
from med2e3_jax.models.encoder_layers import SelfAttention, encoder_linear, layer_norm
from med2e3_jax.models.remat import remat_layer
from med2e3_jax.sharding import param_axes


class SiglipPatchEmbedding(nnx.Module):
    """The weights of HF's patch convolution, `kernel` (patch, patch, channels, embed) and `bias`, under
    the names and with the init of `nnx.Conv`. `SiglipEmbeddings` applies them as a matmul on patches
    (the stride is the kernel's size), so no convolution module is kept that nothing would call."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        shape = (cfg.patch_size, cfg.patch_size, cfg.num_channels, cfg.hidden_size)
        # Patch and position embeddings feed the residual stream: kept whole (sharding.py).
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype),
                                **param_axes(None, None, None, None))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (cfg.hidden_size,), param_dtype),
                              **param_axes(None))


class SiglipEmbeddings(nnx.Module):
    """Non-overlapping patch projection + learned position embedding (one per patch, no CLS)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.image_size = cfg.image_size
        self.num_channels = cfg.num_channels
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.dtype = dtype
        self.patch_embedding = SiglipPatchEmbedding(cfg, rngs=rngs, param_dtype=param_dtype)
        self.position_embedding = nnx.Embed(
            self.num_patches, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_metadata=param_axes(None, None),
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """(batch, height, width, channels) -> (batch, tokens, embed), tokens row-major over the patch grid.

        `channels` is `cfg.num_channels`, or 1 for a grey image that stands for itself copied to every
        channel (as Med-2E3 feeds CT slices): the channels' sum is then taken on the kernel, which gives
        the replicated image's embedding without materialising the copies.
        """
        batch, height, width, channels = pixels.shape
        if (height, width) != (self.image_size, self.image_size) or channels not in (1, self.num_channels):
            # The checkpoint's position embedding is tied to one grid; HF's interpolation is not supported.
            raise ValueError(
                f"SigLIP expects images of {self.image_size}x{self.image_size}x{self.num_channels} "
                f"(cfg.image_size, cfg.num_channels; or 1 channel, copied), got {height}x{width}x{channels}"
            )
        # HF's convolution has its stride equal to its size: a reshape into patches and one matmul, which
        # XLA:CPU runs several times faster than the convolution (and its gradient) on slices this small.
        kernel = self.patch_embedding.kernel[...]  # (patch, patch, channels, embed)
        if channels != kernel.shape[2]:
            kernel = kernel.sum(axis=2, keepdims=True)
        patch, embed = kernel.shape[0], kernel.shape[-1]
        grid = height // patch
        patches = pixels.reshape(batch, grid, patch, grid, patch, channels).swapaxes(2, 3)
        patches = patches.reshape(batch, grid * grid, patch * patch * channels).astype(self.dtype)
        tokens = patches @ kernel.reshape(-1, embed).astype(self.dtype)
        tokens = tokens + self.patch_embedding.bias[...].astype(self.dtype)
        return tokens + self.position_embedding(jnp.arange(self.num_patches))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = encoder_linear(cfg.hidden_size, cfg.intermediate_size, ("encoder_embed", "encoder_mlp"),
                                  bias_axis="encoder_mlp", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = encoder_linear(cfg.intermediate_size, cfg.hidden_size, ("encoder_mlp", "encoder_embed"),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        # SigLIP is trained with `gelu_pytorch_tanh`, the tanh approximation.
        return self.fc2(jax.nn.gelu(self.fc1(hidden), approximate=True))


class SiglipEncoderLayer(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        def norm():
            return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.layer_norm1 = norm()
        self.self_attn = SelfAttention(
            cfg.hidden_size, cfg.num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
            attention_impl=attention_impl,
        )
        self.layer_norm2 = norm()
        self.mlp = SiglipMLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla",
                 remat_policy="none"):
        self.remat_policy = remat_policy  # see models/remat.py
        self.layers = nnx.List(
            [
                SiglipEncoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
                for _ in range(cfg.num_layers)
            ]
        )

    def __call__(self, hidden: jax.Array) -> jax.Array:
        call_layer = remat_layer(lambda layer, hidden: layer(hidden), self.remat_policy)
        for layer in self.layers:
            hidden = call_layer(layer, hidden)
        return hidden


class SiglipVisionTower(nnx.Module):
    """Images -> patch tokens of the last encoder layer (no `post_layernorm`, no pooling head)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla",
                 remat_policy="none"):
        self.embeddings = SiglipEmbeddings(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = SiglipEncoder(
            cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
            remat_policy=remat_policy,
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """(batch, height, width, channels) channels-last -> (batch, tokens, embed).

        `tokens` = (image_size / patch_size)**2, row-major over the patch grid like HF. Pixels are used as
        given: Med-2E3 feeds raw [0, 1] slices without SigLIP's mean/std normalisation. The images are
        split over `encoder_batch` from the start (the rules may split a volume's slices over more
        devices than its batch).
        """
        pixels = sharding.constrain(pixels, ("encoder_batch", None, None, None))
        return self.encoder(self.embeddings(pixels))
