"""Greedy decoding under `jit`: prefill the merged prompt into a KV cache, then one token per step.

Shapes are static: the cache holds prompt length + `max_new_tokens` slots, the loop is a `lax.scan`,
and rows that reached EOS keep emitting `pad_id`. Prompts of different lengths share a batch: each
row decodes from its own length (right padding), its tokens written at its own positions.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from med2e3_jax.models.med2e3 import Med2E3


@flax.struct.dataclass
class Generation:
    tokens: jax.Array  # (batch, max_new_tokens) int32, pad_id after EOS
    slice_scores: jax.Array  # (batch, slices)


def greedy_generate(model: Med2E3, volume, input_ids, attention_mask, question_ids=None, question_mask=None,
                    *, max_new_tokens: int, eos_id: int, pad_id: int) -> Generation:
    """Greedy continuation of expanded prompts (see `expand_image_placeholder`). Call under `nnx.jit`
    with `max_new_tokens`, `eos_id` and `pad_id` static."""
    batch, length = input_ids.shape
    vision = model.encode_vision(volume, question_ids, question_mask)
    embeds = model.embed_prompt(input_ids, attention_mask, vision.tokens)
    cache = model.llm.init_cache(batch, length + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    prefill = model.llm(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask, cache=cache)
    lengths = attention_mask.sum(axis=1).astype(jnp.int32)
    last_logits = jnp.take_along_axis(prefill.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)

    def step(carry, _):
        cache, token, position, done = carry
        out = model.llm(token[:, None], positions=position[:, None],
                        attention_mask=jnp.ones((batch, 1), jnp.int32), cache=cache)
        following = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
        done = done | (token == eos_id)
        following = jnp.where(done, pad_id, following)
        return (out.cache, following, position + 1, done), token

    carry = (prefill.cache, first, lengths, jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, carry, None, length=max_new_tokens)
    return Generation(tokens.T, vision.slice_scores)
