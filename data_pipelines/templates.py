"""The authors' chat templates, their label masks, and static-shape token ids for the model.

Med-2E3 (`src/data/template/`) renders a conversation as one string,

    SYSTEM + " " + ("USER: " + question + " " + "ASSISTANT: " + answer + EOS) per round

(the system prompt once, before the first round; a prompt for generation ends with "ASSISTANT:"),
tokenizes it chunk by chunk around the `<image3d>` placeholder (which becomes IMAGE3D_TOKEN_ID, and
the BOS, when the tokenizer adds one, appears only once, at the very start), and masks the labels
round by round: every round is split at " ASSISTANT:", the tokens up to and including it are
IGNORE_INDEX, the answer and its EOS are supervised. The lengths come from tokenizing each round on
its own; when they do not add up to the whole prompt (the authors' "tokenization mismatch"), every
label of the record is IGNORE_INDEX. The pretraining template has no system prompt and no rounds:
`<image3d>` followed by the caption, with only the placeholder masked (and no EOS).

The templates differ only in their strings, so each is a `ChatTemplate` value and one code path
encodes them all. The collator's rules come next: text truncated to `max_length`, attention on every
token that is not the pad id — except that when pad == eos the EOS tokens stay attended (the authors
swap them for -300 around the padding) — and then the placeholder is expanded to the vision positions
(`expand_image_placeholder`), truncated and padded to a static length.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from data_pipelines.errors import RecordError
from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN, IMAGE3D_TOKEN_ID, expand_image_placeholder

logger = logging.getLogger(__name__)

SLOT = "{content}"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One of the authors' templates, as the strings it is made of.

    Attributes:
      name: the authors' `conv_version`.
      system: written once, before the first question.
      user: a question's turn; `{content}` is the question (a template without the slot drops it).
      assistant: an answer's turn; `{content}` is the answer, followed by `eos`.
      separator: the end of the instruction part of a round; the tokens up to it are not supervised.
      eos: the text that closes every answered round.
      generation_prompt: what follows the last question when the model is to answer it.
      labels: "rounds" — mask each round's instruction, supervise answer + EOS (chat templates);
        "first_instruction" — mask the system + first question only, supervise the rest (pretraining).
    """

    name: str
    system: str
    user: str
    assistant: str
    separator: str
    eos: str
    generation_prompt: str = "ASSISTANT:"
    labels: Literal["rounds", "first_instruction"] = "rounds"


def _chat(name: str, eos: str) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        system=SYSTEM_PROMPT + " ",
        user="USER: " + SLOT + " ",
        assistant="ASSISTANT: " + SLOT + eos,
        separator=" ASSISTANT:",
        eos=eos,
    )


TEMPLATES: dict[str, ChatTemplate] = {
    "phi": _chat("phi", "<|endoftext|>"),
    "llama": _chat("llama", "</s>"),
    "llama3": _chat("llama3", "<|eot_id|>"),
    "qwen": _chat("qwen", "<|im_end|>"),
    # The authors' `pretrain_vision3d` (their `pretrain` is the 2D `<image>` variant): the human turn is
    # replaced by the placeholder, the caption follows it directly, no EOS.
    "pretrain": ChatTemplate(
        name="pretrain", system="", user=IMAGE3D_TOKEN, assistant=SLOT, separator="", eos="",
        labels="first_instruction",
    ),
}
TEMPLATES["qwen2"] = TEMPLATES["qwen"]
TEMPLATES["pretrain_vision3d"] = TEMPLATES["pretrain"]


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def load_tokenizer(path: str):
    """An HF tokenizer from a local directory (never a hub look-up)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------------
# Rendering and tokenizing, as the authors do.


def render(template: ChatTemplate, questions: Sequence[str], answers: Sequence[str]) -> str:
    """The prompt string; one answer fewer than questions ends it with the generation prompt."""
    text = template.system
    for i, question in enumerate(questions):
        text += template.user.replace(SLOT, question.strip())
        answer = answers[i].strip() if i < len(answers) else ""
        text += template.assistant.replace(SLOT, answer) if answer else template.generation_prompt
    return text


def _adds_bos(tokenizer) -> bool:
    # The authors' test: does the tokenizer put BOS in front of plain text?
    return tokenizer.bos_token_id is not None and tokenizer("test string").input_ids[0] == tokenizer.bos_token_id


def tokenize(text: str, tokenizer) -> list[int]:
    """Token ids of `text`, `<image3d>` as IMAGE3D_TOKEN_ID, BOS (if the tokenizer adds one) only first.

    Each stretch of text between placeholders is tokenized on its own, so the ids are those of the
    authors' `tokenizer_special_token`, chunk boundaries included.
    """
    offset = int(_adds_bos(tokenizer))
    ids: list[int] = []
    for chunk in re.split(f"({re.escape(IMAGE3D_TOKEN)})", text):
        if chunk == IMAGE3D_TOKEN:
            ids.append(IMAGE3D_TOKEN_ID)
        elif chunk:
            if not ids and offset:
                ids.append(tokenizer.bos_token_id)
            ids.extend(tokenizer(chunk).input_ids[offset:])
    return ids


def _round_labels(ids: np.ndarray, prompt: str, tokenizer, template: ChatTemplate, max_length: int, record_id):
    """The authors' `make_labels`: per-round lengths from tokenizing each round separately."""
    labels = ids.copy()
    expected = int((ids != tokenizer.pad_token_id).sum())
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        expected += prompt.count(template.eos)
    # With a BOS-adding tokenizer every separately tokenized round after the first carries a BOS that
    # the whole prompt does not; the authors detect that by the EOS text encoding to two ids.
    drop_bos = len(tokenizer.encode(template.eos)) > 1
    position = 0
    for index, round_text in enumerate(prompt.split(template.eos)):
        if round_text == "":
            break
        parts = round_text.split(template.separator)
        if len(parts) != 2:
            break
        round_length = len(tokenize(round_text, tokenizer)) + 1  # + the EOS that split() removed
        instruction_length = len(tokenize(parts[0] + template.separator, tokenizer))
        if drop_bos and index != 0:
            round_length -= 1
            instruction_length -= 1
        labels[position : position + instruction_length] = IGNORE_INDEX
        position += round_length
    labels[position:] = IGNORE_INDEX
    if position < max_length and position != expected:
        logger.warning(
            "record %r: tokenization mismatch (%d tokens counted over the rounds, %d in the prompt); "
            "all its labels are ignored, as in the authors' code",
            record_id, position, expected,
        )
        labels[:] = IGNORE_INDEX
    return labels


