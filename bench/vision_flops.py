"""Compiled FLOPs of the vision tower per real patch (XLA's cost analysis; nothing is run).

    python -m bench.vision_flops                      # 8 COCO-sized images (480 x 640) at 2B dimensions
    python -m bench.vision_flops --sizes 480x640,448x448,1024x768 --batch 8

Compares the batch layout `collate` builds (B * max_images frames of a bucketed length, real
patches first) with the ideal: the same images with no padding at all (one frame each, exactly
its patches; a program that would compile once per image-size set). The ratio is what padding
costs the tower.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _flops(fn, *args) -> float:
    import jax

    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def tower_flops(cfg, vision) -> float:
    """FLOPs of the frozen vision tower (forward) on these inputs, from compiled programs. XLA's
    cost analysis counts a loop body once: the scanned blocks are added as (depth - 1) more
    compiled blocks."""
    import jax
    import jax.numpy as jnp

    from convert.random_init import random_params
    from iada_jax.config import ForwardConfig
    from iada_jax.data.batch import Batch
    from iada_jax.model.qwen3_vl import vision_features
    from iada_jax.model.vision import VisionBlock, vision_cos_sin

    v = cfg.vision
    params = jax.eval_shape(lambda: random_params(cfg, "bfloat16"))
    fwd = ForwardConfig(block_size=1, dtype="bfloat16")
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vision)
    batch = Batch(input_ids=None, attention_mask=None, position_ids=None, vision=spec)
    tower = _flops(lambda p, b: vision_features(p, b, cfg=cfg, fwd=fwd), params, batch)
    block_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                params["model"]["visual"]["blocks"])
    n = vision.pixel_values.shape[0]

    def one_block(p, vis):
        cos, sin = vision_cos_sin(vis.rot_pos, v.head_dim, v.rope_theta)
        h = jnp.zeros((n, v.hidden_size), jnp.bfloat16)
        taps = jnp.zeros((len(v.deepstack_visual_indexes), n, v.hidden_size), jnp.bfloat16)
        return VisionBlock(v).apply({"params": p}, (h, taps), jnp.int32(0), cos, sin, vis)

    return tower + (v.depth - 1) * _flops(one_block, block_params, spec)


def grids_for(sizes: list[tuple[int, int]], cfg) -> np.ndarray:
    """Processor grids (smart_resize within Qwen's default pixel limits) of (height, width) images."""
    from iada_jax.data.image_processing import smart_resize

    factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    out = []
    for h, w in sizes:
        rh, rw = smart_resize(h, w, factor, 65536, 16777216)
        out.append((1, rh // cfg.vision.patch_size, rw // cfg.vision.patch_size))
    return np.asarray(out, np.int64)


def report(cfg, grid: np.ndarray, batch: int, max_images: int = 1) -> dict:
    from iada_jax.data.vision_inputs import build_vision_inputs, frame_bucket, frame_sizes

    merge = cfg.vision.spatial_merge_size
    real = int(frame_sizes(grid).sum())
    pixels = np.zeros((real, cfg.vision.patch_dim), np.float32)
    frame_len = frame_bucket(int(frame_sizes(grid).max()), minimum=16 * merge**2)
    ours = build_vision_inputs(pixels, grid, cfg.vision, n_frames=batch * max_images, frame_len=frame_len)
    ideal_flops = sum(tower_flops(cfg, build_vision_inputs(np.zeros((int(g.prod()), cfg.vision.patch_dim), np.float32),
                                                           g[None], cfg.vision)) for g in grid)
    ours_flops = tower_flops(cfg, ours)
    return {"real_patches": real, "frames": batch * max_images, "frame_len": frame_len,
            "rows": int(ours.pixel_values.shape[0]), "flops_per_real_patch": ours_flops / real,
            "ideal_flops_per_real_patch": ideal_flops / real, "over_ideal": ours_flops / ideal_flops}


def main(argv=None) -> int:
    from iada_jax.config import Qwen3VLConfig

    ap = argparse.ArgumentParser(prog="python -m bench.vision_flops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="480x640", help="image sizes HxW, comma-separated (cycled over the batch)")
    ap.add_argument("--batch", type=int, default=8, help="samples, one image each")
    ap.add_argument("--preset", default="qwen3-vl-2b")
    args = ap.parse_args(argv)
    cfg = Qwen3VLConfig.preset(args.preset)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    grid = grids_for([sizes[i % len(sizes)] for i in range(args.batch)], cfg)
    r = report(cfg, grid, args.batch)
    print(f"{args.batch} images {args.sizes} ({r['real_patches']} real patches): {r['frames']} frames of "
          f"{r['frame_len']} rows = {r['rows']} rows; {r['flops_per_real_patch'] / 1e9:.3f} GFLOP per real patch, "
          f"{r['over_ideal']:.3f}x the unpadded tower ({r['ideal_flops_per_real_patch'] / 1e9:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
