"""`scripts/parity_dump.py` on a fixture of another size and LLM family (Llama), built here.

The fixture is written in the golden format (the authors' sub-config dicts, module-path keys,
their inputs) from transformers models with random weights; the dump's tensors are then checked
against those transformers models run independently on the same inputs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from med2e3_jax.checkpoint.writers import write_safetensors  # noqa: E402
from torch_weights_for_tests import randomize  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..")
SLICES, SIZE, PATCH_3D, PATCH_2D = 16, 32, (4, 8, 8), 8  # 3D grid (4,4,4) -> pooled (2,2,2): 2 depth groups
D = 48


@pytest.fixture(scope="module")
def llama_fixture(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_fixture")
    llm_cfg = transformers.LlamaConfig(
        vocab_size=200, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    siglip_cfg = transformers.SiglipVisionConfig(
        image_size=SIZE, patch_size=PATCH_2D, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
        num_attention_heads=2,
    )
    bert_cfg = transformers.BertConfig(
        vocab_size=120, hidden_size=36, num_hidden_layers=1, num_attention_heads=3, intermediate_size=20,
        max_position_embeddings=16,
    )
    llm = transformers.LlamaForCausalLM(llm_cfg).eval()
    siglip = transformers.SiglipVisionModel(siglip_cfg).eval()
    bert = transformers.BertModel(bert_cfg, add_pooling_layer=True).eval()
    for seed, module in enumerate((llm, siglip, bert)):
        randomize(module, seed)

    rng = np.random.default_rng(0)
    c3, grid = 20, (SLICES // PATCH_3D[0]) * (SIZE // PATCH_3D[1]) ** 2
    tensors = {f"llm.{k}": v.numpy() for k, v in llm.state_dict().items()}
    tensors.update({f"vision2d_model.vision2d_encoder.vision_model.{k}": v.numpy() for k, v in siglip.state_dict().items()})
    tensors.update({f"vision3d_model.vision3d_encoder.language_encoder.{k}": v.numpy() for k, v in bert.state_dict().items()})
    vit = {"cls_token": (1, 1, c3), "patch_embedding.position_embeddings": (1, grid, c3),
           "patch_embedding.patch_embeddings.1.weight": (c3, int(np.prod(PATCH_3D))),
           "patch_embedding.patch_embeddings.1.bias": (c3,), "norm.weight": (c3,), "norm.bias": (c3,)}
    for name, shape in {"norm1.weight": (c3,), "norm1.bias": (c3,), "attn.qkv.weight": (3 * c3, c3),
                        "attn.out_proj.weight": (c3, c3), "attn.out_proj.bias": (c3,), "norm2.weight": (c3,),
                        "norm2.bias": (c3,), "mlp.linear1.weight": (32, c3), "mlp.linear1.bias": (32,),
                        "mlp.linear2.weight": (c3, 32), "mlp.linear2.bias": (c3,)}.items():
        vit[f"blocks.0.{name}"] = shape
    for name, shape in vit.items():
        tensors[f"vision3d_model.vision3d_encoder.vision_encoder.{name}"] = rng.normal(0, 0.3, shape).astype(np.float32)
    for prefix, width in (("vision2d_connector", 24), ("vision3d_connector", c3)):
        tensors[f"{prefix}._connector.0.weight"] = rng.normal(0, 0.3, (D, width)).astype(np.float32)
        tensors[f"{prefix}._connector.0.bias"] = rng.normal(0, 0.1, (D,)).astype(np.float32)
        tensors[f"{prefix}._connector.2.weight"] = rng.normal(0, 0.3, (D, D)).astype(np.float32)
        tensors[f"{prefix}._connector.2.bias"] = rng.normal(0, 0.1, (D,)).astype(np.float32)
    tensors["vision3d_connector.text_mlp.weight"] = rng.normal(0, 1.0, (D, 36)).astype(np.float32)
    tensors["vision3d_connector.text_mlp.bias"] = rng.normal(0, 0.1, (D,)).astype(np.float32)
    write_safetensors(tensors, directory / "model.safetensors")

    config = {
        "med2e3_config": {"llm_max_length": 768},
        "llm_config": llm_cfg.to_dict(),
        "vision2d_model_config": siglip_cfg.to_dict(),
        "vision3d_model_config": {"img_size": [SLICES, SIZE, SIZE], "patch_size": list(PATCH_3D), "hidden_size": c3,
                                  "mlp_dim": 32, "num_layers": 1, "num_heads": 4, "in_channels": 1,
                                  "pos_embed": "perceptron"},
        "bert_config": bert_cfg.to_dict(),
        "vision3d_connector_config": {"num_patches_pre": [4, 4, 4], "num_patches_post": [2, 2, 2], "temperature": 5},
        "special_tokens": {"input_ids_padding_value": 0},
    }
    (directory / "config.json").write_text(json.dumps(config))
    P = -201
    input_ids = np.array([[1, 5, 6, P, 7, 8, 9, 2], [1, 11, P, 12, 2, 0, 0, 0]])
    mask = input_ids != 0
    labels = np.where(np.arange(8) >= 5, input_ids, -100)
    questions = np.array([[101, 30, 31, 32, 102, 0], [101, 40, 102, 0, 0, 0]])
    np.savez(directory / "inputs.npz", vision3d=rng.uniform(size=(2, 1, SLICES, SIZE, SIZE)).astype(np.float32),
             input_ids=input_ids, attention_mask=mask, labels=labels, questions=questions,
             questions_mask=(questions != 0).astype(np.int64))
    return directory, llm, siglip, bert


@pytest.fixture(scope="module")
def dumped(llama_fixture, tmp_path_factory):
    directory = llama_fixture[0]
    out = tmp_path_factory.mktemp("dump") / "ours.npz"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "parity_dump.py"), "--fixture", str(directory),
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    return dict(np.load(out))


def test_dump_has_every_fixture_tensor_at_this_size(dumped):
    assert dumped["v3d_block_outputs"].shape == (1, 2, 1 + 64, 20)
    assert dumped["v2d_slice_tokens"].shape == (2, SLICES, 16, D)
    assert dumped["score_logits"].shape == (2, SLICES)
    assert dumped["vision_tokens"].shape == (2, 8 + 16, D)  # 8 pooled 3D tokens + 16 slice tokens
    assert dumped["inputs_embeds"].shape == (2, 8 - 1 + 24, D)
    np.testing.assert_array_equal(dumped["vision_start"], [3, 2])


def test_slice_encoder_output_equals_transformers_siglip(llama_fixture, dumped):
    _, _, siglip, _ = llama_fixture
    volume = np.load(llama_fixture[0] / "inputs.npz")["vision3d"]
    images = torch.from_numpy(volume).transpose(1, 2).reshape(2 * SLICES, 1, SIZE, SIZE).expand(-1, 3, -1, -1)
    with torch.no_grad():
        reference = siglip(pixel_values=images, output_hidden_states=True).hidden_states[-1].numpy()
    np.testing.assert_allclose(dumped["v2d_selected"], reference, atol=1e-5, rtol=1e-5)


def test_question_feature_equals_transformers_bert_pooler(llama_fixture, dumped):
    _, _, _, bert = llama_fixture
    inputs = np.load(llama_fixture[0] / "inputs.npz")
    with torch.no_grad():
        reference = bert(torch.from_numpy(inputs["questions"]), torch.from_numpy(inputs["questions_mask"])).pooler_output
    np.testing.assert_allclose(dumped["text_pooler"], reference.numpy(), atol=1e-5, rtol=1e-5)


def test_logits_and_loss_equal_transformers_llama_on_the_merged_embeddings(llama_fixture, dumped):
    _, llm, _, _ = llama_fixture
    with torch.no_grad():
        out = llm(inputs_embeds=torch.from_numpy(dumped["inputs_embeds"]),
                  attention_mask=torch.from_numpy(dumped["merged_attention_mask"]).long(),
                  labels=torch.from_numpy(dumped["merged_labels"]))
    valid = dumped["merged_attention_mask"] > 0
    np.testing.assert_allclose(dumped["logits"][valid], out.logits.numpy()[valid], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dumped["loss"], out.loss.item(), rtol=1e-5)
