"""Generation under `jit`: prefill the prompt into a KV cache, then decode one token per step.

    prompt embeddings ─ prefill ─ cache, logits of each row's last token
      └─ loop (lax.while_loop, static shapes) ─ pick: greedy | sampling | beam search ─ feed back ─ …

One decoding loop serves the whole model (`generate_tokens`: vision tokens merged into the prompt, the
TG-IS slice scores returned beside the tokens) and the bare LLM (`generate_text`: token ids or
`inputs_embeds`, for the comparison with transformers). `generate` is the host-side entry point: it jits,
runs, and decodes the texts when given a tokenizer.

Shapes are static: the cache holds prompt length + `max_new_tokens` slots and the output is
(batch, max_new_tokens), filled with `pad_id` after each row's EOS; the loop exits as soon as every row
(or, in beam search, every batch item) is finished. Prompts of different lengths share a batch: a token's
position is its index among the real tokens of its row (the cumulative attention mask, as transformers
derives it), so right- and left-padded prompts give the same result, and each row decodes from its own
length.

Semantics follow transformers' `generate` (5.x), so that token ids can be compared exactly:
  - greedy and sampling: a finished row emits `pad_id`; sampling applies temperature, then top-k, then
    top-p (transformers' warper order and tie rules) and draws from `jax.random.categorical` with a
    per-step key folded from the caller's key — reproducible for a fixed key, not transformers' stream;
  - beam search: transformers' vectorised beam search, step by step: 2·num_beams candidates (more with
    several EOS ids), finished hypotheses scored sum(log p) / generated_length ** length_penalty (EOS
    counted), the running beams the best unfinished candidates. `early_stopping`: True — a batch item
    stops once it holds num_beams finished hypotheses; False (default) — it stops when the best running
    beam, scored at its current length, can no longer beat the worst finished one; "never" — the same
    test but, with a positive length penalty, scored at the maximal length. `num_beams=1` is greedy, as in
    transformers. Beam sampling is not supported.
  - LongRoPE (Phi-3): the rotary regime of a call is chosen from the longest row. When decoding crosses
    `original_max_position_embeddings`, the cached keys were rotated with the short factors; like
    transformers' Phi-3 `prepare_inputs_for_generation`, that step recomputes the whole cache from the
    sequence so far with the long factors (one full forward, inside the loop, only when the static
    shapes allow the crossing at all). transformers tests the crossing on the length of `input_ids`,
    which with `inputs_embeds` counts the generated tokens only; here it is always the true length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from med2e3_jax.models.decoder import Decoder, KVCache
from med2e3_jax.models.med2e3 import Med2E3

NEG_INF = -1.0e9  # transformers' beam-search sentinel; finite, so that sums stay ordered


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode; hashable, so that it is a static argument of `jit`.

    Attributes:
      max_new_tokens: tokens generated per row at most (EOS included).
      eos_ids: the id(s) that end a row (an int is accepted); none: rows run to max_new_tokens.
      pad_id: written after a row's end.
      do_sample: draw tokens (needs a PRNG key) instead of taking the most likely one.
      temperature, top_k, top_p: sampling only; top_k = 0 and top_p = 1 disable them. top_k defaults to 50
        as in transformers' GenerationConfig.
      num_beams: > 1 for beam search (deterministic; not with do_sample).
      length_penalty: beam search: finished scores are sum(log p) / length ** length_penalty.
      early_stopping: beam search: True, False or "never" (see the module docstring).
    """

    max_new_tokens: int = 64
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        eos = self.eos_ids
        eos = () if eos is None else (int(eos),) if isinstance(eos, (int, np.integer)) else tuple(int(e) for e in eos)
        object.__setattr__(self, "eos_ids", eos)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    @classmethod
    def for_llm(cls, llm_cfg, **overrides) -> GenerationConfig:
        """EOS and pad ids from an `llm` sub-config (`eos_token_id`, `pad_token_id`), then `overrides`."""
        fields = dict(eos_ids=llm_cfg.get("eos_token_id"), pad_id=llm_cfg.get("pad_token_id") or 0)
        return cls(**{**fields, **overrides})


