"""A forward pass and a short greedy generation of the tiny Med-2E3 on a synthetic CT volume.

    python scripts/demo.py [--config configs/tiny.py] [--checkpoint ORBAX_DIR] [--new_tokens 8]

Random weights unless an Orbax checkpoint (from scripts/convert_checkpoint.py) is given; there is no
tokenizer yet, so the prompt and the answer are token ids. Prints the loss, where TG-IS looked and
the generated ids, with the time each step took.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from med2e3_jax import config as config_lib
from med2e3_jax.checkpoint.orbax_params import restore_params
from med2e3_jax.config import IGNORE_INDEX, IMAGE3D_TOKEN_ID
from med2e3_jax.generate import GenerationConfig, generate
from med2e3_jax.models.med2e3 import Med2E3
from med2e3_jax.models.merge import expand_image_placeholder

config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config (its `model` is used)", lock_config=False)
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (random init when absent)")
flags.DEFINE_integer("new_tokens", 8, "tokens to generate")
FLAGS = flags.FLAGS


def phantom(shape, rng):
    """A body ellipse in air with a bright lesion in the upper third of the slices, values in [0, 1]."""
    depth, height, width = shape
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = np.where((y / 0.8) ** 2 + (x / 0.9) ** 2 < 1, 0.5, 0.0)
    volume += np.where((z + 0.6) ** 2 + (y - 0.2) ** 2 + (x + 0.3) ** 2 < 0.05, 0.4, 0.0)
    volume += rng.normal(0, 0.02, shape)
    return np.clip(volume, 0, 1).astype(np.float32)[None, None]


def main(argv):
    del argv
    cfg = FLAGS.config.model
    if FLAGS.checkpoint:
        model = restore_params(FLAGS.checkpoint)
        cfg = model.cfg
    else:
        model = Med2E3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    volume = phantom(tuple(cfg.vision3d.img_size), rng)
    vocab = cfg.llm.vocab_size
    prompt = np.array([[cfg.llm.bos_token_id, *rng.integers(3, vocab, 6), IMAGE3D_TOKEN_ID, *rng.integers(3, vocab, 5)]])
    answer = rng.integers(3, vocab, 4)
    ids = np.concatenate([prompt, [answer]], axis=1)
    labels = np.where(np.arange(ids.shape[1]) >= prompt.shape[1], ids, IGNORE_INDEX)
    expanded = expand_image_placeholder(ids, np.ones_like(ids), labels, num_vision_tokens=config_lib.num_vision_tokens(cfg),
                                        max_length=cfg.llm_max_length, pad_id=cfg.llm.pad_token_id)
    question = np.array([[101, 2054, 2003, 1999, 1996, 3356, 102]])  # bert ids of a short question
    question_mask = np.ones_like(question)

    forward = nnx.jit(lambda m, *a: m(*a))
    start = time.perf_counter()
    out = forward(model, volume, expanded.input_ids, expanded.attention_mask, expanded.labels, question, question_mask)
    jax.block_until_ready(out.logits)
    print(f"forward (incl. compile): {time.perf_counter() - start:.1f}s  loss={float(out.loss):.4f}  "
          f"logits {tuple(out.logits.shape)}  devices {jax.devices()}")
    scores = np.asarray(out.slice_scores[0])
    top = np.argsort(scores)[::-1][:5]
    print("TG-IS: top slices", ", ".join(f"{i}:{scores[i]:.3f}" for i in top), f"(uniform {1 / scores.size:.3f})")

    prompt_only = expand_image_placeholder(prompt, np.ones_like(prompt), None,
                                           num_vision_tokens=config_lib.num_vision_tokens(cfg),
                                           max_length=cfg.llm_max_length, pad_id=cfg.llm.pad_token_id)
    config = GenerationConfig.for_llm(cfg.llm, max_new_tokens=FLAGS.new_tokens)
    start = time.perf_counter()
    generated = generate(model, jnp.asarray(volume), prompt_only.input_ids, prompt_only.attention_mask, question,
                         question_mask, config=config)
    tokens = np.asarray(generated.tokens[0])
    print(f"greedy generation of {FLAGS.new_tokens} tokens (incl. compile): {time.perf_counter() - start:.1f}s  "
          f"ids {tokens.tolist()}")


if __name__ == "__main__":
    app.run(main)
