"""The model configuration: every architectural number of Med-2E3, with the released values as defaults.

`configs/*.py` build on `model_config()`; `validate_model_config` derives and checks the numbers that
the modules rely on (pooled 3D grid, depth groups, number of vision tokens, widths split into heads)
and raises a `ConfigError` naming the key, its value and what was expected.
"""

from __future__ import annotations

import ml_collections

SLICE_WEIGHTINGS = ("tgis", "mean", "max", "uniform")
VISION_TOKENS = ("3d+2d", "3d", "2d")
REMAT_POLICIES = ("none", "full", "dots")  # see models/remat.py
# `cudnn` runs cuDNN's fused attention where it accepts the call and XLA's otherwise (models/attention.py).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# Multi-window slice channels (`vision2d.slice_windows`): SigLIP's three image channels as three HU windows
# of the slice, lung (W1500 L-600), soft tissue (W400 L40) and bone (W1500 L300), as MedGemma packs CT
# windows into RGB, instead of one grey copy. The volume is already clipped to `vision2d.volume_window`,
# so a window reaching past it (bone's top) saturates there.
CT_SLICE_WINDOWS = ((-1350.0, 150.0), (-160.0, 240.0), (-450.0, 1050.0))

# microsoft/Phi-3-mini-128k-instruct (June 2024 update) LongRoPE factors; with the 768-token prompts
# of Med-2E3 only `short_factor` is ever used (padded length <= 4096).
PHI3_MINI_128K_SHORT_FACTOR = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979,
    1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662,
    1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
    1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533,
)
PHI3_MINI_128K_LONG_FACTOR = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
)


def model_config() -> ml_collections.ConfigDict:
    """The released Med-2E3-M3D: M3D-CLIP ViT-B, siglip-large-patch16-256, bert-base, Phi-3-mini-128k."""
    return ml_collections.ConfigDict(
        dict(
            # M3D-CLIP's 3D ViT (frozen in both stages).
            vision3d=dict(
                in_channels=1, img_size=(32, 256, 256), patch_size=(4, 16, 16), hidden_size=768,
                mlp_dim=3072, num_layers=12, num_heads=12, layer_norm_eps=1e-5,
            ),
            # The slice encoder: SigLIP vision tower, every slice replicated to 3 channels.
            vision2d=dict(
                image_size=256, patch_size=16, num_channels=3, hidden_size=1024, intermediate_size=4096,
                num_layers=24, num_heads=16, layer_norm_eps=1e-6,
                # (low, high) HU per image channel, or () for the grey slice in every channel (the
                # authors'); e.g. CT_SLICE_WINDOWS. volume_window: the HU range the volume's [0, 1] spans.
                slice_windows=(), volume_window=(-1000.0, 1000.0),
            ),
            # M3D-CLIP's BERT, whose pooler output is the TG-IS question feature.
            question_encoder=dict(
                vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
            ),
            llm=dict(
                family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
                num_heads=32, num_kv_heads=32, head_dim=None, rms_norm_eps=1e-5, rope_theta=10000.0,
                rope_scaling=dict(
                    type="longrope",
                    short_factor=list(PHI3_MINI_128K_SHORT_FACTOR),
                    long_factor=list(PHI3_MINI_128K_LONG_FACTOR),
                    original_max_position_embeddings=4096,
                ),
                max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=False,
                fused_qkv=True, fused_gate_up=True, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
            ),
            tgis=dict(
                pool_stride=2,  # 3D patch grid (8,16,16) -> (4,8,8) = 256 tokens
                temperature=5.0,  # hard-coded in the authors' connector (their `temperature` argument is ignored)
                dropout=0.1,  # on the slice scores, training only
                slice_weighting="tgis",
                vision_tokens="3d+2d",
            ),
            llm_max_length=768,
            dtype="float32",
            param_dtype="float32",
            attention_impl="xla",
            # What the backward pass recomputes of each LLM and SigLIP layer: 'none' keeps every
            # activation, 'full' only the layer inputs, 'dots' also the weight matmuls' outputs.
            remat_policy="none",
        )
    )