@flax.struct.dataclass
class Generation:
    """What `generate` returns, per row of the batch.

    tokens: (batch, max_new_tokens) int32, the generated ids, EOS included, pad_id after it.
    lengths: (batch,) int32, how many tokens were generated (EOS included).
    scores: (batch,) float32; beam search: transformers' `sequences_scores` (sum of log-probabilities /
      length ** length_penalty); greedy and sampling: the sum of the model's log-probabilities of the
      generated tokens (before any sampling warper).
    slice_scores: (batch, slices) TG-IS weights of the slices (None for the bare LLM).
    texts: the decoded answers (host side, when a tokenizer was given), EOS and special tokens dropped.
    """

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    slice_scores: jax.Array | None = None
    texts: tuple[str, ...] | None = flax.struct.field(pytree_node=False, default=None)


# ---------------------------------------------------------------------------------------------------
# Entry points.


def generate_tokens(model: Med2E3, volume, input_ids, attention_mask, question_ids=None, question_mask=None, *,
                    config: GenerationConfig, rng=None) -> Generation:
    """Continuations of expanded prompts (`expand_image_placeholder`); call under `nnx.jit` with `config`
    static.

    Args:
      volume: (batch, channels, slices, height, width).
      input_ids, attention_mask: (batch, length), IMAGE3D_TOKEN_ID at the vision positions.
      question_ids, question_mask: (batch, question_length), the TG-IS question.
      rng: a PRNG key, needed when `config.do_sample`.
    """
    vision = model.encode_vision(volume, question_ids, question_mask)
    embeds = model.embed_prompt(input_ids, attention_mask, vision.tokens)
    out = decode(model.llm, embeds, attention_mask, config=config, rng=rng)
    return out.replace(slice_scores=vision.slice_scores)


def generate_text(decoder: Decoder, input_ids=None, attention_mask=None, *, inputs_embeds=None,
                  config: GenerationConfig, rng=None) -> Generation:
    """Continuations from the bare LLM, of token ids (batch, length) or of `inputs_embeds`
    (batch, length, embed); `attention_mask` (batch, length), all ones when None."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    embeds = decoder.embed(input_ids) if inputs_embeds is None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(embeds.shape[:2], jnp.int32)
    return decode(decoder, embeds, attention_mask, config=config, rng=rng)


@functools.partial(nnx.jit, static_argnames=("config",))
def _generate_jit(model, volume, input_ids, attention_mask, question_ids, question_mask, config, rng):
    return generate_tokens(model, volume, input_ids, attention_mask, question_ids, question_mask,
                           config=config, rng=rng)


def generate(model: Med2E3, volume, input_ids, attention_mask, question_ids=None, question_mask=None, *,
             config: GenerationConfig | None = None, rng=None, tokenizer=None) -> Generation:
    """`generate_tokens` compiled (once per shape and config), its outputs as numpy arrays, and the texts
    when `tokenizer` (an HF tokenizer of the LLM) is given. `config` defaults to greedy decoding with the
    EOS and pad ids of the model's LLM config."""
    config = config or GenerationConfig.for_llm(model.cfg.llm)
    out = _generate_jit(model, volume, input_ids, attention_mask, question_ids, question_mask, config, rng)
    out = jax.tree.map(np.asarray, out)
    if tokenizer is not None:
        out = out.replace(texts=decode_texts(out.tokens, out.lengths, tokenizer, config.eos_ids))
    return out


def decode_texts(tokens, lengths, tokenizer, eos_ids: Sequence[int] = ()) -> tuple[str, ...]:
    """Host side: each row's first `length` tokens, without a final EOS, as text."""
    texts = []
    for row, length in zip(np.asarray(tokens), np.asarray(lengths)):
        ids = row[: int(length)].tolist()
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return tuple(texts)


# ---------------------------------------------------------------------------------------------------
# The loop shared by both entry points.


def decode(decoder: Decoder, prompt_embeds, attention_mask, *, config: GenerationConfig, rng=None) -> Generation:
    """Prefill `prompt_embeds` (batch, length, embed) under `attention_mask` (batch, length), then decode
    with the strategy `config` names: beam search when num_beams > 1, else greedy or sampling."""
    if config.num_beams > 1:
        return beam_search(decoder, prompt_embeds, attention_mask, config=config)
    return greedy_or_sample(decoder, prompt_embeds, attention_mask, config=config, rng=rng)


def greedy_or_sample(decoder: Decoder, prompt_embeds, attention_mask, *, config: GenerationConfig,
                     rng=None) -> Generation:
    """Greedy (or, with do_sample, sampled) decoding; stops when every row has emitted an EOS or after
    max_new_tokens."""
    if config.do_sample and rng is None:
        raise ValueError("sampling (do_sample=True) needs a PRNG key: pass rng=jax.random.key(seed)")
    prompt = _Prompt.of(decoder, prompt_embeds, attention_mask, config.max_new_tokens)
    logits, cache = prompt.prefill(decoder)
    return _sample_loop(decoder, prompt, logits, cache, config, rng)


