"""Med-2E3 in JAX / Flax NNX."""

__version__ = "0.1.0"
