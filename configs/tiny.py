"""A CPU-sized Med-2E3 with the released architecture: for tests, the demo and quick experiments."""

from med2e3_jax.config import model_config


def get_config():
    config = model_config()
    config.vision3d.update(img_size=(32, 64, 64), hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    config.vision2d.update(image_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    config.question_encoder.update(
        vocab_size=30522, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
        max_position_embeddings=64,
    )
    config.llm.update(
        vocab_size=32064, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
        max_position_embeddings=8192,
    )
    config.llm.rope_scaling.update(
        short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
        long_factor=[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        original_max_position_embeddings=256,
    )
    config.llm_max_length = 128
    return config