def beam_search(decoder: Decoder, prompt_embeds, attention_mask, *, config: GenerationConfig) -> Generation:
    """Beam search with `config.num_beams` beams (one is allowed: with early_stopping=True it is greedy
    decoding); returns the best finished hypothesis of every row."""
    prompt = _Prompt.of(decoder, prompt_embeds, attention_mask, config.max_new_tokens)
    logits, cache = prompt.prefill(decoder)
    return _beam_search_loop(decoder, prompt, logits, cache, config)


@flax.struct.dataclass
class _Prompt:
    """The prompt as the loop needs it: embeddings, positions, and when to recompute the cache."""

    embeds: jax.Array  # (batch, length, embed)
    mask: jax.Array  # (batch, length) bool
    positions: jax.Array  # (batch, length) int32; 0 on padding
    lengths: jax.Array  # (batch,) int32 real tokens per row
    max_new_tokens: int = flax.struct.field(pytree_node=False)
    switch_length: int | None = flax.struct.field(pytree_node=False)  # LongRoPE, when reachable

    @classmethod
    def of(cls, decoder: Decoder, embeds, attention_mask, max_new_tokens: int) -> _Prompt:
        if attention_mask.shape != embeds.shape[:2]:
            raise ValueError(f"attention_mask {attention_mask.shape} must be (batch, length) = {embeds.shape[:2]}")
        mask = attention_mask > 0
        positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        length = embeds.shape[1]
        switch = decoder.rope.switch_length if decoder.rope.long_inv_freq is not None else None
        # The longest row reaches position length + max_new_tokens - 2 as the last token is fed.
        if switch is not None and length + max_new_tokens - 2 < switch:
            switch = None
        return cls(embeds, mask, positions, mask.sum(axis=1).astype(jnp.int32), max_new_tokens, switch)

    @property
    def cache_len(self) -> int:
        return self.embeds.shape[1] + self.max_new_tokens

    def prefill(self, decoder: Decoder):
        """Logits of each row's last real token (batch, vocab), and the cache holding the prompt."""
        cache = decoder.init_cache(self.embeds.shape[0], self.cache_len)
        out = decoder(inputs_embeds=self.embeds, positions=self.positions, attention_mask=self.mask, cache=cache)
        last = jnp.argmax(jnp.where(self.mask, self.positions, -1), axis=1)
        # Only the rows the loop reads go through the vocabulary projection; XLA drops the rest.
        return decoder.logits(jnp.take_along_axis(out.hidden_states, last[:, None, None], axis=1)[:, 0]), out.cache

    def step(self, decoder: Decoder, cache: KVCache, generated, k, copies: int = 1):
        """Logits for generated token k (k >= 1): feeds token k - 1 at each row's position.

        Args:
          generated: (batch * copies, max_new_tokens) ids so far (k of them valid).
          copies: rows per prompt row (beams), consecutive.
        """
        lengths = jnp.repeat(self.lengths, copies)
        positions = lengths + k - 1
        feed = jax.lax.dynamic_index_in_dim(generated, k - 1, axis=1, keepdims=False)

        def incremental(cache):
            out = decoder(feed[:, None], positions=positions[:, None],
                          attention_mask=jnp.ones((feed.shape[0], 1), jnp.int32), cache=cache)
            return out.logits[:, 0], out.cache

        if self.switch_length is None:
            return incremental(cache)
        crossing = jnp.max(self.lengths) + k - 1 == self.switch_length
        return jax.lax.cond(crossing, lambda c: self.recompute(decoder, generated, k, copies), incremental, cache)

    def recompute(self, decoder: Decoder, generated, k, copies: int):
        """Logits for token k and a fresh cache, from one forward over the prompt and generated[:, :k]."""
        rows = generated.shape[0]
        repeat = lambda x: jnp.repeat(x, copies, axis=0)  # noqa: E731
        steps = jnp.arange(self.max_new_tokens)
        written = jnp.broadcast_to(steps < k, generated.shape)
        embeds = jnp.concatenate([repeat(self.embeds), decoder.embed(generated).astype(self.embeds.dtype)], axis=1)
        positions = jnp.concatenate(
            [repeat(self.positions), jnp.where(written, repeat(self.lengths)[:, None] + steps, 0)], axis=1
        )
        mask = jnp.concatenate([repeat(self.mask), written], axis=1)
        out = decoder(inputs_embeds=embeds, positions=positions, attention_mask=mask,
                      cache=decoder.init_cache(rows, self.cache_len))
        last = self.embeds.shape[1] + k - 1
        return decoder.logits(jax.lax.dynamic_index_in_dim(out.hidden_states, last, axis=1, keepdims=False)), out.cache


