"""M3D-CLIP's 3D ViT against the golden fixtures (made with monai 1.3.2, which cannot run here)."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from assets_for_tests import FIXTURES_ROOT
from flax import nnx

from med2e3_jax.checkpoint.importer import export_pytorch, load_pytorch
from med2e3_jax.checkpoint.port import CheckpointMismatchError, DictSource
from med2e3_jax.checkpoint.vit3d_port import VIT3D_TABLE, vit3d_config_from_reference
from med2e3_jax.models.vit3d import ViT3D

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURE_DIRS = sorted(p.parent for p in FIXTURES_ROOT.glob("*/model.safetensors"))
PREFIX = "vision3d_model.vision3d_encoder.vision_encoder."
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=FIXTURE_DIRS or [None], ids=lambda p: p.name if p else "none")
def golden(request):
    if request.param is None:
        pytest.skip(f"no golden fixture under {FIXTURES_ROOT}")
    from safetensors.numpy import load_file

    directory = request.param
    config = json.loads((directory / "config.json").read_text())
    state = {k[len(PREFIX):]: v for k, v in load_file(directory / "model.safetensors").items() if k.startswith(PREFIX)}
    return dict(
        name=directory.name,
        config=config,
        cfg=vit3d_config_from_reference(config["vision3d_model_config"]),
        state=state,
        inputs=np.load(directory / "inputs.npz"),
        outputs=np.load(directory / "outputs.npz"),
    )


def _imported(cfg, state):
    abstract = nnx.eval_shape(lambda: ViT3D(cfg, rngs=nnx.Rngs(0)))
    model, _ = load_pytorch(abstract, DictSource(state), VIT3D_TABLE)
    return model


def test_vit3d_matches_golden_fixture(golden):
    full_state = {PREFIX + k: v for k, v in golden["state"].items()}
    model, report = load_pytorch(
        nnx.eval_shape(lambda: ViT3D(golden["cfg"], rngs=nnx.Rngs(0))),
        DictSource(full_state),
        VIT3D_TABLE.prefixed(PREFIX, ""),
    )
    assert sorted(report.unused) == [PREFIX + "norm.bias", PREFIX + "norm.weight"]

    out = nnx.jit(lambda m, v: m(v))(model, golden["inputs"]["vision3d"])

    expected = golden["outputs"]
    got = {
        "v3d_patch_embed": out.patch_embed,
        "v3d_block_outputs": np.stack(out.hidden_states),
        "v3d_selected": out.patch_features,
    }
    for name, value in got.items():
        print(f"{golden['name']} {name}: max|diff| = {np.abs(np.asarray(value) - expected[name]).max():.3g}")
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], **TOL, err_msg=name)
    pooled_grid = golden["config"]["vision3d_connector_config"]["num_patches_pre"]
    assert model.grid == tuple(pooled_grid)


def test_vit3d_table_round_trips_bit_exact(golden):
    exported = export_pytorch(_imported(golden["cfg"], golden["state"]), VIT3D_TABLE)

    assert set(exported) == set(golden["state"]) - {"norm.weight", "norm.bias"}
    for key, value in exported.items():
        assert value.dtype == golden["state"][key].dtype and np.array_equal(value, golden["state"][key]), key


def test_wrong_shaped_position_embeddings_are_named(golden):
    state = dict(golden["state"])
    state["patch_embedding.position_embeddings"] = state["patch_embedding.position_embeddings"][:, :-1]

    with pytest.raises(CheckpointMismatchError, match=r"patch_embedding\.position_embeddings"):
        _imported(golden["cfg"], state)


def _tiny_cfg(**overrides):
    cfg = dict(
        in_channels=2,
        img_size=(4, 6, 4),
        patch_size=(2, 3, 2),
        hidden_size=24,  # = in_channels * prod(patch_size): the patch Linear can be the identity
        mlp_dim=8,
        num_layers=1,
        num_heads=2,
        layer_norm_eps=1e-5,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _rearrange_by_loops(volume, patch_size):
    """`b c (gz pz) (gy py) (gx px) -> b (gz gy gx) (pz py px c)`, spelled out index by index."""
    batch, channels, depth, height, width = volume.shape
    pz_, py_, px_ = patch_size
    gz_, gy_, gx_ = depth // pz_, height // py_, width // px_
    out = np.zeros((batch, gz_ * gy_ * gx_, pz_ * py_ * px_ * channels), volume.dtype)
    for b in range(batch):
        for gz in range(gz_):
            for gy in range(gy_):
                for gx in range(gx_):
                    token = (gz * gy_ + gy) * gx_ + gx
                    for pz in range(pz_):
                        for py in range(py_):
                            for px in range(px_):
                                for c in range(channels):
                                    feature = ((pz * py_ + py) * px_ + px) * channels + c
                                    out[b, token, feature] = volume[b, c, gz * pz_ + pz, gy * py_ + py, gx * px_ + px]
    return out


def test_patch_tokens_follow_the_monai_perceptron_layout():
    cfg = _tiny_cfg()
    model = ViT3D(cfg, rngs=nnx.Rngs(0))
    model.patch_embedding.kernel.set_value(np.eye(cfg.hidden_size, dtype=np.float32))
    model.patch_embedding.bias.set_value(np.zeros(cfg.hidden_size, np.float32))
    model.position_embeddings.set_value(np.zeros_like(model.position_embeddings.get_value()))
    # Distinct values everywhere, so that any permutation of axes shows.
    volume = np.arange(2 * 2 * 4 * 6 * 4, dtype=np.float32).reshape(2, 2, 4, 6, 4)

    out = model(volume)

    np.testing.assert_array_equal(out.patch_embed, _rearrange_by_loops(volume, cfg.patch_size))
    assert model.grid == (2, 2, 2)
    assert out.hidden_states[-1].shape == (2, 1 + 8, cfg.hidden_size)
    assert out.patch_features.shape == (2, 8, cfg.hidden_size)


def test_volume_of_the_wrong_shape_is_rejected_with_both_shapes():
    model = ViT3D(_tiny_cfg(), rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match=r"2, 4, 6, 4.*got \(1, 2, 4, 6, 5\)"):
        model(np.zeros((1, 2, 4, 6, 5), np.float32))


def test_img_size_not_divisible_by_patch_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ViT3D(_tiny_cfg(img_size=(4, 7, 4)), rngs=nnx.Rngs(0))


def test_config_from_reference_accepts_isotropic_ints_and_rejects_conv_embedding():
    reference = dict(in_channels=1, img_size=32, patch_size=[4, 16, 16], hidden_size=768, mlp_dim=3072,
                     num_layers=12, num_heads=12, pos_embed="perceptron")

    cfg = vit3d_config_from_reference(reference)

    assert cfg.img_size == (32, 32, 32) and cfg.patch_size == (4, 16, 16) and cfg.layer_norm_eps == 1e-5
    with pytest.raises(ValueError, match="perceptron"):
        vit3d_config_from_reference({**reference, "pos_embed": "conv"})
