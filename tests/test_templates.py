"""The chat templates against the authors' semantics, with expected ids written out token by token."""

import logging

import numpy as np
import pytest
from tokenizers_for_tests import expected, ids_of

from data_pipelines.errors import RecordError
from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID
from data_pipelines.model_inputs import question_record
from data_pipelines.templates import (
    TEMPLATES,
    encode_conversation,
    encode_question,
)
from data_pipelines.tiny_tokenizers import bert_like, llama_like, phi_like, qwen_like

V = 3  # vision positions the placeholder expands to

# The authors' system prompt, hand-split into the pieces of the sentencepiece-like and byte-level tokenizers.
SYSTEM_WORDS = (
    *("A", "chat", "between", "a", "curious", "user", "and", "an", "artificial", "intelligence", "assistant", "."),
    *("The", "assistant", "gives", "helpful", ",", "detailed", ",", "and", "polite", "answers", "to", "the"),
    *("user", "'", "s", "questions", "."),
)
SYSTEM_SP = ["▁" + w if w not in ".,'" and w != "s" else w for w in SYSTEM_WORDS]
SYSTEM_BL = ["A"] + ["Ġ" + w if w not in ".,'" else w for w in SYSTEM_WORDS[1:]]
SYSTEM_BL[SYSTEM_BL.index("'") : SYSTEM_BL.index("'") + 2] = ["'s"]


def turn(role, value):
    return {"from": role, "value": value}


RECORD = {
    "id": "liver_case",
    "conversations": [
        turn("human", "<image3d>\nWhich organ shows a lesion?"),
        turn("gpt", "The liver"),
        turn("human", "Where is it?"),
        turn("gpt", "In the left lobe"),
    ],
    "vision3d": ["case.npy"],
}


def encode(record, tokenizer, template, *, max_length=200, pad_to=None, **kw):
    return encode_conversation(
        record, tokenizer, template=template, num_vision_tokens=V, max_length=max_length, pad_to=pad_to, **kw
    )


def check(out, want):
    ids, labels, mask = want
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["attention_mask"], mask)
    for key in ("input_ids", "labels", "attention_mask"):
        assert out[key].dtype == np.int32


def test_phi_multi_turn_ids_and_labels_follow_the_authors_template():
    # BOS once at the start, system once, "USER: q ASSISTANT: a<|endoftext|>" per round; only the answers
    # and their EOS supervised. Pad == eos, so the EOS tokens stay attended and padding is the eos id.
    tok = phi_like()
    out = encode(RECORD, tok, "phi", max_length=200)
    want = expected(
        tok,
        [
            (["<s>", *SYSTEM_SP, "▁USER", ":", "▁", *[IMAGE3D_TOKEN_ID] * V], False),
            (["▁\n", "Which", "▁organ", "▁shows", "▁a", "▁lesion", "?", "▁ASSISTANT", ":"], False),
            (["▁The", "▁liver", "<|endoftext|>"], True),
            (["USER", ":", "▁Where", "▁is", "▁it", "?", "▁ASSISTANT", ":"], False),
            (["▁In", "▁the", "▁left", "▁lobe", "<|endoftext|>"], True),
        ],
        200,
    )
    check(out, want)
    assert tok.pad_token_id == tok.eos_token_id
    eos_positions = np.flatnonzero(out["input_ids"][: out["attention_mask"].sum()] == tok.eos_token_id)
    assert len(eos_positions) == 2 and out["attention_mask"][eos_positions].all()


def test_phi_without_bos_starts_with_the_system_prompt():
    tok = phi_like(add_bos=False)
    out = encode(RECORD, tok, "phi", max_length=200)
    want = expected(
        tok,
        [
            ([*SYSTEM_SP, "▁USER", ":", "▁", *[IMAGE3D_TOKEN_ID] * V], False),
            (["▁\n", "Which", "▁organ", "▁shows", "▁a", "▁lesion", "?", "▁ASSISTANT", ":"], False),
            (["▁The", "▁liver", "<|endoftext|>"], True),
            (["USER", ":", "▁Where", "▁is", "▁it", "?", "▁ASSISTANT", ":"], False),
            (["▁In", "▁the", "▁left", "▁lobe", "<|endoftext|>"], True),
        ],
        200,
    )
    check(out, want)


