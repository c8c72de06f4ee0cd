"""One record to the model's inputs (data_pipelines/model_inputs.py), shared by the pipeline, generation
and evaluation; records validated once; one rule for the ids that end an answer."""

import numpy as np
import pytest

from data_pipelines import model_inputs, pipeline, synthetic
from data_pipelines.annotations import load_records
from data_pipelines.errors import RecordError
from data_pipelines.image_placeholder import IGNORE_INDEX, IMAGE3D_TOKEN_ID
from data_pipelines.preprocess import preprocess_volume
from data_pipelines.readers import read_volume
from data_pipelines.tiny_tokenizers import bert_like, llama_like, phi_like
from med2e3_jax.data_config import data_config

SHAPE = (8, 16, 16)
SPEC = model_inputs.InputSpec(volume_shape=SHAPE, num_vision_tokens=4, max_length=96, question_max_length=16)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(out, num=3, seed=5, shape=SHAPE, formats=("npy",))
    return load_records(out / "annotations/npy/vqa_train.json", out)


def test_the_generation_prompt_is_the_training_example_up_to_its_answer(records):
    tokenizer, question_tokenizer = phi_like(), bert_like()
    record = records[0]
    train = model_inputs.record_inputs(record, SPEC, tokenizer, question_tokenizer)
    prompt = model_inputs.record_inputs(record, SPEC, tokenizer, question_tokenizer, generation=True)
    answer_start = int(np.flatnonzero(train["labels"] != IGNORE_INDEX)[0])
    length = int(prompt["attention_mask"].sum())
    # The answer's first label is the token after the prompt: the prompt ends where supervision begins.
    assert length == answer_start
    np.testing.assert_array_equal(prompt["input_ids"][:length], train["input_ids"][:length])
    assert (prompt["labels"] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(prompt["question_ids"], train["question_ids"])
    expected_volume = preprocess_volume(read_volume(record["vision3d"][0]), shape=SHAPE, modality="auto")
    np.testing.assert_array_equal(prompt["volume"], expected_volume)
    assert (prompt["input_ids"] == IMAGE3D_TOKEN_ID).sum() == SPEC.num_vision_tokens


def test_the_pipeline_makes_what_record_inputs_makes(records):
    tokenizer, question_tokenizer = phi_like(), bert_like()
    cfg = data_config()
    cfg.update(volume_shape=SHAPE, modality="auto", max_length=96, num_vision_tokens=4, question_max_length=16,
               batch_size=len(records), shuffle=False, num_epochs=1, read_threads=1, augment=False)
    batch = next(iter(pipeline.make_dataset(records, cfg, train=False, tokenizer=tokenizer,
                                            question_tokenizer=question_tokenizer)))
    for row, record in enumerate(records):
        direct = model_inputs.record_inputs(record, SPEC, tokenizer, question_tokenizer)
        for key, value in direct.items():
            np.testing.assert_array_equal(batch[key][row], value, err_msg=key)


def test_a_question_becomes_a_valid_record_with_the_placeholder_first():
    record = model_inputs.question_record("scan.nii.gz", "Which organ has a lesion?")
    assert record["conversations"] == [{"from": "human", "value": "<image3d>\nWhich organ has a lesion?"}]
    assert record["question"] == "Which organ has a lesion?" and record["vision3d"] == ["scan.nii.gz"]
    history = [{"from": "human", "value": "Is there a lesion?"}, {"from": "gpt", "value": "Yes."}]
    follow_up = model_inputs.question_record("scan.nii.gz", "Where?", history=history)
    assert follow_up["conversations"][0]["value"] == "<image3d>\nIs there a lesion?"
    assert follow_up["conversations"][-1] == {"from": "human", "value": "Where?"}
    with pytest.raises(RecordError, match="<image3d>"):
        model_inputs.question_record("scan.nii.gz", "<image3d> twice <image3d>")


def test_an_answer_stops_at_the_round_end_the_tokenizer_eos_and_the_configs_eos_never_unk():
    phi = phi_like()
    round_end = phi.convert_tokens_to_ids("<|endoftext|>")
    assert model_inputs.stop_ids(phi, "phi") == (round_end,)
    assert model_inputs.stop_ids(phi, "phi", eos_token_id=[7, round_end]) == tuple(sorted({7, round_end}))
    llama = llama_like()
    assert llama.unk_token_id not in model_inputs.stop_ids(llama, "llama", eos_token_id=llama.unk_token_id)
    assert llama.eos_token_id in model_inputs.stop_ids(llama, "llama")


def test_the_pipeline_validates_each_record_once_however_many_epochs(records, monkeypatch):
    calls = []
    validate = pipeline.validate_record

    def counting(record, **kwargs):
        calls.append(record.get("id"))
        return validate(record, **kwargs)

    monkeypatch.setattr(pipeline, "validate_record", counting)
    broken = dict(records[1], conversations=[{"from": "gpt", "value": "no question"}])
    data = [records[0], broken, records[2]]
    cfg = data_config()
    cfg.update(volume_shape=SHAPE, modality="auto", max_length=96, num_vision_tokens=4, question_max_length=16,
               batch_size=1, num_epochs=3, read_threads=1, max_skip_fraction=0.5)
    iterator = iter(pipeline.make_dataset(data, cfg, train=True, tokenizer=phi_like(), question_tokenizer=bert_like()))
    seen = [int(b["record_index"][0]) for b in iterator]
    assert sorted(calls) == sorted(r.get("id") for r in data)  # once each, not once per visit
    assert sorted(seen) == [0, 0, 0, 2, 2, 2]  # the broken record is skipped at each of its visits
    assert iterator.get_state()["skipped"] == 3
