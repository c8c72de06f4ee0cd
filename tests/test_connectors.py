"""The MLP connectors and the 3D spatial pooling, against torch and the golden fixtures."""

import json

import jax
import numpy as np
import pytest
from assets_for_tests import FIXTURES_ROOT
from flax import nnx

from med2e3_jax.checkpoint.connector_port import CONNECTOR_TABLE
from med2e3_jax.checkpoint.importer import export_pytorch, load_pytorch
from med2e3_jax.checkpoint.port import DictSource
from med2e3_jax.models.connectors import MLPConnector, spatial_avg_pool

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURE_DIRS = sorted(p.parent for p in FIXTURES_ROOT.glob("*/model.safetensors"))
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=FIXTURE_DIRS or [None], ids=lambda p: p.name if p else "none")
def golden(request):
    if request.param is None:
        pytest.skip(f"no golden fixture under {FIXTURES_ROOT}")
    from safetensors.numpy import load_file

    directory = request.param
    return dict(
        name=directory.name,
        config=json.loads((directory / "config.json").read_text()),
        state=load_file(directory / "model.safetensors"),
        inputs=np.load(directory / "inputs.npz"),
        outputs=np.load(directory / "outputs.npz"),
    )


def _connector(golden, prefix):
    """The `prefix` connector of the fixture, imported through CONNECTOR_TABLE."""
    state = {k[len(prefix):]: v for k, v in golden["state"].items() if k.startswith(prefix + "_connector.")}
    in_dim = state["_connector.0.weight"].shape[1]
    out_dim = state["_connector.0.weight"].shape[0]
    abstract = nnx.eval_shape(lambda: MLPConnector(in_dim, out_dim, rngs=nnx.Rngs(0)))
    model, _ = load_pytorch(abstract, DictSource(state), CONNECTOR_TABLE)
    return model, state


def _report(golden, name, got):
    print(f"{golden['name']} {name}: max|diff| = {np.abs(np.asarray(got) - golden['outputs'][name]).max():.3g}")
    np.testing.assert_allclose(got, golden["outputs"][name], **TOL, err_msg=name)


@pytest.mark.parametrize("grid, stride", [((8, 4, 4), 2), ((5, 3, 7), 2), ((3, 4, 5), (1, 2, 3))])
def test_spatial_avg_pool_matches_torch_avg_pool3d_with_floor(grid, stride):
    torch = pytest.importorskip("torch")
    batch, embed = 2, 3
    tokens = np.random.default_rng(0).normal(size=(batch, int(np.prod(grid)), embed)).astype(np.float32)
    # The authors' seq -> cube -> pool -> seq, depth outermost.
    cube = torch.from_numpy(tokens).reshape(batch, *grid, embed).permute(0, 4, 1, 2, 3)
    pooled = torch.nn.functional.avg_pool3d(cube, kernel_size=stride, stride=stride)
    expected = pooled.flatten(2).transpose(1, 2).numpy()

    got = spatial_avg_pool(tokens, grid, stride)

    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_spatial_avg_pool_rejects_tokens_that_do_not_fill_the_grid():
    with pytest.raises(ValueError, match=r"7 tokens .* \(2, 2, 2\)"):
        spatial_avg_pool(np.zeros((1, 7, 3), np.float32), (2, 2, 2), 2)


def test_3d_pooling_and_connector_match_golden_fixture(golden):
    connector_config = golden["config"]["vision3d_connector_config"]
    pre, post = connector_config["num_patches_pre"], connector_config["num_patches_post"]
    stride = tuple(a // b for a, b in zip(pre, post))
    connector, _ = _connector(golden, "vision3d_connector.")

    pooled = spatial_avg_pool(golden["outputs"]["v3d_selected"], tuple(pre), stride)
    _report(golden, "v3d_pooled", pooled)
    # From the reference pooled tokens, so that each stage is checked on its own.
    _report(golden, "v3d_tokens", connector(golden["outputs"]["v3d_pooled"]))


def test_2d_connector_matches_golden_fixture(golden):
    connector, _ = _connector(golden, "vision2d_connector.")
    batch, _, slices = golden["inputs"]["vision3d"].shape[:3]
    slice_features = golden["outputs"]["v2d_selected"]  # (batch * slices, tokens, embed), batch-major

    tokens = connector(slice_features)
    _report(golden, "v2d_slice_tokens", tokens.reshape(batch, slices, *tokens.shape[1:]))


def test_connector_table_round_trips_bit_exact(golden):
    connector, state = _connector(golden, "vision3d_connector.")

    exported = export_pytorch(connector, CONNECTOR_TABLE)

    assert set(exported) == set(state)
    for key, value in exported.items():
        assert value.dtype == state[key].dtype and np.array_equal(value, state[key]), key
