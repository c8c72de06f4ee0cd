"""One record, or one volume and a question, to the model's inputs: the one path that the training
pipeline, generation and evaluation share, with one rule for where an answer stops.

A record is validated where it enters (`annotations.load_records`, `pipeline.make_dataset`,
`question_record`, a TFDS store's decoded record); the functions here take its form as valid and check
what only they can see: a question with text besides `<image3d>`, a prompt that fits `max_length`
(PromptTooLongError with the token counts: a counted skip in training, an error when answering), and
a volume path inside the data root (`data_root.confine`) read within `VolumeLimits`.

    spec = InputSpec(volume_shape=(32, 256, 256), num_vision_tokens=512, max_length=1024, question_max_length=64)
    inputs = record_inputs(record, spec, tokenizer, question_tokenizer)                  # training: labels on answers
    prompt = record_inputs(record, spec, tokenizer, question_tokenizer, generation=True)  # the prompt to answer
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines.annotations import question_text, validate_record
from data_pipelines.data_root import confine
from data_pipelines.errors import PromptTooLongError, RecordError
from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN
from data_pipelines.preprocess import preprocess_volume
from data_pipelines.readers import DEFAULT_LIMITS, VolumeLimits, read_volume
from data_pipelines.templates import (
    SLOT, ChatTemplate, encode_conversation, encode_question, get_template, render, tokenize,
)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model's inputs look like.

    Attributes:
      volume_shape: (depth, height, width) of the model's volume.
      num_vision_tokens: positions `<image3d>` expands to (`med2e3_jax.config.num_vision_tokens`).
      max_length: `llm_max_length`: the prompt's static length.
      question_max_length: BERT tokens of the TG-IS question.
      template: a chat template name or ChatTemplate.
      modality: `ct`, `mr`, `unit` or `auto` (from the file type), as `preprocess_volume`.
      hu_window: the HU window of modality `ct`.
      data_root: a record's volume must resolve inside it (the configs' `image_root`); None: read as given.
      allow_outside_root: read volumes outside `data_root` too.
      limits: what a volume file may ask for (`readers.VolumeLimits`).
    """

    volume_shape: tuple[int, int, int]
    num_vision_tokens: int
    max_length: int
    question_max_length: int = 64
    template: str | ChatTemplate = "phi"
    modality: str = "auto"
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    data_root: str | None = None
    allow_outside_root: bool = False
    limits: VolumeLimits = DEFAULT_LIMITS


def volume_limits(cfg: Mapping) -> VolumeLimits:
    """The `VolumeLimits` of a data or evaluation config (`max_voxels`, `max_header_bytes`, `min_extent`;
    the defaults where a config lacks them)."""
    return VolumeLimits(**{key: int(cfg[key]) for key in ("max_voxels", "max_header_bytes", "min_extent")
                           if cfg.get(key) is not None})


def tgis_question(record: Mapping) -> str:
    """The question TG-IS reads: the record's `question`, else its first human turn without `<image3d>`."""
    if isinstance(record.get("question"), str):
        return record["question"]
    return question_text(record["conversations"][0]["value"])


def load_volume(path: str, spec: InputSpec, *, record_id=None) -> np.ndarray:
    """The volume at `path` (`.npy`, NIfTI or a DICOM series), preprocessed: float32 (1, depth, height, width).

    `path` must resolve inside `spec.data_root` (unless `spec.allow_outside_root`); `record_id` names the
    record that asked for it in the error.
    """
    path = confine(path, spec.data_root, allow_outside=spec.allow_outside_root, record_id=record_id)
    volume = preprocess_volume(read_volume(path, limits=spec.limits), shape=spec.volume_shape,
                               modality=spec.modality, window=spec.hu_window)
    return np.ascontiguousarray(volume, np.float32)


def record_inputs(record: Mapping, spec: InputSpec, tokenizer, question_tokenizer, *, volume: np.ndarray | None = None,
                  generation: bool = False) -> dict[str, np.ndarray]:
    """A valid record's model inputs.

    Args:
      record: an annotation record (validated where it entered).
      spec: the inputs' shapes and preprocessing.
      tokenizer: the LLM's tokenizer; question_tokenizer: TG-IS's BERT tokenizer, or None for a model
        without the question branch.
      volume: the record's volume already preprocessed (a TFDS store's, or augmented); default: read
        `record["vision3d"][0]` and preprocess it.
      generation: the prompt the model answers (a trailing answer dropped, the generation prompt after
        the last question, no label supervised) instead of the training example.

    Returns:
      `volume` (1, depth, height, width) float32; `input_ids`, `labels`, `attention_mask` (max_length,)
      int32 (`templates.encode_conversation`); `question_ids`, `question_mask` (question_max_length,)
      int32 unless `question_tokenizer` is None.
    """
    _require_questions(record)
    encoded = encode_conversation(
        record, tokenizer, template=spec.template, num_vision_tokens=spec.num_vision_tokens,
        max_length=spec.max_length, add_generation_prompt=generation)
    _require_fit(record, encoded, spec, tokenizer, generation=generation)
    if volume is None:
        volume = load_volume(record["vision3d"][0], spec, record_id=record.get("id"))
    inputs = dict(volume=volume, **encoded)
    if question_tokenizer is not None:
        inputs |= encode_question(tgis_question(record), question_tokenizer, max_length=spec.question_max_length)
    return inputs