def _is_eos(tokens, eos_ids):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


# ---------------------------------------------------------------------------------------------------
# Greedy and sampling.


def warp_logits(logits, config: GenerationConfig):
    """transformers' sampling warpers, in its order: temperature, top-k, top-p (float32 (..., vocab))."""
    logits = logits / jnp.float32(config.temperature)
    if 0 < config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        # Ascending sort; drop the low tail whose mass is <= 1 - top_p, always keeping the top token.
        order = jnp.argsort(logits, axis=-1)
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        remove = (cumulative <= 1 - config.top_p).at[..., -1].set(False)
        remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)  # back to vocabulary order
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def _pick(logits, config: GenerationConfig, key):
    """The next token of every row (batch,) and its log-probability under the model."""
    if config.do_sample:
        token = jax.random.categorical(key, warp_logits(logits, config), axis=-1)
    else:
        token = jnp.argmax(logits, axis=-1)
    token = token.astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def _sample_loop(decoder: Decoder, prompt: _Prompt, logits, cache: KVCache, config: GenerationConfig,
                 rng=None) -> Generation:
    """Greedy or sampled decoding from the prefill's `logits` (batch, vocab)."""
    batch, steps = logits.shape[0], config.max_new_tokens
    key_at = (lambda k: jax.random.fold_in(rng, k)) if config.do_sample else (lambda k: None)
    first, first_log_prob = _pick(logits, config, key_at(0))
    tokens = jnp.full((batch, steps), config.pad_id, jnp.int32).at[:, 0].set(first)
    done = _is_eos(first, config.eos_ids)
    state = (jnp.int32(1), cache, tokens, done, jnp.ones((batch,), jnp.int32), first_log_prob)

    def unfinished(state):
        k, _, _, done, _, _ = state
        return (k < steps) & ~jnp.all(done)

    def body(state):
        k, cache, tokens, done, lengths, scores = state
        logits, cache = prompt.step(decoder, cache, tokens, k)
        token, log_prob = _pick(logits, config, key_at(k))
        token = jnp.where(done, config.pad_id, token)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, k, axis=1)
        scores = scores + jnp.where(done, 0.0, log_prob)
        lengths = lengths + (~done).astype(jnp.int32)
        return k + 1, cache, tokens, done | _is_eos(token, config.eos_ids), lengths, scores

    _, _, tokens, _, lengths, scores = jax.lax.while_loop(unfinished, body, state)
    return Generation(tokens, lengths, scores)


# ---------------------------------------------------------------------------------------------------
# Beam search: transformers' `_beam_search` with static shapes, one generated token per iteration.


@flax.struct.dataclass
class _Beams:
    running: jax.Array  # (batch, beams, max_new_tokens) running hypotheses
    running_scores: jax.Array  # (batch, beams) their summed log-probabilities
    finished: jax.Array  # (batch, beams, max_new_tokens) best finished hypotheses, best first
    finished_scores: jax.Array  # (batch, beams) length-penalised
    finished_lengths: jax.Array  # (batch, beams)
    is_finished: jax.Array  # (batch, beams) bool: the slot holds a finished hypothesis
    can_improve: jax.Array  # (batch, 1) bool: transformers' is_early_stop_heuristic_unsatisfied
    all_stopped: jax.Array  # () bool: every candidate of the last step hit a stopping criterion


