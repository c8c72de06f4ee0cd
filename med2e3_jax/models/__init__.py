"""Flax NNX modules: the 3D ViT, the slice encoder, the question encoder, the LLM, TG-IS and Med-2E3."""
