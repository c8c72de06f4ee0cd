"""PyTorch checkpoint import / export and Orbax checkpoints."""
