"""all-MiniLM-L6-v2 (fetched from PyPI) as the TG-IS question encoder: strict import, parity with
transformers' BertModel, and a whole Med-2E3 whose question feature is 384 wide."""

import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from assets_for_tests import fetched  # noqa: E402
from configs import tiny  # noqa: E402
from data_pipelines.templates import encode_conversation, encode_question, load_tokenizer  # noqa: E402
from med2e3_jax import config as config_lib  # noqa: E402
from med2e3_jax.checkpoint.importer import params_numpy  # noqa: E402
from med2e3_jax.checkpoint.loading import load_med2e3  # noqa: E402
from med2e3_jax.checkpoint.med2e3_port import question_encoder_config  # noqa: E402
from med2e3_jax.checkpoint.port import CheckpointMismatchError  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

QUESTIONS = [
    "Which part of the volume holds the liver? Choices: A. the upper third B. the middle third "
    "C. the lower third D. not in the scan",
    "Is the SPLEEN in this scan?",
    "Which of these organs is largest in this scan?",
]
QUESTION_LENGTH = 40


@pytest.fixture(scope="module")
def minilm():
    return fetched("minilm")


def minilm_model_config(path):
    cfg = tiny.tiny_model()
    cfg.question_encoder = question_encoder_config(path)
    config_lib.validate_model_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def imported(minilm):
    model, reports = load_med2e3(minilm_model_config(minilm), components={"question_encoder": minilm})
    return model, reports


@pytest.fixture(scope="module")
def questions(minilm):
    tokenizer = load_tokenizer(minilm)
    encoded = [encode_question(q, tokenizer, max_length=QUESTION_LENGTH) for q in QUESTIONS]
    return np.stack([e["question_ids"] for e in encoded]), np.stack([e["question_mask"] for e in encoded])


def test_minilm_config_gives_the_question_width(minilm):
    cfg = question_encoder_config(minilm)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size) == (
        384, 6, 12, 1536, 30522)
    # A weights file names its folder as well.
    assert question_encoder_config(os.path.join(minilm, "model.safetensors")) == cfg


def test_minilm_imports_strictly_into_the_question_encoder_only(imported):
    model, (report,) = imported
    # 6 layers x 16 tensors + 5 embedding tensors + 2 pooler tensors; the position-id buffer is the only
    # tensor left out.
    assert len(report.mapped) == 6 * 16 + 5 + 2
    assert report.unused == ["embeddings.position_ids"]
    assert set(report.mapped.values()) == {
        v for v in report.mapped.values() if v.startswith("question_encoder.")
    }
    assert model.tgis.text_mlp.kernel.get_value().shape == (384, model.cfg.llm.hidden_size)


def test_minilm_hidden_states_and_pooler_match_transformers(minilm, imported, questions):
    model, _ = imported
    ids, mask = questions
    hf = transformers.BertModel.from_pretrained(minilm, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)))
    hidden, pooler = model.question_encoder(jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    assert mask.sum(axis=1).min() > 8 and not real.all(), "the batch must mix lengths, with padding"
    np.testing.assert_allclose(np.asarray(hidden)[real], reference.last_hidden_state.numpy()[real], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pooler), reference.pooler_output.numpy(), atol=1e-5, rtol=0)


def test_tiny_med2e3_with_minilm_runs_a_forward_and_its_slice_scores_follow_the_question(imported, questions):
    model, _ = imported
    cfg = model.cfg
    phi3 = load_tokenizer(fetched("tokenizers/phi3"))
    prompts = [
        encode_conversation(
            {"id": f"q{i}", "conversations": [{"from": "human", "value": "<image3d>\n" + q},
                                               {"from": "gpt", "value": "The liver."}]},
            phi3, template="phi", num_vision_tokens=config_lib.num_vision_tokens(cfg), max_length=cfg.llm_max_length,
        )
        for i, q in enumerate(QUESTIONS[:2])
    ]
    batch = {key: jnp.asarray(np.stack([p[key] for p in prompts])) for key in prompts[0]}
    volume = np.random.default_rng(0).uniform(size=(1, 1, *cfg.vision3d.img_size)).astype(np.float32)
    ids, mask = questions
    out, intermediates = nnx.capture(model, nnx.Intermediate)(
        jnp.asarray(np.repeat(volume, 2, axis=0)), batch["input_ids"], batch["attention_mask"], batch["labels"],
        jnp.asarray(ids[:2]), jnp.asarray(mask[:2]))
    assert intermediates["text_pooler"][...].shape == (2, 384)
    assert intermediates["text_mlp_out"][...].shape == (2, cfg.llm.hidden_size)
    assert out.logits.shape == (2, cfg.llm_max_length, cfg.llm.vocab_size)
    assert np.isfinite(float(out.loss)) and int(out.num_target_tokens) > 0
    scores = np.asarray(out.slice_scores)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    # Same volume, two questions: only the question feature differs, so it must move the scores.
    assert np.abs(scores[0] - scores[1]).max() > 1e-6


def _rewritten(minilm, folder, transform):
    """A copy of the MiniLM folder with its tensors passed through `transform(dict) -> dict`."""
    os.makedirs(folder)
    shutil.copy(os.path.join(minilm, "config.json"), folder)
    tensors = safetensors_numpy.load_file(os.path.join(minilm, "model.safetensors"))
    safetensors_numpy.save_file(transform(tensors), os.path.join(folder, "model.safetensors"))
    return folder


def test_checkpoint_without_pooler_fails_naming_the_missing_keys(minilm, tmp_path):
    folder = _rewritten(minilm, str(tmp_path / "no_pooler"),
                        lambda t: {k: v for k, v in t.items() if not k.startswith("pooler.")})
    with pytest.raises(CheckpointMismatchError) as caught:
        load_med2e3(minilm_model_config(folder), components={"question_encoder": folder})
    message = str(caught.value)
    assert "missing tensors (2)" in message
    assert "question_encoder.pooler.dense.kernel [384, 384] (torch key 'pooler.dense.weight')" in message
    assert "question_encoder.pooler.dense.bias [384] (torch key 'pooler.dense.bias')" in message


def test_bert_prefixed_checkpoint_with_a_pretraining_head_imports_the_same_weights(minilm, imported, tmp_path):
    def with_head(tensors):
        prefixed = {"bert." + k: v for k, v in tensors.items()}
        prefixed["cls.predictions.bias"] = np.zeros(30522, np.float32)
        return prefixed

    folder = _rewritten(minilm, str(tmp_path / "bert_prefixed"), with_head)
    model, (report,) = load_med2e3(minilm_model_config(folder), components={"question_encoder": folder})
    assert sorted(report.unused) == ["bert.embeddings.position_ids", "cls.predictions.bias"]
    reference, _ = imported
    ours, expected = params_numpy(model.question_encoder), params_numpy(reference.question_encoder)
    assert ours.keys() == expected.keys() and len(ours) == 6 * 16 + 5 + 2
    for path, value in expected.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=str(path))

def test_question_encoder_config_names_a_missing_or_foreign_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        question_encoder_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="'roberta'"):
        question_encoder_config(str(tmp_path))
