"""A random checkpoint of a Med-2E3 config in the authors' release layout, plus its LLM as an HF checkpoint.

    python benchmarks/make_release_checkpoint.py --config configs/med2e3_m3d.py --out DIR [--seed 0]

writes

    DIR/release/{llm,vision2d_model,vision2d_connector,vision3d_model,vision3d_connector}/pytorch_model.bin
        what the authors release (`shiym2000/Med-2E3-M3D`): one `torch.save`d state dict per sub-module,
        its module path stripped, bf16; the tensors their model holds but never uses (SigLIP's
        `post_layernorm` and MAP head, M3D-CLIP's final `norm`, `mm_*_proj`, `logit_scale`) included;
    DIR/llm_hf/config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json
        the same LLM tensors as an HF `*ForCausalLM` checkpoint (e.g. Phi-3-mini-128k-instruct).

Nothing the size of the model is built: names and shapes come from `nnx.eval_shape` of the model and the
port table's export direction, and each tensor is drawn when it is written, from a generator seeded by
(seed, key), so that both outputs hold the same values. Memory peaks at the largest release folder (the
LLM: `torch.save` holds its state dict whole, 7.6 GB for Phi-3-mini) or one safetensors shard.

Values are N(0, 0.02²), norm scales 1 + N(0, 0.02²): a forward pass through them stays finite.
"""

import json
import logging
import os
import resource
import time
import zlib
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from med2e3_jax.checkpoint.importer import param_specs
from med2e3_jax.checkpoint.med2e3_port import FULL_TABLE
from med2e3_jax.checkpoint.port import path_str
from med2e3_jax.checkpoint.sources import RELEASE_PREFIXES
from med2e3_jax.checkpoint.writers import write_release_layout, write_sharded_safetensors
from med2e3_jax.models.med2e3 import Med2E3

config_flags.DEFINE_config_file("config", "configs/med2e3_m3d.py", "experiment config (its `model` is used)",
                                lock_config=False)
flags.DEFINE_string("out", None, "output directory (gets release/ and llm_hf/)")
flags.DEFINE_integer("seed", 0, "seed of the random values")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "dtype of every tensor written")
flags.DEFINE_float("max_shard_gb", 5.0, "largest LLM safetensors shard, GB (10^9 bytes); HF's Phi-3 uses 5")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS

RELEASE_DIR = "release"
LLM_DIR = "llm_hf"
LLM_PREFIX = RELEASE_PREFIXES["llm"]
_SIGLIP = "vision2d_model.vision2d_encoder.vision_model."
_M3D_CLIP = "vision3d_model.vision3d_encoder."
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
_HF_ARCHITECTURE = {"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def release_tensor_specs(cfg) -> dict[str, tuple[tuple[int, ...], float]]:
    """Module-path key -> (torch shape, mean of its random values) of every tensor the release holds.

    The model's parameters are named by `FULL_TABLE` (export direction) from an abstract model; the
    tensors the authors' model holds but never uses are added from the config.
    """
    abstract = nnx.eval_shape(lambda: Med2E3(cfg, rngs=nnx.Rngs(0)))
    specs = {}
    for path, (shape, _) in param_specs(abstract).items():
        found = FULL_TABLE.source_for(path_str(path))
        if found is None:
            raise ValueError(f"no port rule exports parameter {path_str(path)} {list(shape)}")
        key, transform = found
        torch_shape = transform.to_torch(np.broadcast_to(np.zeros((), np.float32), shape)).shape
        # LayerNorm `scale` and RMSNorm `weight` (the only 1-D `weight`s) multiply: centre them on 1.
        is_norm_scale = path[-1] == "scale" or (path[-1] == "weight" and len(shape) == 1)
        specs[key] = (tuple(torch_shape), 1.0 if is_norm_scale else 0.0)
    for key, shape in unused_release_tensors(cfg, specs).items():
        if not FULL_TABLE.is_unused(key):
            raise AssertionError(f"{key} is written as unused but FULL_TABLE does not list it as unused")
        specs[key] = (shape, 0.0)
    return specs


def unused_release_tensors(cfg, model_keys) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the tensors of the authors' SigLIP and M3D-CLIP that Med-2E3 holds but never uses."""
    h2, i2, h3 = cfg.vision2d.hidden_size, cfg.vision2d.intermediate_size, cfg.vision3d.hidden_size
    unused = {}
    if any(k.startswith(_SIGLIP) for k in model_keys):
        unused.update({
            _SIGLIP + "post_layernorm.weight": (h2,), _SIGLIP + "post_layernorm.bias": (h2,),
            _SIGLIP + "head.probe": (1, 1, h2),
            _SIGLIP + "head.attention.in_proj_weight": (3 * h2, h2), _SIGLIP + "head.attention.in_proj_bias": (3 * h2,),
            _SIGLIP + "head.attention.out_proj.weight": (h2, h2), _SIGLIP + "head.attention.out_proj.bias": (h2,),
            _SIGLIP + "head.layernorm.weight": (h2,), _SIGLIP + "head.layernorm.bias": (h2,),
            _SIGLIP + "head.mlp.fc1.weight": (i2, h2), _SIGLIP + "head.mlp.fc1.bias": (i2,),
            _SIGLIP + "head.mlp.fc2.weight": (h2, i2), _SIGLIP + "head.mlp.fc2.bias": (h2,),
        })
    # M3D-CLIP's contrastive projections are Linear(hidden, hidden) of the ViT's width, both of them.
    unused.update({
        _M3D_CLIP + "vision_encoder.norm.weight": (h3,), _M3D_CLIP + "vision_encoder.norm.bias": (h3,),
        _M3D_CLIP + "mm_vision_proj.weight": (h3, h3), _M3D_CLIP + "mm_vision_proj.bias": (h3,),
        _M3D_CLIP + "mm_language_proj.weight": (h3, h3), _M3D_CLIP + "mm_language_proj.bias": (h3,),
        _M3D_CLIP + "logit_scale": (),
    })
    return unused


class RandomTensors(Mapping):
    """Key -> a random array drawn on access, the same on every access (seeded by seed and key)."""

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], float]], seed: int, dtype):
        self._specs = dict(specs)
        self._seed = seed
        self._dtype = np.dtype(dtype)

    def __getitem__(self, key: str) -> np.ndarray:
        shape, mean = self._specs[key]
        rng = np.random.default_rng([self._seed, zlib.crc32(key.encode())])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= 0.02
        values += mean
        return values.astype(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def nbytes(self, keys=None) -> int:
        keys = self._specs if keys is None else keys
        return sum(int(np.prod(self._specs[k][0], dtype=np.int64)) for k in keys) * self._dtype.itemsize


def hf_llm_config(llm, torch_dtype: str) -> dict:
    """The transformers `config.json` (4.x form, as on the hub) of an `llm` sub-config: the inverse of
    `llm_port.llm_config_from_hf`."""
    hf = dict(
        architectures=[_HF_ARCHITECTURE[llm.family]], model_type=llm.family,
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, max_position_embeddings=llm.max_position_embeddings,
        tie_word_embeddings=llm.tie_word_embeddings, initializer_range=llm.get("initializer_range", 0.02),
        bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id, pad_token_id=llm.pad_token_id,
        hidden_act="silu", torch_dtype=torch_dtype, rope_scaling=None,
    )
    if llm.get("head_dim"):
        hf["head_dim"] = llm.head_dim
    if llm.get("partial_rotary_factor", 1.0) != 1.0:
        hf["partial_rotary_factor"] = llm.partial_rotary_factor
    scaling = llm.get("rope_scaling")
    if scaling is not None and scaling.type == "longrope":
        hf["rope_scaling"] = dict(type="longrope", short_factor=list(scaling.short_factor),
                                  long_factor=list(scaling.long_factor))
        hf["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    elif scaling is not None and scaling.type == "llama3":
        hf["rope_scaling"] = dict(
            rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    elif scaling is not None:
        raise ValueError(f"llm.rope_scaling.type {scaling.type!r} has no transformers config form here")
    if llm.family == "phi3":
        hf["sliding_window"] = llm.get("sliding_window")
    if llm.family == "qwen2":
        hf["use_sliding_window"] = False
    return hf


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def _directory_gb(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory)
               for name in names) / 1e9


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    cfg = FLAGS.config.model
    start = time.perf_counter()
    tensors = RandomTensors(release_tensor_specs(cfg), FLAGS.seed, _DTYPES[FLAGS.dtype])
    print(f"{len(tensors)} tensors, {tensors.nbytes() / 1e9:.2f} GB ({FLAGS.dtype}); names and shapes in "
          f"{time.perf_counter() - start:.1f}s", flush=True)

    release = os.path.join(FLAGS.out, RELEASE_DIR)
    start = time.perf_counter()
    folders = write_release_layout(tensors, release)
    release_s = time.perf_counter() - start
    print(f"wrote {release} ({', '.join(folders)}): {_directory_gb(release):.2f} GB in {release_s:.1f}s", flush=True)

    llm_dir = os.path.join(FLAGS.out, LLM_DIR)
    llm_keys = [k for k in tensors if k.startswith(LLM_PREFIX)]
    start = time.perf_counter()
    shards = write_sharded_safetensors(((k[len(LLM_PREFIX):], tensors[k]) for k in llm_keys), llm_dir,
                                       max_shard_bytes=int(FLAGS.max_shard_gb * 1e9))
    with open(os.path.join(llm_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_llm_config(cfg.llm, FLAGS.dtype), f, indent=2)
    llm_s = time.perf_counter() - start
    print(f"wrote {llm_dir} ({len(shards)} shards): {_directory_gb(llm_dir):.2f} GB in {llm_s:.1f}s", flush=True)
    print(f"RESULT release_write_s={release_s:.1f} release_gb={_directory_gb(release):.2f} "
          f"llm_safetensors_write_s={llm_s:.1f} peak_rss_gb={_peak_rss_gb():.2f}")


if __name__ == "__main__":
    app.run(main)
