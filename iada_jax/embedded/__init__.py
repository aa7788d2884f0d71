"""The embedded default: a tiny random Qwen3-VL with its own tokenizer, and synthetic
visual-instruction data, built once and cached, so `python train.py` runs from a fresh clone.

    CACHE/hf/          the model in Hugging Face format (transformers save_pretrained), with the
                       tokenizer (byte-level BPE, Qwen special tokens and chat template) and a
                       preprocessor_config.json for 64x64 images (16x16 patches of 4 pixels)
    CACHE/ckpt/        the same model converted with `python -m convert import-hf`
    CACHE/data/world.parquet   the synthetic world's perception and reasoning questions about an
                       image (iada_jax/study/world.py; one-word answers) in the
                       trl-lib/llava-instruct-mix schema; `make eval` scores its held-out sets
"""

from __future__ import annotations

import json
import os
import shutil

DEFAULT_CACHE = os.path.join("runs", "embedded")
IMAGE_SIZE = 48  # the world's images: 36 visual tokens of the tiny model
MIX = {"perception": 0.5, "reasoning": 0.5}  # every row with one image

# The tiny model sees 64x64 images as 16x16 patches of 4 pixels (64 LLM tokens).
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 4, "temporal_patch_size": 2, "merge_size": 2,
    "size": {"shortest_edge": 1024, "longest_edge": 64 * 64},
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def prepare_embedded(cache: str = DEFAULT_CACHE, num_rows: int = 512, log=print) -> tuple[str, str]:
    """(converted checkpoint folder, data file); built on first use, then reused."""
    ckpt, data = os.path.join(cache, "ckpt"), os.path.join(cache, "data", "world.parquet")
    if os.path.isdir(ckpt) and os.path.isfile(data):
        return ckpt, data
    from convert.__main__ import main as convert_main
    from iada_jax.embedded.tiny_hf import build_hf_model
    from iada_jax.embedded.tiny_tokenizer import build_tokenizer
    from iada_jax.study import world

    shutil.rmtree(cache, ignore_errors=True)
    hf_dir = os.path.join(cache, "hf")
    log(f"embedded default: building a tiny random Qwen3-VL with its tokenizer at {hf_dir}")
    build_hf_model(hf_dir, seed=0, layers=4)
    build_tokenizer(hf_dir)
    with open(os.path.join(hf_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=1)
    log(f"embedded default: converting to {ckpt}")
    if convert_main(["import-hf", hf_dir, ckpt, "--dtype", "float32"]) != 0:
        raise RuntimeError(f"converting the embedded model at {hf_dir} failed")
    log(f"embedded default: writing {num_rows} questions of the synthetic world to {data}")
    world.write_rows(data, world.sample_rows(num_rows, MIX, seed=0, image_size=IMAGE_SIZE))
    return ckpt, data
