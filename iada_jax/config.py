"""Model configuration: frozen dataclasses mirroring Hugging Face's Qwen3-VL config.

Field names follow `transformers.Qwen3VLTextConfig` / `Qwen3VLVisionConfig` /
`Qwen3VLConfig`. `Qwen3VLConfig.from_hf_config` reads a `config.json` (or its dict)
in either the transformers 4.57 form (`rope_theta` + `rope_scaling`) or the v5 form
(`rope_parameters`). Runtime choices that are not part of the architecture (block
size of the layer scan, rematerialisation, attention kernel) live in `ForwardConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, Optional

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
PARAM_DTYPES = ("float32", "bfloat16")


def param_dtype(name: str):
    """The numpy dtype of a parameter dtype name ("float32" or "bfloat16")."""
    import ml_dtypes
    import numpy as np

    if name not in PARAM_DTYPES:
        raise ValueError(f"dtype {name!r} not supported; use one of {sorted(PARAM_DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


class ConfigError(ValueError):
    """A config.json that this port cannot represent faithfully."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        # HF only indexes with these (slices clip), so any 3 non-negative entries are valid.
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
            raise ConfigError(f"mrope_section={list(self.mrope_section)} must have 3 non-negative entries")
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act={self.hidden_act!r} is not supported (Qwen3-VL uses 'silu')")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"deepstack_visual_indexes {bad} outside the vision depth {self.depth}")
        side = int(round(self.num_position_embeddings**0.5))
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"num_position_embeddings={self.num_position_embeddings} is not a square grid")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one row of `pixel_values`: C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike) -> "Qwen3VLConfig":
        """Build from an HF `config.json` dict, a path to that file, or the folder holding it."""
        source = "<dict>"
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            try:
                with open(path) as f:
                    hf = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no config.json (is this a Hugging Face model folder?)") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; this port handles {list(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            text = _text_from_hf(hf["text_config"])
            vision = _vision_from_hf(hf["vision_config"])
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
        tie = hf.get("tie_word_embeddings", hf["text_config"].get("tie_word_embeddings", False))
        return cls(
            text=text,
            vision=vision,
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(tie),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """This architecture as a Hugging Face `config.json` dict (the transformers v5 form);
        `from_hf_config` reads it back to an equal config."""
        t, v = self.text, self.vision
        text = dict(
            model_type="qwen3_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, attention_bias=t.attention_bias, hidden_act=t.hidden_act,
            max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
                             "mrope_interleaved": True},
        )
        vision = dict(
            model_type="qwen3_vl_vision", depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, in_channels=v.in_channels,
            patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, num_position_embeddings=v.num_position_embeddings,
            deepstack_visual_indexes=list(v.deepstack_visual_indexes), hidden_act=v.hidden_act,
        )
        return dict(
            model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], text_config=text,
            vision_config=vision, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    PRESETS = ("qwen3-vl-2b", "qwen3-vl-8b", "tiny")

    @classmethod
    def preset(cls, name: str) -> "Qwen3VLConfig":
        """A named architecture: qwen3-vl-2b, qwen3-vl-8b (the hub configs' dimensions) or tiny."""
        makers = {"qwen3-vl-2b": cls.qwen3_vl_2b, "qwen3-vl-8b": cls.qwen3_vl_8b, "tiny": cls.tiny}
        if name not in makers:
            raise ConfigError(f"unknown preset {name!r}; choose one of {list(makers)}")
        return makers[name]()

    @classmethod
    def qwen3_vl_2b(cls) -> "Qwen3VLConfig":
        """The Qwen3-VL-2B-Instruct architecture (hub config.json), for parameter reports and
        abstract shapes; real weights bring their own config through `from_hf_config`."""
        text = TextConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        )
        vision = VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048)
        return cls(text=text, vision=vision, tie_word_embeddings=True)

    @classmethod
    def qwen3_vl_8b(cls) -> "Qwen3VLConfig":
        """The Qwen3-VL-8B-Instruct architecture (hub config.json): 36 layers, d 4096, untied head."""
        text = TextConfig(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        )
        vision = VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                              deepstack_visual_indexes=(8, 16, 24))
        return cls(text=text, vision=vision, tie_word_embeddings=False)

    @classmethod
    def tiny(cls, **text_overrides) -> "Qwen3VLConfig":
        """A few-kilobyte model for tests and the demo (same shape rules as the real ones)."""
        text = dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=10000.0,
            mrope_section=(4, 4, 4),
        )
        text.update(text_overrides)
        vision = VisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
            patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=(0, 1),
        )
        return cls(
            text=TextConfig(**text), vision=vision, image_token_id=300, video_token_id=301,
            vision_start_token_id=302, vision_end_token_id=303, tie_word_embeddings=True,
        )


def _text_from_hf(t: dict[str, Any]) -> TextConfig:
    # v5 nests the rope settings in `rope_parameters`; 4.57 has `rope_theta` + `rope_scaling`.
    rope = dict(t.get("rope_scaling") or {})
    rope.update(t.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"text rope_type={rope_type!r} is not supported (Qwen3-VL uses 'default')")
    theta = rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))
    heads = t["num_attention_heads"]
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        attention_bias=t.get("attention_bias", False),
        hidden_act=t.get("hidden_act", "silu"),
        max_position_embeddings=t.get("max_position_embeddings", 262144),
    )


def _vision_from_hf(v: dict[str, Any]) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"],
        out_hidden_size=v["out_hidden_size"],
        in_channels=v.get("in_channels", 3),
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


