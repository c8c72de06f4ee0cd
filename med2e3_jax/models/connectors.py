"""Connectors: encoder features -> LLM embedding width.

Med-2E3 uses one MLP connector shape for both branches (`mlp2x_gelu`), and for the 3D branch first
average-pools the ViT's patch grid (`spatial_pooling`), which shrinks the 3D tokens 8-fold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from med2e3_jax.sharding import param_axes


class MLPConnector(nnx.Module):
    """Linear(in, out) -> exact (erf) GELU -> Linear(out, out); torch `_connector.0`, `_connector.2`.

    `out` is the LLM's width, and its side is the one split (`embed`; the hidden width as `mlp`, since
    one mesh axis cannot split both dimensions of a kernel); the encoder's side is kept whole.
    """

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        def linear(n_in, axes):
            return nnx.Linear(n_in, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                              kernel_metadata=param_axes(*axes), bias_metadata=param_axes(None))

        self.linear_in = linear(in_dim, (None, "embed"))
        self.linear_out = linear(out_dim, ("mlp", "embed"))

    def __call__(self, features: jax.Array) -> jax.Array:
        """(..., in_dim) -> (..., out_dim)."""
        return self.linear_out(jax.nn.gelu(self.linear_in(features), approximate=False))


def spatial_avg_pool(tokens: jax.Array, grid: tuple[int, int, int], stride) -> jax.Array:
    """Average-pools patch tokens over their 3D grid, like `F.avg_pool3d(kernel_size=stride, stride=stride)`.

    Trailing grid cells that do not fill a whole window are dropped (floor), as torch does.

    Args:
      tokens: (batch, gz * gy * gx, embed), the grid flattened depth-outermost.
      grid: (gz, gy, gx), the patch grid (depth, height, width).
      stride: int or (sz, sy, sx); kernel and stride alike.

    Returns:
      (batch, (gz // sz) * (gy // sy) * (gx // sx), embed), depth-outermost.
    """
    gz, gy, gx = grid
    sz, sy, sx = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    batch, num_tokens, embed = tokens.shape
    if num_tokens != gz * gy * gx:
        raise ValueError(f"spatial_avg_pool: {num_tokens} tokens do not fill the grid {tuple(grid)}")
    if gz < sz or gy < sy or gx < sx:
        raise ValueError(f"spatial_avg_pool: grid {tuple(grid)} is smaller than the window {(sz, sy, sx)}")
    oz, oy, ox = gz // sz, gy // sy, gx // sx
    cube = tokens.reshape(batch, gz, gy, gx, embed)[:, : oz * sz, : oy * sy, : ox * sx]
    windows = cube.reshape(batch, oz, sz, oy, sy, ox, sx, embed)
    return windows.mean(axis=(2, 4, 6)).reshape(batch, oz * oy * ox, embed)
