"""SigLIP slice encoder: parity with HF `SiglipVisionModel` and with the authors' Med-2E3 forward."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from assets_for_tests import PUBLIC_FIXTURE as FIXTURE
from flax import nnx
from torch_weights_for_tests import randomize

from med2e3_jax.checkpoint.importer import export_pytorch, load_pytorch
from med2e3_jax.checkpoint.port import DictSource
from med2e3_jax.checkpoint.siglip_port import SIGLIP_TABLE, siglip_config_from_hf
from med2e3_jax.models.siglip import SiglipVisionTower

FIXTURE_PREFIX = "vision2d_model.vision2d_encoder.vision_model."

TINY_HF = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)


def _import(cfg, tensors, table):
    abstract = nnx.eval_shape(lambda: SiglipVisionTower(cfg, rngs=nnx.Rngs(0)))
    return load_pytorch(abstract, DictSource(tensors), table)


@pytest.fixture(scope="module")
def hf_and_ours():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.SiglipVisionConfig(**TINY_HF, attn_implementation="eager")
    torch_model = transformers.SiglipVisionModel(hf_config).eval()
    randomize(torch_model, seed=0)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model, report = _import(siglip_config_from_hf(hf_config.to_dict()), state, SIGLIP_TABLE)

    pixels = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        out = torch_model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    return dict(
        model=model,
        report=report,
        state=state,
        pixels=pixels,
        hf_last_layer=out.hidden_states[-1].numpy(),
        hf_post_layernorm=out.last_hidden_state.numpy(),
    )


def test_tower_matches_hf_last_encoder_layer(hf_and_ours):
    ours = np.asarray(hf_and_ours["model"](jnp.asarray(hf_and_ours["pixels"])))
    assert ours.shape == (3, 16, 32)
    np.testing.assert_allclose(ours, hf_and_ours["hf_last_layer"], atol=1e-5, rtol=0)


def test_grey_image_equals_hf_on_the_image_copied_to_every_channel(hf_and_ours):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.SiglipVisionConfig(**TINY_HF, attn_implementation="eager")
    torch_model = transformers.SiglipVisionModel(hf_config)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in hf_and_ours["state"].items()})
    grey = hf_and_ours["pixels"][..., :1]
    with torch.no_grad():
        copied = torch.from_numpy(np.repeat(grey, 3, axis=-1)).permute(0, 3, 1, 2)
        expected = torch_model.eval()(copied, output_hidden_states=True).hidden_states[-1].numpy()
    ours = np.asarray(hf_and_ours["model"](jnp.asarray(grey)))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_tower_output_is_taken_before_post_layernorm(hf_and_ours):
    ours = np.asarray(hf_and_ours["model"](jnp.asarray(hf_and_ours["pixels"])))
    assert np.abs(ours - hf_and_ours["hf_post_layernorm"]).max() > 1e-1


def test_import_accounts_for_post_layernorm_and_head_as_unused(hf_and_ours):
    unused = set(hf_and_ours["report"].unused)
    assert {"post_layernorm.weight", "post_layernorm.bias", "head.probe"} <= unused
    assert all(k.startswith(("post_layernorm.", "head.")) for k in unused)


def test_export_returns_the_imported_torch_tensors(hf_and_ours):
    exported = export_pytorch(hf_and_ours["model"], SIGLIP_TABLE)
    used = {k: v for k, v in hf_and_ours["state"].items() if not SIGLIP_TABLE.is_unused(k)}
    assert exported.keys() == used.keys()
    for key, value in used.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_tower_rejects_an_image_size_other_than_the_configured_one():
    cfg = siglip_config_from_hf(TINY_HF)
    model = nnx.eval_shape(lambda: SiglipVisionTower(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="32x32x3"):
        model(jnp.zeros((1, 48, 48, 3)))


def test_config_reads_vision_config_of_a_full_siglip_config_and_fills_hf_defaults():
    # A hub SiglipConfig stores only non-default vision fields (e.g. google/siglip-large-patch16-256).
    cfg = siglip_config_from_hf(
        {"model_type": "siglip", "text_config": {}, "vision_config": {
            "hidden_size": 1024, "image_size": 256, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 16}}
    )
    assert cfg.to_dict() == dict(
        image_size=256, patch_size=16, num_channels=3, hidden_size=1024, intermediate_size=4096,
        num_layers=24, num_heads=16, layer_norm_eps=1e-6,
    )


def test_config_rejects_an_activation_the_tower_does_not_compute():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        siglip_config_from_hf({**TINY_HF, "hidden_act": "relu"})


def _fold_slices(volume):
    """(batch, 1, slices, H, W) -> (batch*slices, H, W, 3): batch-major, the one channel copied to three.

    The authors' `transpose(1, 2).view(B*N, 1, H, W).expand(B*N, 3, H, W)`, channels-last, no normalisation.
    """
    batch, _, slices, height, width = volume.shape
    images = volume.transpose(0, 2, 3, 4, 1).reshape(batch * slices, height, width, 1)
    return np.broadcast_to(images, (batch * slices, height, width, 3))


def test_slice_tokens_match_authors_code():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    config = json.loads((FIXTURE / "config.json").read_text())
    cfg = siglip_config_from_hf(config["vision2d_model_config"])
    everything = safetensors_numpy.load_file(FIXTURE / "model.safetensors")
    tensors = {k: v for k, v in everything.items() if k.startswith(FIXTURE_PREFIX)}
    model, _ = _import(cfg, tensors, SIGLIP_TABLE.prefixed(FIXTURE_PREFIX, ""))
    volume = np.load(FIXTURE / "inputs.npz")["vision3d"]
    expected = np.load(FIXTURE / "outputs.npz")["v2d_selected"]

    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(_fold_slices(volume))))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)

