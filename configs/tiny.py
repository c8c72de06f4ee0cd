"""A CPU-sized Med-2E3 with the released architecture: for tests, the demo and quick experiments.

    --config configs/tiny.py:pretrain | configs/tiny.py:finetune (default) | configs/tiny.py:finetune,minilm
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


def get_config(options="finetune"):
    """The tiny model as the quick start trains it, from scratch on the phantom set, in minutes on a CPU.

    options: the stage (`pretrain` | `finetune`), then optionally `,minilm`: TG-IS reads the question with
    the real pretrained all-MiniLM-L6-v2 (fetched by scripts/fetch_assets.py) instead of the tiny random
    BERT; frozen in both stages, like M3D-CLIP's BERT in the released model, and 6 layers of width 384
    instead of one of 64, so a step costs a little more.
    """
    stage, *extras = options.split(",")
    unknown = set(extras) - {"minilm"}
    if unknown:
        raise ValueError(f"configs/tiny.py: unknown option(s) {sorted(unknown)} in {options!r}; "
                         "expected STAGE or STAGE,minilm")
    config = experiment_config(tiny_model(), stage)
    model = config.model
    # From scratch, the LLM has to learn the phantoms' reports and answers within the quick start: width
    # 128 learns them where 64 stalls (two layers learn as fast as four here).
    model.llm.update(hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=8)
    if "minilm" in extras:
        model.question_encoder.update(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                                      max_position_embeddings=512)
        config.train.components.question_encoder = os.path.join(cache_dir(), "minilm")
    # The real vocabularies: Phi-3's for the prompt (the tiny LLM keeps its 32064-entry vocabulary) and
    # MiniLM's uncased BERT one for the TG-IS question.
    config.data.tokenizer_path = os.path.join(cache_dir(), "tokenizers", "phi3")
    config.data.question_tokenizer_path = os.path.join(cache_dir(), "minilm")
    config.data.question_max_length = 32
    config.data.num_epochs = 1000  # the steps end the run
    config.train.update(global_batch_size=16, micro_batches=1, learning_rate=3e-3, log_every=50,
                        checkpoint_every=500)
    # scripts/quickstart.sh: both stages in minutes on 2 CPU cores (docs/quickstart.md).
    config.train.steps = 100 if stage == "pretrain" else 1200
    if stage in ("finetune", "finetune_lora"):
        # VQA answers take about 8 tokens a row: 16 LM-head slots a row instead of a quarter of the 128
        # positions halve the head's work; a batch with more targets runs the rest in the step's
        # overflow chunks (models/lm_loss.py).
        config.train.head_slots_per_row = 16
    return config
