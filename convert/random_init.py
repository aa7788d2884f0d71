"""Random full-size checkpoints from a named architecture, for benchmarks and memory checks
where the real weights cannot be downloaded:

    python -m convert random-init --preset qwen3-vl-2b OUT [--format ours|hf] [--dtype bfloat16]

`ours` is a converted checkpoint that `train.py --model OUT` loads directly; `hf` is a Hugging
Face folder (config.json + sharded safetensors) for `python -m convert import-hf`. Both carry
the embedded tiny tokenizer (a 300-id byte-level BPE with Qwen's chat template), so the
config's image / video / vision ids are set to that tokenizer's; every dimension is the
preset's. Weights: N(0, 0.02) for matrices and embeddings, 1 for norm scales, 0 for biases.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from convert.mapping import hf_sources, hf_specs, hf_tensor, mapping_table, set_path
from iada_jax.config import Qwen3VLConfig, param_dtype

# Qwen3-VL's image processor defaults (patch 16, merge 2: 32-pixel factor; 64K..16.7M pixels).
QWEN_PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def random_params(cfg: Qwen3VLConfig, dtype: str = "bfloat16", seed: int = 0) -> dict:
    """A parameter tree in the checkpoint layout (convert/mapping.py), random, as JAX arrays on
    the default device (generated there: seconds for 2B on a GPU, about a minute on 2 CPU cores)."""
    import jax
    import jax.numpy as jnp

    rules = mapping_table(cfg)
    kinds = [rule.jax[-1] if rule.jax[-1] in ("scale", "bias") else "weight" for rule in rules]

    @jax.jit
    def make(key):  # one program for the whole tree: one compilation
        out = []
        for i, (rule, kind) in enumerate(zip(rules, kinds)):
            if kind == "scale":
                out.append(jnp.ones(rule.jax_shape, dtype))
            elif kind == "bias":
                out.append(jnp.zeros(rule.jax_shape, dtype))
            else:
                noise = jax.random.normal(jax.random.fold_in(key, i), rule.jax_shape, jnp.float32)
                out.append((0.02 * noise).astype(dtype))
        return out

    params: dict = {}
    for rule, value in zip(rules, make(jax.random.PRNGKey(seed))):
        set_path(params, rule.jax, value)
    return params


def with_tiny_tokenizer_ids(cfg: Qwen3VLConfig) -> Qwen3VLConfig:
    """The config with the special ids of the embedded tiny tokenizer (image 290, ...)."""
    import dataclasses

    from iada_jax.embedded.tiny_tokenizer import SPECIAL_TOKENS

    return dataclasses.replace(
        cfg, image_token_id=SPECIAL_TOKENS["<|image_pad|>"], video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"], vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"])


def random_init(preset: str | Qwen3VLConfig, out_dir: str, fmt: str = "ours", dtype: str = "bfloat16", seed: int = 0,
                verbose: bool = True) -> str:
    """Write a random checkpoint of `preset` (a name, or a config) to `out_dir` (created
    atomically); returns its path."""
    import jax

    from convert.export import write_hf_weights
    from iada_jax.checkpoint import tree_specs, write_base_checkpoint, write_folder_atomically
    from iada_jax.embedded import PREPROCESSOR_CONFIG
    from iada_jax.embedded.tiny_tokenizer import build_tokenizer

    if fmt not in ("ours", "hf"):
        raise ValueError(f"format {fmt!r}: use 'ours' (a converted checkpoint) or 'hf' (safetensors)")
    cfg = with_tiny_tokenizer_ids(preset if isinstance(preset, Qwen3VLConfig) else Qwen3VLConfig.preset(preset))
    preset = preset if isinstance(preset, str) else "custom"
    hf_config = dict(cfg.to_hf_config(), dtype=dtype)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    log(f"random {preset}: generating parameters ({dtype}, seed {seed})")
    params = jax.tree.map(np.asarray, random_params(cfg, dtype, seed))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def write(folder):
        if fmt == "ours":
            write_base_checkpoint(folder, *tree_specs(params), hf_config, dtype=dtype, source=f"random:{preset}")
        else:
            sources = hf_sources(cfg)
            write_hf_weights(folder, hf_specs(cfg, param_dtype(dtype)), lambda key: hf_tensor(params, cfg, key, sources))
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
        build_tokenizer(folder)
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(PREPROCESSOR_CONFIG if cfg.vision.patch_size == 4 else QWEN_PREPROCESSOR_CONFIG, f, indent=1)

    out = write_folder_atomically(out_dir, write)
    log(f"wrote {out} ({n:,} parameters, {fmt} format)")
    return out
