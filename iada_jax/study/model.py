"""The study's small Qwen3-VL: a tokenizer for the world, a model at Hugging Face's own random
initialisation, converted to our checkpoint format (what stage 0 trains from scratch)."""

from __future__ import annotations

import dataclasses
import json
import os

from iada_jax.embedded.tiny_hf import hf_config
from iada_jax.embedded.tiny_tokenizer import SPECIALS, build_tokenizer


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A Qwen3-VL-shaped model: the text stack (GQA, M-RoPE, DeepStack) and a vision tower of
    4-pixel patches merged 2x2, so a 48-pixel image is 36 visual tokens."""

    layers: int = 6
    hidden: int = 96
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_depth: int = 2
    vision_hidden: int = 64
    text_vocab: int = 448  # ordinary tokens; the special block follows (tiny_tokenizer's layout)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def hf_config(self):
        half = self.head_dim // 2  # M-RoPE sections (t, h, w) cover head_dim / 2 frequencies
        mrope = (half - 2 * (half // 3), half // 3, half // 3)
        return hf_config(layers=self.layers, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
                         head_dim=self.head_dim, mrope=mrope, intermediate=self.intermediate,
                         vocab=self.text_vocab + SPECIALS, vision_depth=self.vision_depth,
                         deepstack=tuple(range(min(2, self.vision_depth))), vision_hidden=self.vision_hidden,
                         vision_intermediate=2 * self.vision_hidden, vision_heads=2, text_vocab=self.text_vocab)


SIZES = {
    "small": ModelSize(),
    "tiny": ModelSize(layers=4, hidden=64, intermediate=160, vision_hidden=32),
    "medium": ModelSize(layers=8, hidden=128, intermediate=352, vision_hidden=64, vision_depth=3),
}


def preprocessor_config(image_size: int) -> dict:
    """Qwen2VLImageProcessor settings that keep a square image of `image_size` pixels as it is
    (4-pixel patches, 2x2 merge)."""
    pixels = image_size * image_size
    return {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "temporal_patch_size": 2,
            "merge_size": 2, "size": {"shortest_edge": pixels, "longest_edge": pixels},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def build_initial_model(out_dir: str, size: ModelSize, image_size: int, corpus: str, seed: int = 0) -> str:
    """A converted checkpoint folder at `out_dir` (with tokenizer and image settings) of a
    freshly initialised model (transformers' `_init_weights`: normal(0, 0.02), norms at 1)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from convert.__main__ import main as convert_main

    hf_dir = out_dir + ".hf"
    torch.manual_seed(seed)
    Qwen3VLForConditionalGeneration(size.hf_config()).save_pretrained(hf_dir)
    build_tokenizer(hf_dir, corpus, size.text_vocab)
    with open(os.path.join(hf_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(image_size), f, indent=1)
    if convert_main(["import-hf", hf_dir, out_dir, "--dtype", "float32"]) != 0:
        raise RuntimeError(f"converting the study's initial model at {hf_dir} failed")
    return out_dir
