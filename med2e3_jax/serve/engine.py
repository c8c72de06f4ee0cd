"""The model behind the page: one question about one scan, answered token by token.

    scan, question ─ encode_vision (3D ViT, SigLIP per slice, TG-IS: the slice scores)
                   ─ prefill (prompt with the vision tokens, into a KV cache) ─ first token
                   └ step × n (one token each, greedy) ─ … ─ EOS or max_new_tokens

`generate.generate` runs the same decoding inside one `lax.while_loop`, so nothing leaves the device
before the last token; the page wants each token as it comes, so here the loop runs on the host around
two compiled functions, prefill and step, which reuse generate's `_Prompt` (positions, cache length,
the LongRoPE recompute) and give the same greedy tokens (tests/test_serve.py). Every input has one
shape — one row, the prompt padded to `llm_max_length`, the volume at the model's resolution — so
encode, prefill and step compile once each, at `warm_up`; `traces` counts the compilations.

The vision encoding is `Engine.encode` alone: a vision-feature cache (one encoding per scan for all its
questions) replaces that one method.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.model_inputs import InputSpec, question_record, record_inputs, stop_ids
from data_pipelines.templates import get_template, load_tokenizer
from med2e3_jax import config as config_lib
from med2e3_jax.generate import _Prompt, decode_texts
from med2e3_jax.models.med2e3 import Med2E3

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Answer:
    """One question's answer as it grows.

    Attributes:
      question: as asked.
      text: the answer so far (the whole answer once `done`).
      tokens: the generated ids so far, EOS included.
      slice_scores: (slices,) TG-IS scores, known before the first token; None until then or on error.
      error: why the question could not be answered (the message shown on the page), else None.
      first_token_s: seconds from the question to its first token (encode + prefill included).
      total_s: seconds from the question to the end of its answer.
      done: no more tokens will come.
    """

    question: str
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    slice_scores: np.ndarray | None = None
    error: str | None = None
    first_token_s: float | None = None
    total_s: float | None = None
    done: bool = False


def load_model(checkpoint: str | None = None, pytorch: str | None = None, model_config=None) -> Med2E3:
    """The model from an Orbax checkpoint written by `save_params`, or from the authors' PyTorch
    checkpoint with `model_config` (an experiment config's `model`) describing its architecture."""
    if bool(checkpoint) == bool(pytorch):
        raise ValueError("pass exactly one of checkpoint (Orbax) and pytorch (with model_config)")
    if checkpoint:
        from med2e3_jax.checkpoint.orbax_params import restore_params

        return restore_params(checkpoint)
    if model_config is None:
        raise ValueError(f"{pytorch}: a PyTorch checkpoint needs the model config of its architecture (--config)")
    from med2e3_jax.checkpoint.loading import load_med2e3

    model, reports = load_med2e3(model_config, pytorch)
    for report in reports:
        log.info("imported %s: %s", pytorch, report.summary())
    return model


class Engine:
    """A model, its tokenizers and its input layout, answering one question at a time.

    Args:
      model: the Med2E3 model.
      tokenizer: the LLM's HF tokenizer; question_tokenizer: TG-IS's BERT tokenizer.
      template: the chat template's name.
      question_max_length: BERT tokens of the TG-IS question (capped by the question encoder's positions).
      max_new_tokens: tokens per answer at most.
    """

    def __init__(self, model: Med2E3, tokenizer, question_tokenizer, *, template: str = "phi",
                 question_max_length: int = 64, max_new_tokens: int = 64):
        cfg = model.cfg
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            # The authors pad with the UNK (Llama) or EOS token; the pad id only fills masked positions.
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.question_tokenizer = question_tokenizer
        template = get_template(template)
        positions = cfg.question_encoder.max_position_embeddings if model.uses_question else question_max_length
        self.spec = InputSpec(
            volume_shape=tuple(cfg.vision3d.img_size), num_vision_tokens=config_lib.num_vision_tokens(cfg),
            max_length=cfg.llm_max_length, template=template, question_max_length=min(question_max_length, positions))
        self.eos_ids = stop_ids(tokenizer, template, cfg.llm.get("eos_token_id"))
        self.max_new_tokens = int(max_new_tokens)
        self.traces: Counter[str] = Counter()  # compilations of encode, prefill and step
        self._lock = threading.Lock()  # the model answers one question at a time
        self._encode = nnx.jit(self._encode_fn)
        self._prefill = nnx.jit(self._prefill_fn, static_argnames=("max_new_tokens",))
        self._step = nnx.jit(self._step_fn)

    @classmethod
    def from_paths(cls, model: Med2E3, tokenizer_path: str, question_tokenizer_path: str, **kwargs) -> Engine:
        return cls(model, load_tokenizer(tokenizer_path), load_tokenizer(question_tokenizer_path), **kwargs)

    # -----------------------------------------------------------------------------------------------
    # The compiled parts (traced once each; `traces` counts the tracings).

    def _encode_fn(self, model, volume, question_ids, question_mask):
        self.traces["encode"] += 1
        return model.encode_vision(volume, question_ids, question_mask)

    def _prefill_fn(self, model, vision_tokens, input_ids, attention_mask, max_new_tokens):
        self.traces["prefill"] += 1
        embeds = model.embed_prompt(input_ids, attention_mask, vision_tokens)
        prompt = _Prompt.of(model.llm, embeds, attention_mask, max_new_tokens)
        logits, cache = prompt.prefill(model.llm)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        generated = jnp.zeros((embeds.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)
        return prompt, cache, generated

    def _step_fn(self, model, prompt, cache, generated, k):
        self.traces["step"] += 1
        logits, cache = prompt.step(model.llm, cache, generated, k)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return cache, jax.lax.dynamic_update_index_in_dim(generated, token, k, axis=1)

    def encode(self, model_volume: np.ndarray, question_ids: np.ndarray, question_mask: np.ndarray):
        """The vision tokens (1, vision_tokens, embed) and slice scores (1, slices) of one scan and
        question: the one call a vision-feature cache replaces."""
        return self._encode(self.model, model_volume, question_ids, question_mask)

    # -----------------------------------------------------------------------------------------------

    def prompt_inputs(self, question: str, model_volume: np.ndarray, *, name: str = "scan") -> dict[str, np.ndarray]:
        """One row's inputs (batch axis first), the prompt padded to `llm_max_length`; raises RecordError
        (empty question) or PromptTooLongError with the reader-facing message."""
        record = question_record(name, question)
        row = record_inputs(record, self.spec, self.tokenizer, self.question_tokenizer, volume=model_volume,
                            generation=True)
        return {key: np.asarray(value)[None] for key, value in row.items() if key != "labels"}

    def answer(self, question: str, model_volume: np.ndarray, *, limit: int | None = None,
               name: str = "scan") -> Iterator[Answer]:
        """Yields the growing Answer: once with the slice scores, then after every token; the last one
        has `done` set. Input errors end it with `error` set instead of raising.

        Args:
          question: the question's text.
          model_volume: (1, slices, height, width), a `Scan.model_volume`.
          limit: stop after this many tokens (at most `max_new_tokens`, the compiled length).
        """
        steps = min(int(limit or self.max_new_tokens), self.max_new_tokens)
        answer = Answer(question)
        start = time.perf_counter()
        try:
            inputs = self.prompt_inputs(question, model_volume, name=name)
        except ValueError as error:  # RecordError, PromptTooLongError: the question, not the server
            answer.error, answer.done = str(error), True
            yield answer
            return
        with self._lock:
            vision = self.encode(inputs["volume"], inputs.get("question_ids"), inputs.get("question_mask"))
            answer.slice_scores = np.asarray(vision.slice_scores[0], np.float32)
            yield answer
            prompt, cache, generated = self._prefill(self.model, vision.tokens, inputs["input_ids"],
                                                     inputs["attention_mask"], max_new_tokens=self.max_new_tokens)
            k = 0
            while True:
                token = int(generated[0, k])
                answer.tokens.append(token)
                if k == 0:
                    answer.first_token_s = time.perf_counter() - start
                finished = token in self.eos_ids or k + 1 == steps
                answer.text = self._text(answer.tokens)
                if finished:
                    break
                yield answer
                k += 1
                cache, generated = self._step(self.model, prompt, cache, generated, jnp.int32(k))
        answer.total_s, answer.done = time.perf_counter() - start, True
        yield answer

    def _text(self, tokens: Sequence[int]) -> str:
        return decode_texts(np.asarray([tokens]), np.asarray([len(tokens)]), self.tokenizer, self.eos_ids)[0]

    def warm_up(self) -> float:
        """Compiles encode, prefill and step on a blank volume; returns the seconds it took."""
        start = time.perf_counter()
        blank = np.zeros((1, *self.spec.volume_shape), np.float32)
        for _ in self.answer("What does the scan show?", blank, limit=2):
            pass
        seconds = time.perf_counter() - start
        log.info("compiled encode, prefill and step in %.1f s", seconds)
        return seconds