def test_llama_template_ends_rounds_with_its_eos_and_pads_with_unk():
    tok = llama_like()
    out = encode(RECORD, tok, "llama", max_length=200, pad_to=220)
    want = expected(
        tok,
        [
            (["<s>", *SYSTEM_SP, "▁USER", ":", "▁", *[IMAGE3D_TOKEN_ID] * V], False),
            (["▁\n", "Which", "▁organ", "▁shows", "▁a", "▁lesion", "?", "▁ASSISTANT", ":"], False),
            (["▁The", "▁liver", "</s>"], True),
            (["USER", ":", "▁Where", "▁is", "▁it", "?", "▁ASSISTANT", ":"], False),
            (["▁In", "▁the", "▁left", "▁lobe", "</s>"], True),
        ],
        220,
    )
    check(out, want)
    assert tok.pad_token_id == 0


def test_qwen_template_has_no_bos_and_byte_level_pieces():
    tok = qwen_like()
    out = encode(RECORD, tok, "qwen", max_length=200)
    want = expected(
        tok,
        [
            ([*SYSTEM_BL, "ĠUSER", ":", "Ġ", *[IMAGE3D_TOKEN_ID] * V], False),
            (["Ċ", "Which", "Ġorgan", "Ġshows", "Ġa", "Ġlesion", "?", "ĠASSISTANT", ":"], False),
            (["ĠThe", "Ġliver", "<|im_end|>"], True),
            (["USER", ":", "ĠWhere", "Ġis", "Ġit", "?", "ĠASSISTANT", ":"], False),
            (["ĠIn", "Ġthe", "Ġleft", "Ġlobe", "<|im_end|>"], True),
        ],
        200,
    )
    check(out, want)
    assert TEMPLATES["qwen2"] is TEMPLATES["qwen"]


@pytest.mark.parametrize("make_tokenizer", [phi_like, llama_like])
def test_pretrain_template_is_the_placeholder_then_the_supervised_caption_without_eos(make_tokenizer):
    # The authors' `pretrain_vision3d`: the question is dropped, no system prompt, no BOS (the prompt
    # starts with the placeholder), no EOS; only the placeholder is masked.
    tok = make_tokenizer()
    record = dict(RECORD, conversations=RECORD["conversations"][:2])
    out = encode(record, tok, "pretrain", max_length=50)
    want = expected(tok, [([IMAGE3D_TOKEN_ID] * V, False), (["▁The", "▁liver"], True)], 50)
    check(out, want)


def test_generation_prompt_ends_with_assistant_and_supervises_nothing():
    tok = phi_like()
    record = question_record("scan.npy", "<image3d>\nWhich organ shows a lesion?")
    out = encode(record, tok, "phi", max_length=100, add_generation_prompt=True)
    want = expected(
        tok,
        [
            (["<s>", *SYSTEM_SP, "▁USER", ":", "▁", *[IMAGE3D_TOKEN_ID] * V], False),
            (["▁\n", "Which", "▁organ", "▁shows", "▁a", "▁lesion", "?", "▁ASSISTANT", ":"], False),
        ],
        100,
    )
    check(out, want)
    assert (out["labels"] == IGNORE_INDEX).all()


def test_generation_prompt_after_history_keeps_earlier_answers_and_drops_the_reference():
    tok = phi_like()
    with_history = encode(question_record("scan.npy", "Where is it?", history=RECORD["conversations"][:2]), tok, "phi",
                          max_length=100, add_generation_prompt=True)
    from_record = encode(RECORD, tok, "phi", max_length=100, add_generation_prompt=True)
    want = expected(
        tok,
        [
            (["<s>", *SYSTEM_SP, "▁USER", ":", "▁", *[IMAGE3D_TOKEN_ID] * V], False),
            (["▁\n", "Which", "▁organ", "▁shows", "▁a", "▁lesion", "?", "▁ASSISTANT", ":"], False),
            (["▁The", "▁liver", "<|endoftext|>"], False),
            (["USER", ":", "▁Where", "▁is", "▁it", "?", "▁ASSISTANT", ":"], False),
        ],
        100,
    )
    check(with_history, want)
    check(from_record, want)


def test_truncation_keeps_the_head_of_the_merged_prompt_and_pads_to_a_static_length():
    tok = phi_like()
    full = encode(RECORD, tok, "phi", max_length=200)
    n = int(full["attention_mask"].sum())
    for max_length in (n - 1, n - 7, 40):
        out = encode(RECORD, tok, "phi", max_length=max_length, pad_to=64)
        assert out["input_ids"].shape == (64,)
        np.testing.assert_array_equal(out["input_ids"][:max_length], full["input_ids"][:max_length])
        np.testing.assert_array_equal(out["labels"][:max_length], full["labels"][:max_length])
        assert out["attention_mask"].sum() == max_length
        assert (out["labels"][max_length:] == IGNORE_INDEX).all()
        assert (out["input_ids"][max_length:] == tok.pad_token_id).all()


