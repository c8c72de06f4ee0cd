"""M3D-CLIP's 3D ViT: the frozen 3D encoder of Med-2E3.

The network is monai 1.3's `ViT` as M3D-CLIP configures it (`pos_embed="perceptron"`,
`classification=True`, no dropout):

  volume (batch, channels, depth, height, width)
    -> cut into (pd, ph, pw) patches, each flattened as (pz, py, px, channel), depth-outermost grid
    -> Linear -> + position embeddings -> prepend CLS (the CLS token gets no position embedding)
    -> pre-norm transformer blocks.

Med-2E3 reads the output of the last block *before* the final `norm` and drops the CLS token, so
the final `norm` is not modelled here (the port table lists it as deliberately unused).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from med2e3_jax.models.attention import ENCODER_AXES, dot_product_attention
from med2e3_jax.models.encoder_layers import encoder_linear, layer_norm
from med2e3_jax.sharding import param_axes


@struct.dataclass
class ViT3DOutput:
    """What the 3D ViT computes.

    Attributes:
      patch_embed: (batch, patches, embed) patch tokens after the position embeddings, before the CLS.
      hidden_states: one (batch, 1 + patches, embed) array per block, the CLS token at index 0.
    """

    patch_embed: jax.Array
    hidden_states: tuple[jax.Array, ...]

    @property
    def patch_features(self) -> jax.Array:
        """(batch, patches, embed): the last block's output without the CLS, what Med-2E3 uses."""
        return self.hidden_states[-1][:, 1:]


def patchify(volume: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """einops `b c (gz pz) (gy py) (gx px) -> b (gz gy gx) (pz py px c)`.

    Args:
      volume: (batch, channels, depth, height, width).
      patch_size: (pd, ph, pw).

    Returns:
      (batch, gz * gy * gx, pd * ph * pw * channels), the grid depth-outermost.
    """
    batch, channels, depth, height, width = volume.shape
    pd, ph, pw = patch_size
    gz, gy, gx = depth // pd, height // ph, width // pw
    patches = volume.reshape(batch, channels, gz, pd, gy, ph, gx, pw)
    patches = patches.transpose(0, 2, 4, 6, 3, 5, 7, 1)
    return patches.reshape(batch, gz * gy * gx, pd * ph * pw * channels)


class Attention(nnx.Module):
    """monai `SABlock`: a bias-free fused qkv whose outputs are laid out (qkv, head, head_dim)."""

    def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.attention_impl = attention_impl
        self.qkv = encoder_linear(cfg.hidden_size, 3 * cfg.hidden_size, ("encoder_embed", "encoder_heads"),
                                  use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = encoder_linear(cfg.hidden_size, cfg.hidden_size, ("encoder_heads", "encoder_embed"),
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        """(batch, tokens, embed) -> (batch, tokens, embed); every token attends to every token."""
        batch, tokens, embed = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(query, key, value, mask=None, implementation=self.attention_impl,
                                    axes=ENCODER_AXES)
        return self.out_proj(out.reshape(batch, tokens, embed))


class MLP(nnx.Module):
    """monai `MLPBlock`: Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.linear1 = encoder_linear(cfg.hidden_size, cfg.mlp_dim, ("encoder_embed", "encoder_mlp"),
                                      bias_axis="encoder_mlp", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear2 = encoder_linear(cfg.mlp_dim, cfg.hidden_size, ("encoder_mlp", "encoder_embed"),
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear2(jax.nn.gelu(self.linear1(x), approximate=False))


class Block(nnx.Module):
    """monai `TransformerBlock`, pre-norm."""

    def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla"):
        def norm():
            return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.norm1 = norm()
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        self.norm2 = norm()
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nnx.Module):
    """The 3D ViT; config fields: in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers,
    num_heads, layer_norm_eps."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
    ):
        self.in_channels = int(cfg.in_channels)
        self.img_size = tuple(int(s) for s in cfg.img_size)
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        if len(self.img_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(
                f"vision3d img_size and patch_size must be (depth, height, width), "
                f"got {self.img_size} and {self.patch_size}"
            )
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f"vision3d img_size {self.img_size} must be divisible by patch_size {self.patch_size}"
            )
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"vision3d hidden_size ({cfg.hidden_size}) must be a multiple of num_heads ({cfg.num_heads})"
            )
        self.dtype = dtype
        num_patches = math.prod(self.grid)
        patch_dim = self.in_channels * math.prod(self.patch_size)

        # Patch and position embeddings and the CLS token feed the residual stream: kept whole (sharding.py).
        self.patch_embedding = encoder_linear(patch_dim, cfg.hidden_size, (None, None), dtype=dtype,
                                              param_dtype=param_dtype, rngs=rngs)
        # monai's init (position embeddings ~ truncated normal 0.02, CLS zeros); the encoder is frozen and
        # always loaded from M3D-CLIP, so the init only matters for random smoke tests.
        init = jax.nn.initializers.truncated_normal(0.02)
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, num_patches, cfg.hidden_size), param_dtype), **param_axes(None, None, None)
        )
        self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.hidden_size), param_dtype), **param_axes(None, None, None))
        self.blocks = nnx.List(
            [
                Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
                for _ in range(cfg.num_layers)
            ]
        )

    @property
    def grid(self) -> tuple[int, int, int]:
        """(depth, height, width) of the patch grid; tokens are flattened depth-outermost."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))

    def __call__(self, volume: jax.Array) -> ViT3DOutput:
        """volume (batch, channels, depth, height, width) -> ViT3DOutput."""
        expected = (self.in_channels, *self.img_size)
        if volume.ndim != 5 or tuple(volume.shape[1:]) != expected:
            raise ValueError(
                f"ViT3D expects a volume of shape (batch, {', '.join(map(str, expected))}) "
                f"= (batch, channels, depth, height, width), got {tuple(volume.shape)}"
            )
        patches = patchify(volume.astype(self.dtype), self.patch_size)
        patch_embed = self.patch_embedding(patches) + self.position_embeddings.get_value().astype(self.dtype)
        cls = jnp.broadcast_to(
            self.cls_token.get_value().astype(self.dtype), (patch_embed.shape[0], 1, patch_embed.shape[2])
        )
        x = jnp.concatenate([cls, patch_embed], axis=1)
        hidden_states = []
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x)
        return ViT3DOutput(patch_embed=patch_embed, hidden_states=tuple(hidden_states))
