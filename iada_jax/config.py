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
from typing import Any, Literal

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


RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["xla", "cudnn"]


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """How the forward runs (not what it computes).

    block_size: layers per scanned block (the IADA boundary spacing S); must divide L.
    remat: rematerialisation policy of the scanned layer ("none" keeps activations).
    attention: "xla" (any mask, any backend) or "cudnn" (GPU; causal + right padding only).
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