def test_placeholder_expands_to_the_configured_number_of_vision_positions():
    tok = phi_like()
    for vision_tokens in (1, 5, 17):
        out = encode_conversation(
            RECORD, tok, template="phi", num_vision_tokens=vision_tokens, max_length=200, pad_to=200
        )
        vision = np.flatnonzero(out["input_ids"] == IMAGE3D_TOKEN_ID)
        start = 1 + len(SYSTEM_SP) + 3  # BOS, system prompt, "▁USER", ":", "▁"
        np.testing.assert_array_equal(vision, np.arange(start, start + vision_tokens))
        assert (out["labels"][vision] == IGNORE_INDEX).all()


def test_placeholder_cut_off_by_the_text_length_names_the_record():
    with pytest.raises(RecordError, match="liver_case"):
        encode(RECORD, phi_like(), "phi", max_length=10)


def test_pad_to_shorter_than_max_length_is_refused():
    with pytest.raises(ValueError, match="pad_to"):
        encode(RECORD, phi_like(), "phi", max_length=200, pad_to=20)


def test_text_token_equal_to_a_distinct_pad_id_is_dropped_and_voids_the_labels_as_in_the_authors_code():
    # Llama's pad is <unk>: the collator's `input_ids.ne(pad)` mask drops an unknown word from the prompt,
    # and `make_labels` counts it out of the prompt length, so the round lengths no longer add up and
    # every label is ignored (the authors' "tokenization mismatch").
    tok = llama_like()
    record = dict(RECORD, conversations=[turn("human", "<image3d>\nWhich zebra?"), turn("gpt", "The liver")])
    out = encode(record, tok, "llama", max_length=100)
    ids, _, mask = expected(
        tok,
        [
            (["<s>", *SYSTEM_SP, "▁USER", ":", "▁", *[IMAGE3D_TOKEN_ID] * V], False),
            (["▁\n", "Which", "?", "▁ASSISTANT", ":"], False),  # "▁zebra" -> <unk> == pad: dropped
            (["▁The", "▁liver", "</s>"], False),
        ],
        100,
    )
    check(out, (ids, np.full(100, IGNORE_INDEX, np.int32), mask))


def test_answer_containing_the_separator_ignores_all_labels_as_the_authors_do(caplog):
    # " ASSISTANT:" inside an answer breaks the round split: the authors' "tokenization mismatch".
    tok = phi_like()
    record = dict(
        RECORD,
        conversations=[turn("human", "<image3d>\nWhich organ?"), turn("gpt", "The ASSISTANT: liver")],
    )
    with caplog.at_level(logging.WARNING, logger="data_pipelines.templates"):
        out = encode(record, tok, "phi", max_length=100)
    assert (out["labels"] == IGNORE_INDEX).all()
    assert "liver_case" in caplog.text and "mismatch" in caplog.text
    assert out["attention_mask"].sum() > 0


def test_malformed_conversation_is_named_by_record_id():
    record = dict(RECORD, id="bad_one", conversations=[turn("human", "Which organ?"), turn("gpt", "liver")])
    with pytest.raises(RecordError, match="bad_one"):
        encode(record, phi_like(), "phi")


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="phi"):
        encode(RECORD, phi_like(), "vicuna")


def test_tokenizer_without_pad_token_is_refused_with_a_hint():
    tok = qwen_like()
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        encode(RECORD, tok, "qwen")


def test_question_for_bert_is_cls_text_sep_padded_with_zero():
    tok = bert_like()
    out = encode_question("Which organ shows a lesion?", tok, max_length=12)
    want = ids_of(tok, ["[CLS]", "which", "organ", "shows", "a", "lesion", "?", "[SEP]"])
    np.testing.assert_array_equal(out["question_ids"], want + [0] * 4)
    np.testing.assert_array_equal(out["question_mask"], [1] * 8 + [0] * 4)
    assert out["question_ids"].dtype == np.int32 and out["question_mask"].dtype == np.int32


def test_question_for_bert_is_truncated_keeping_sep():
    tok = bert_like()
    out = encode_question("Which organ shows a lesion in the left lobe?", tok, max_length=6)
    np.testing.assert_array_equal(
        out["question_ids"], ids_of(tok, ["[CLS]", "which", "organ", "shows", "a", "[SEP]"])
    )
    np.testing.assert_array_equal(out["question_mask"], [1] * 6)