def _gather_beams(x, index):
    """x (batch, beams, ...) at index (batch, k) -> (batch, k, ...)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_step(beams: _Beams, log_probs, k, config: GenerationConfig):
    """Chooses generated token k of every hypothesis from log_probs (batch, beams, vocab).

    Returns the new beams and, for each new running beam, the flat index (batch * beams) of the beam it
    extends (to reorder the cache).
    """
    batch, num_beams, vocab = log_probs.shape
    steps = config.max_new_tokens
    keep = max(2, 1 + len(config.eos_ids)) * num_beams
    scores = (log_probs + beams.running_scores[:, :, None]).reshape(batch, num_beams * vocab)
    top_scores, top_index = jax.lax.top_k(scores, keep)
    source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    candidates = _gather_beams(beams.running, source_beam)
    candidates = jax.lax.dynamic_update_index_in_dim(candidates, token, k, axis=2)
    stops = _is_eos(token, config.eos_ids) | (k + 1 >= steps)

    # The running beams: the best candidates that did not stop.
    running_index = jax.lax.top_k(top_scores + stops.astype(jnp.float32) * NEG_INF, num_beams)[1]
    running = _gather_beams(candidates, running_index)
    running_scores = _gather_beams(top_scores + stops.astype(jnp.float32) * NEG_INF, running_index)
    parent = _gather_beams(source_beam, running_index) + jnp.arange(batch)[:, None] * num_beams

    # The finished hypotheses: merge the candidates that stopped among the top num_beams.
    just_finished = stops & (jnp.arange(keep) < num_beams)[None, :]
    penalised = top_scores / jnp.asarray(k + 1, jnp.float32) ** jnp.float32(config.length_penalty)
    full = jnp.all(beams.is_finished, axis=-1, keepdims=True) & (config.early_stopping is True)
    penalised += full.astype(jnp.float32) * NEG_INF
    penalised += (~beams.can_improve).astype(jnp.float32) * NEG_INF
    penalised += (~just_finished).astype(jnp.float32) * NEG_INF
    merged_scores = jnp.concatenate([beams.finished_scores, penalised], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    finished = _gather_beams(jnp.concatenate([beams.finished, candidates], axis=1), best)
    finished_scores = _gather_beams(merged_scores, best)
    lengths = jnp.concatenate([beams.finished_lengths, jnp.full((batch, keep), k + 1, jnp.int32)], axis=1)
    finished_lengths = _gather_beams(lengths, best)
    is_finished = _gather_beams(jnp.concatenate([beams.is_finished, just_finished], axis=1), best)

    # Can a running beam still beat the worst finished hypothesis? (transformers' heuristic.)
    generated = k + 1
    if config.early_stopping == "never" and config.length_penalty > 0:
        generated = steps
    best_running = running_scores[:, :1] / jnp.asarray(generated, jnp.float32) ** jnp.float32(config.length_penalty)
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG_INF)
    can_improve = beams.can_improve & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)

    new = _Beams(running, running_scores, finished, finished_scores, finished_lengths, is_finished, can_improve,
                 jnp.all(stops))
    return new, parent.reshape(-1)


def _beams_unfinished(beams: _Beams, config: GenerationConfig):
    exists_open_beam = ~(jnp.all(beams.is_finished) & (config.early_stopping is True))
    return jnp.any(beams.can_improve) & exists_open_beam & ~beams.all_stopped


def _beam_search_loop(decoder: Decoder, prompt: _Prompt, logits, cache: KVCache, config: GenerationConfig
                      ) -> Generation:
    """Beam search from the prefill's `logits` (batch, vocab) and cache (batch rows)."""
    batch, num_beams, steps = logits.shape[0], config.num_beams, config.max_new_tokens
    fill = jnp.full((batch, num_beams, steps), config.pad_id, jnp.int32)
    beams = _Beams(
        running=fill,
        # Only the first beam is live at the start, so that the beams do not all pick the same tokens.
        running_scores=jnp.zeros((batch, num_beams)).at[:, 1:].set(NEG_INF),
        finished=fill,
        finished_scores=jnp.full((batch, num_beams), NEG_INF),
        finished_lengths=jnp.zeros((batch, num_beams), jnp.int32),
        is_finished=jnp.zeros((batch, num_beams), bool),
        can_improve=jnp.ones((batch, 1), bool),
        all_stopped=jnp.array(False),
    )
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    beams, parent = _beam_step(beams, jnp.repeat(log_probs[:, None], num_beams, axis=1), 0, config)
    cache = jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0)[parent], cache)

    def unfinished(state):
        k, _, beams = state
        return (k < steps) & _beams_unfinished(beams, config)

    def body(state):
        k, cache, beams = state
        flat = beams.running.reshape(batch * num_beams, steps)
        logits, cache = prompt.step(decoder, cache, flat, k, copies=num_beams)
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, num_beams, -1)
        beams, parent = _beam_step(beams, log_probs, k, config)
        return k + 1, jax.tree.map(lambda x: x[parent], cache), beams

    _, _, beams = jax.lax.while_loop(unfinished, body, (jnp.int32(1), cache, beams))
    return Generation(beams.finished[:, 0], beams.finished_lengths[:, 0], beams.finished_scores[:, 0])