RematPolicy = Literal["none", "full", "qkv", "proj", "dots", "dots_no_batch"]  # model/text.py REMAT_POLICIES
AttentionImpl = Literal["xla", "cudnn"]


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """How the forward runs (not what it computes).

    block_size: layers per scanned block (the IADA boundary spacing S); must divide L.
    remat: rematerialisation policy of the scanned layer ("none" keeps activations).
    attention: "xla" (any mask, any backend) or "cudnn" (NVIDIA GPU, bf16/fp16; right padding
        or packed rows); layers.resolve_attention turns train.py's "auto" into one of them.
    dtype: compute dtype of activations; parameters are cast to it at use.
    """

    block_size: int = 4
    remat: RematPolicy = "none"
    attention: AttentionImpl = "xla"
    dtype: str = "float32"

    def check(self, text: TextConfig) -> None:
        if text.num_hidden_layers % self.block_size:
            raise ConfigError(
                f"block_size={self.block_size} does not divide num_hidden_layers={text.num_hidden_layers}"
            )


# ----------------------------------------------------------------------------- adapters

LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA on the language stack, with PEFT's `LoraConfig` field names and semantics.

    y = W x + (lora_dropout(x) @ A @ B) * scaling, scaling = lora_alpha / r (or / sqrt(r)
    with `use_rslora`). A is initialised as PEFT does (kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(in), 1/sqrt(in)); N(0, 1/r) for init_lora_weights="gaussian"), B = 0.
    target_modules: names among LORA_ALL_LINEAR, or "all-linear" for all of them. Only the
    language stack is adapted: the vision tower stays frozen (IADA_SPEC.md).
    Defaults: the paper's rank 16 on all linear layers; its alpha and dropout were lost in the
    text, lora_alpha = 2r and dropout 0.05 are ours.
    """

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1:
            raise ConfigError(f"LoRA r={self.r} must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.bias != "none":
            raise ConfigError(f"LoRA bias={self.bias!r} is not supported (only 'none', PEFT's default)")
        if self.init_lora_weights not in (True, "gaussian"):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} is not supported; use True or 'gaussian'")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise ConfigError(f"target_modules={self.target_modules!r}: give a list of names or 'all-linear'")
        else:
            unknown = sorted(set(self.target_modules) - set(LORA_ALL_LINEAR))
            if unknown or not self.target_modules:
                raise ConfigError(f"target_modules {unknown or '[]'} not in the language stack's {list(LORA_ALL_LINEAR)}")

    @property
    def modules(self) -> tuple[str, ...]:
        return LORA_ALL_LINEAR if self.target_modules == "all-linear" else tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def targets(self, module_name: str) -> bool:
        return module_name in self.modules


IADA_CHOICES = {
    "query": ("adaptive", "fixed"),
    "routing": ("self_modal", "shared", "cross_modal", "text_only_adaptive", "vision_only_adaptive"),
    "bottleneck": ("linear", "gelu"),
    "pooling": ("mean", "attention"),
    "granularity": ("sequence", "token"),
    "gate": ("global", "per_block", "adaptive"),
    "attend": ("sequence", "depth"),
    "scope": ("prompt", "full", "causal"),
}


@dataclasses.dataclass(frozen=True)
class IadaConfig:
    """Every switch of docs/IADA_SPEC.md, defaults first (the paper's condition D).

    rank=None is the full-rank query projection (one d x d matrix per stream). block_size is
    the boundary spacing S; the forward's `ForwardConfig.block_size` must equal it.
    """

    query: str = "adaptive"
    routing: str = "self_modal"
    shared_projection: bool = False
    rank: Optional[int] = 16
    bottleneck: str = "linear"
    pooling: str = "mean"
    granularity: str = "sequence"
    gate: str = "global"
    attend: str = "sequence"
    scope: str = "prompt"
    include_embedding: bool = True
    include_current: bool = True
    block_size: int = 4

    def __post_init__(self):
        for name, choices in IADA_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"IADA {name}={getattr(self, name)!r}; choose one of {list(choices)}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"IADA rank={self.rank} must be a positive integer or None (full rank)")
        if self.block_size < 1:
            raise ConfigError(f"IADA block_size={self.block_size} must be positive")
        partial = self.routing in ("text_only_adaptive", "vision_only_adaptive")
        if partial and self.query == "fixed":
            raise ConfigError(f"routing={self.routing!r} makes one stream adaptive; it cannot combine with query='fixed'")
        if self.shared_projection and (self.routing not in ("self_modal", "cross_modal") or self.query != "adaptive"):
            raise ConfigError("shared_projection=True needs two adaptive streams (routing self_modal or cross_modal, query adaptive)")
        if self.granularity == "token" and (self.query != "adaptive" or self.routing == "cross_modal"):
            raise ConfigError("granularity='token' builds each token's query from its own state: it needs "
                              "query='adaptive' and a routing other than cross_modal")

    @property
    def streams(self) -> tuple[str, ...]:
        """Routing streams: one over all tokens, or the visual and the text tokens."""
        return ("all",) if self.routing == "shared" else ("visual", "text")

    def stream_query(self, stream: str) -> str:
        """'adaptive' or 'fixed' for one stream."""
        if self.routing == "text_only_adaptive":
            return "adaptive" if stream == "text" else "fixed"
        if self.routing == "vision_only_adaptive":
            return "adaptive" if stream == "visual" else "fixed"
        return self.query
