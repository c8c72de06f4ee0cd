import os

# Tests compare against float32 references: no reduced-precision matmuls anywhere.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
