"""BERT question encoder: parity with HF `BertModel` and with M3D-CLIP's `language_encoder` in the fixture."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from assets_for_tests import PUBLIC_FIXTURE as FIXTURE
from flax import nnx
from torch_weights_for_tests import randomize

from med2e3_jax.checkpoint.bert_port import BERT_TABLE, bert_config_from_hf
from med2e3_jax.checkpoint.importer import export_pytorch, load_pytorch
from med2e3_jax.checkpoint.port import DictSource
from med2e3_jax.models.bert import BertEncoder

FIXTURE_PREFIX = "vision3d_model.vision3d_encoder.language_encoder."

# head_dim 12 is not a power of two: transformers 4.x divides the scores by sqrt(12), 5.x multiplies by
# 12**-0.5, which differ in the last bit; hence atol 1e-5 rather than bit-level expectations.
TINY_HF = dict(
    vocab_size=50,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
)
LENGTHS = (10, 7, 4)


def _import(cfg, tensors, table):
    abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
    return load_pytorch(abstract, DictSource(tensors), table)


@pytest.fixture(scope="module")
def hf_and_ours():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(**TINY_HF, attn_implementation="eager")
    torch_model = transformers.BertModel(hf_config).eval()
    randomize(torch_model, seed=0)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model, _ = _import(bert_config_from_hf(hf_config.to_dict()), state, BERT_TABLE)

    rng = np.random.default_rng(0)
    length = max(LENGTHS)
    mask = (np.arange(length)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(1, TINY_HF["vocab_size"], size=mask.shape), 0)
    token_types = np.where(mask, rng.integers(0, 2, size=mask.shape), 0)

    def hf(token_type_ids):
        with torch.no_grad():
            out = torch_model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                token_type_ids=None if token_type_ids is None else torch.from_numpy(token_type_ids),
            )
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()

    return dict(model=model, state=state, ids=ids, mask=mask, token_types=token_types, hf=hf)


@pytest.mark.parametrize("with_token_types", [False, True], ids=["token_types_default_zero", "token_types_given"])
def test_encoder_matches_hf_on_padded_batch(hf_and_ours, with_token_types):
    token_types = hf_and_ours["token_types"] if with_token_types else None
    hf_hidden, hf_pooler = hf_and_ours["hf"](token_types)
    hidden, pooler = hf_and_ours["model"](
        jnp.asarray(hf_and_ours["ids"]),
        jnp.asarray(hf_and_ours["mask"]),
        None if token_types is None else jnp.asarray(token_types),
    )
    real = hf_and_ours["mask"].astype(bool)
    assert hidden.shape == hf_hidden.shape and pooler.shape == hf_pooler.shape
    np.testing.assert_allclose(np.asarray(hidden)[real], hf_hidden[real], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pooler), hf_pooler, atol=1e-5, rtol=0)


def test_padded_tokens_do_not_change_real_outputs(hf_and_ours):
    model, ids, mask = hf_and_ours["model"], hf_and_ours["ids"], hf_and_ours["mask"]
    other_padding = np.where(mask, ids, TINY_HF["vocab_size"] - 1)
    real = mask.astype(bool)
    hidden, pooler = model(jnp.asarray(ids), jnp.asarray(mask))
    hidden_other, pooler_other = model(jnp.asarray(other_padding), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(hidden_other)[real], np.asarray(hidden)[real], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(pooler_other), np.asarray(pooler), atol=1e-6, rtol=0)


def test_export_returns_the_imported_torch_tensors(hf_and_ours):
    exported = export_pytorch(hf_and_ours["model"], BERT_TABLE)
    assert exported.keys() == hf_and_ours["state"].keys()
    for key, value in hf_and_ours["state"].items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_encoder_rejects_questions_longer_than_its_position_table():
    model = nnx.eval_shape(lambda: BertEncoder(bert_config_from_hf(TINY_HF), rngs=nnx.Rngs(0)))
    ids = jnp.zeros((1, TINY_HF["max_position_embeddings"] + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        model(ids, jnp.ones_like(ids))


def test_config_fills_hf_defaults_and_rejects_relative_positions():
    cfg = bert_config_from_hf({"model_type": "bert"})
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.hidden_act) == (30522, 768, 12, "gelu")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        bert_config_from_hf({"position_embedding_type": "relative_key"})


def test_question_cls_and_pooler_match_authors_code():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    config = json.loads((FIXTURE / "config.json").read_text())
    everything = safetensors_numpy.load_file(FIXTURE / "model.safetensors")
    tensors = {k: v for k, v in everything.items() if k.startswith(FIXTURE_PREFIX)}
    model, _ = _import(bert_config_from_hf(config["bert_config"]), tensors, BERT_TABLE.prefixed(FIXTURE_PREFIX, ""))
    inputs, outputs = np.load(FIXTURE / "inputs.npz"), np.load(FIXTURE / "outputs.npz")

    hidden, pooler = nnx.jit(lambda m, ids, mask: m(ids, mask))(
        model, jnp.asarray(inputs["questions"]), jnp.asarray(inputs["questions_mask"])
    )
    np.testing.assert_allclose(np.asarray(hidden[:, 0]), outputs["text_cls_hidden"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooler), outputs["text_pooler"], atol=1e-5, rtol=1e-5)