def pooled_grid(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(depth, height, width) of the 3D patch grid after the connector's average pooling (floor)."""
    v = cfg.vision3d
    grid = [size // patch for size, patch in zip(v.img_size, v.patch_size)]
    return tuple(g // cfg.tgis.pool_stride for g in grid)


def num_slices(cfg: ml_collections.ConfigDict) -> int:
    return cfg.vision3d.img_size[0]


def num_vision_tokens(cfg: ml_collections.ConfigDict) -> int:
    """How many positions the vision tokens take in the prompt: 3D tokens then aggregated slice tokens."""
    tokens_3d = pooled_grid(cfg)[0] * pooled_grid(cfg)[1] * pooled_grid(cfg)[2]
    tokens_2d = (cfg.vision2d.image_size // cfg.vision2d.patch_size) ** 2
    return {"3d+2d": tokens_3d + tokens_2d, "3d": tokens_3d, "2d": tokens_2d}[cfg.tgis.vision_tokens]


class ConfigError(ValueError):
    """A config value that cannot work; `key` is its dotted path (`llm.num_heads`)."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


def _positive_ints(node, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = node[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{prefix}.{name}={value!r}: expected a positive integer", key=f"{prefix}.{name}")


def _heads_divide(node, prefix: str, width: str = "hidden_size", heads: str = "num_heads") -> None:
    if node[width] % node[heads]:
        raise ConfigError(f"{prefix}.{width}={node[width]} is not divisible by {prefix}.{heads}={node[heads]}: "
                          f"each of the {node[heads]} attention heads takes an equal share of the width",
                          key=f"{prefix}.{width}")


def validate_towers(cfg: ml_collections.ConfigDict) -> None:
    """The sizes of the four transformers: positive, and each attention width split evenly into heads."""
    v3, v2, bert, llm = cfg.vision3d, cfg.vision2d, cfg.question_encoder, cfg.llm
    _positive_ints(v3, "vision3d", ("in_channels", "hidden_size", "mlp_dim", "num_layers", "num_heads"))
    for axis, (size, patch) in enumerate(zip(v3.img_size, v3.patch_size)):
        for name, value in (("img_size", size), ("patch_size", patch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"vision3d.{name}[{axis}]={value!r}: expected a positive integer",
                                  key=f"vision3d.{name}")
    _heads_divide(v3, "vision3d")
    _positive_ints(v2, "vision2d", ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                                    "num_layers", "num_heads"))
    _heads_divide(v2, "vision2d")
    if v2.image_size % v2.patch_size:
        raise ConfigError(f"vision2d.image_size={v2.image_size} is not a multiple of vision2d.patch_size="
                          f"{v2.patch_size}", key="vision2d.image_size")
    _positive_ints(bert, "question_encoder", ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                              "intermediate_size", "max_position_embeddings", "type_vocab_size"))
    _heads_divide(bert, "question_encoder")
    _positive_ints(llm, "llm", ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                "num_kv_heads", "max_position_embeddings"))
    if llm.get("head_dim") is None:
        _heads_divide(llm, "llm")  # an explicit head_dim (Qwen3-style) need not divide the width
    else:
        _positive_ints(llm, "llm", ("head_dim",))
    if llm.num_heads % llm.num_kv_heads:
        raise ConfigError(f"llm.num_heads={llm.num_heads} is not a multiple of llm.num_kv_heads={llm.num_kv_heads}: "
                          "each key/value head serves an equal group of query heads", key="llm.num_heads")


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (a ValueError) naming the config key whose value cannot work."""
    validate_towers(cfg)
    v3, v2, t = cfg.vision3d, cfg.vision2d, cfg.tgis
    for axis, (size, patch) in enumerate(zip(v3.img_size, v3.patch_size)):
        if size % patch:
            raise ConfigError(f"vision3d.img_size[{axis}]={size} is not a multiple of vision3d.patch_size[{axis}]={patch}",
                              key="vision3d.img_size")
    if v2.image_size != v3.img_size[1] or v2.image_size != v3.img_size[2]:
        raise ConfigError(
            f"vision2d.image_size={v2.image_size} must equal the volume's height and width "
            f"vision3d.img_size[1:]={tuple(v3.img_size[1:])}: slices go into SigLIP without resizing",
            key="vision2d.image_size",
        )
    windows = tuple(tuple(w) for w in v2.get("slice_windows", ()))
    if windows and (len(windows) != v2.num_channels or any(len(w) != 2 or not w[0] < w[1] for w in windows)):
        raise ConfigError(f"vision2d.slice_windows={windows}: expected {v2.num_channels} (low, high) HU pairs with "
                          "low < high, one per image channel, or () for grey slices", key="vision2d.slice_windows")
    if t.slice_weighting not in SLICE_WEIGHTINGS:
        raise ConfigError(f"tgis.slice_weighting must be one of {SLICE_WEIGHTINGS}, got {t.slice_weighting!r}",
                          key="tgis.slice_weighting")
    if cfg.get("remat_policy", "none") not in REMAT_POLICIES:
        raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {cfg.remat_policy!r}", key="remat_policy")
    if cfg.get("attention_impl", "xla") not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {cfg.attention_impl!r}",
                          key="attention_impl")
    if t.vision_tokens not in VISION_TOKENS:
        raise ConfigError(f"tgis.vision_tokens must be one of {VISION_TOKENS}, got {t.vision_tokens!r}",
                          key="tgis.vision_tokens")
    if isinstance(t.pool_stride, bool) or not isinstance(t.pool_stride, int) or t.pool_stride < 1:
        raise ConfigError(f"tgis.pool_stride={t.pool_stride!r}: expected a positive integer", key="tgis.pool_stride")
    if not t.temperature > 0:
        raise ConfigError(f"tgis.temperature={t.temperature!r}: expected a positive number (the slice scores are "
                          "a softmax of similarities divided by it)", key="tgis.temperature")
    if not 0 <= t.dropout < 1:
        raise ConfigError(f"tgis.dropout={t.dropout!r}: expected a probability in [0, 1)", key="tgis.dropout")
    groups = pooled_grid(cfg)[0]
    if groups < 1 or num_slices(cfg) % groups:
        raise ConfigError(
            f"{num_slices(cfg)} slices cannot be split into {groups} pooled depth groups "
            f"(vision3d.img_size[0] / vision3d.patch_size[0] / tgis.pool_stride)", key="tgis.pool_stride"
        )
    if cfg.llm_max_length <= num_vision_tokens(cfg):
        raise ConfigError(f"llm_max_length={cfg.llm_max_length} leaves no room for text: the {num_vision_tokens(cfg)} "
                          f"vision tokens ({t.vision_tokens}) alone take that many positions; expected more than "
                          f"{num_vision_tokens(cfg)}", key="llm_max_length")