def _require_questions(record: Mapping) -> None:
    """RecordError unless every human turn, and the TG-IS question, has text besides `<image3d>`."""
    record_id = record.get("id")
    for index, turn in enumerate(record["conversations"]):
        if turn["from"] == "human" and not question_text(turn["value"]):
            raise RecordError(f"record {record_id!r}: turn {index} (human) holds no question besides "
                              f"{IMAGE3D_TOKEN}; expected a question to answer", path=str(record_id))
    if not tgis_question(record).strip():
        raise RecordError(f"record {record_id!r}: its 'question' (what TG-IS reads) is empty; expected the "
                          "question's text", path=str(record_id))


def _require_fit(record: Mapping, encoded: Mapping[str, np.ndarray], spec: InputSpec, tokenizer, *,
                 generation: bool) -> None:
    """PromptTooLongError, with the token counts, when `max_length` cuts what the example is for: the
    generation prompt (answering), or every answer token (training: nothing would be supervised);
    RecordError for a training record without an answer."""
    template = get_template(spec.template)
    record_id = record.get("id")
    turns = list(record["conversations"])
    questions = [t["value"] for t in turns if t["from"] == "human"]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    used = int(encoded["attention_mask"].sum())

    def positions(text: str) -> int:
        # In the merged prompt: the text's tokens, its placeholder expanded to the volume's positions.
        return len(tokenize(text, tokenizer)) - 1 + spec.num_vision_tokens

    if generation:
        if used < spec.max_length:
            return
        prompt = positions(render(template, questions, answers[: len(questions) - 1]))
        if prompt > spec.max_length:
            raise PromptTooLongError(
                f"record {record_id!r}: the prompt takes {prompt} positions ({spec.num_vision_tokens} of them the "
                f"volume's) up to and including {template.generation_prompt!r}; max_length (llm_max_length) is "
                f"{spec.max_length}, so it would be cut before the model is asked to answer. Shorten the question "
                "or the conversation before it",
                path=str(record_id))
        return
    if (encoded["labels"] != IGNORE_INDEX).any():
        return
    if not answers:
        raise RecordError(f"record {record_id!r}: has no answer (gpt turn) to train on", path=str(record_id))
    if used < spec.max_length:
        return  # every label ignored for another reason: the templates' tokenization mismatch, logged there
    if template.labels == "rounds":
        instruction = render(template, questions[:1], [])
    else:
        instruction = template.system + template.user.replace(SLOT, questions[0].strip())
    before = positions(instruction)
    total = positions(render(template, questions, answers))
    raise PromptTooLongError(
        f"record {record_id!r}: its first question takes {before} positions ({spec.num_vision_tokens} of them the "
        f"volume's) before its answer, which has {total - before} more; max_length (llm_max_length) is "
        f"{spec.max_length}, so no answer token is left to train on. Shorten the question or raise max_length",
        path=str(record_id))


def question_record(volume_path: str, question: str, *, history: Sequence[Mapping] = (), record_id: str = "prompt"
                    ) -> dict:
    """The record of a question about one volume (after `history`, earlier human/gpt turns), validated.

    `<image3d>` goes before the question unless the question or the history's first turn holds it.
    """
    turns = list(history)
    if not any(IMAGE3D_TOKEN in t.get("value", "") for t in turns) and IMAGE3D_TOKEN not in question:
        if turns:
            turns[0] = {**turns[0], "value": f"{IMAGE3D_TOKEN}\n{turns[0]['value']}"}
        else:
            question = f"{IMAGE3D_TOKEN}\n{question}"
    record = dict(id=record_id, vision3d=[str(volume_path)],
                  conversations=[*turns, {"from": "human", "value": question}])
    record["question"] = question_text(question)
    validate_record(record)
    return record


def stop_ids(tokenizer, template: str | ChatTemplate, eos_token_id: int | Sequence[int] | None = None
             ) -> tuple[int, ...]:
    """The ids that end a generated answer: the token that closes an answered round in `template` (what
    training supervises after each answer), the tokenizer's EOS and the LLM config's `eos_token_id`;
    never the UNK id (a multi-token round end would otherwise stop on UNK)."""
    template = get_template(template)
    ids = {tokenizer.eos_token_id}
    if template.eos:
        ids.add(tokenizer.convert_tokens_to_ids(template.eos))
    if eos_token_id is not None:
        ids.update([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    ids -= {None, tokenizer.unk_token_id}
    if not ids:
        raise RecordError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} and template "
                          f"{template.name!r} give no id that ends an answer")
    return tuple(sorted(int(i) for i in ids))