def _text_attention(ids: np.ndarray, tokenizer) -> np.ndarray:
    # The collator attends to ids != pad; with pad == eos it hides EOS from that test (the -300 swap),
    # so every text token is attended.
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        return np.ones_like(ids, dtype=np.int32)
    return (ids != tokenizer.pad_token_id).astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# What the pipeline calls.


def encode_conversation(
    record: Mapping,
    tokenizer,
    *,
    template: str | ChatTemplate,
    num_vision_tokens: int,
    max_length: int,
    pad_to: int | None = None,
    add_generation_prompt: bool = False,
) -> dict[str, np.ndarray]:
    """Model inputs for one annotation record.

    Args:
      record: `{"id", "conversations": [{"from": "human"|"gpt", "value"}, ...], ...}`; the first human
        turn holds the one `<image3d>`. Validated where it entered (`annotations.validate_record`).
      tokenizer: the LLM's HF tokenizer (needs a pad token).
      template: a name in TEMPLATES or a ChatTemplate.
      num_vision_tokens: positions the placeholder expands to.
      max_length: `llm_max_length`: the text is cut to it (the collator), and so is the merged prompt.
      pad_to: static length of the outputs (>= max_length); default max_length.
      add_generation_prompt: encode the prompt the model answers: a trailing answer is dropped, the text
        ends with the generation prompt, and no label is supervised.

    Returns:
      `input_ids` (length,) int32 with IMAGE3D_TOKEN_ID at each vision position and the pad id after
      the end; `labels` (length,) int32, IGNORE_INDEX except on supervised answer tokens;
      `attention_mask` (length,) int32 0/1; length = pad_to.
    """
    template = get_template(template)
    record_id = record.get("id")
    pad_to = max_length if pad_to is None else pad_to
    if pad_to < max_length:
        raise ValueError(f"pad_to={pad_to} is shorter than max_length={max_length}; batches would not be static")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no pad token; "
            "set tokenizer.pad_token (the authors use the EOS or UNK token)"
        )
    turns = list(record["conversations"])
    if add_generation_prompt and turns[-1]["from"] == "gpt":
        turns = turns[:-1]
    questions = [t["value"] for t in turns if t["from"] == "human"]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    prompt = render(template, questions, answers)
    ids = np.asarray(tokenize(prompt, tokenizer), np.int64)
    if (ids == IMAGE3D_TOKEN_ID).sum() != 1:
        raise RecordError(
            f"record {record_id!r}: template {template.name!r} puts {(ids == IMAGE3D_TOKEN_ID).sum()} "
            f"{IMAGE3D_TOKEN} in the prompt (it writes one per round); expected one",
            path=str(record_id),
        )

    if len(answers) < len(questions):
        labels = np.full_like(ids, IGNORE_INDEX)
    elif template.labels == "first_instruction":
        labels = ids.copy()
        first = template.system + template.user.replace(SLOT, questions[0].strip())
        labels[: len(tokenize(first, tokenizer))] = IGNORE_INDEX
    else:
        labels = _round_labels(ids, prompt, tokenizer, template, max_length, record_id)

    ids, labels = ids[:max_length], labels[:max_length]
    if not (ids == IMAGE3D_TOKEN_ID).any():
        raise RecordError(
            f"record {record_id!r}: the <image3d> placeholder lies beyond the first {max_length} tokens",
            path=str(record_id),
        )
    expanded = expand_image_placeholder(
        ids[None], _text_attention(ids, tokenizer)[None], labels[None],
        num_vision_tokens=num_vision_tokens, max_length=max_length, pad_id=tokenizer.pad_token_id,
        pad_to=pad_to,
    )
    return {
        "input_ids": expanded.input_ids[0],
        "labels": expanded.labels[0],
        "attention_mask": expanded.attention_mask[0],
    }


def encode_question(text: str, question_tokenizer, *, max_length: int) -> dict[str, np.ndarray]:
    """The TG-IS question for M3D-CLIP's BERT: `[CLS] ... [SEP]`, truncated, right-padded to max_length.

    Returns `question_ids` and `question_mask`, both (max_length,) int32.
    """
    encoded = question_tokenizer(
        text, max_length=max_length, truncation=True, padding="max_length", padding_side="right"
    )
    return {
        "question_ids": np.asarray(encoded["input_ids"], np.int32),
        "question_mask": np.asarray(encoded["attention_mask"], np.int32),
    }
