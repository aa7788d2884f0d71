"""Parity demo (`make parity`): tiny random Qwen3-VL in HF format -> convert -> logits vs transformers.

    python -m iada_jax.embedded.demo [--out runs/demo]

Builds a tiny random `Qwen3VLForConditionalGeneration` with transformers, saves it as a
Hugging Face folder, converts it with `python -m convert import-hf`, loads the checkpoint
with `iada_jax.load_pretrained`, and prints how far our logits are from transformers'
on a left-padded text batch (float32 and bfloat16) and on a sample with a generated image
(preprocessed by `iada_jax.data.image_processing`, run through the vision tower and DeepStack).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iada_jax.embedded.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working folder (replaced on each run)")
    args = parser.parse_args(argv)

    import torch

    import iada_jax
    from convert.__main__ import main as convert_main
    from iada_jax.embedded.tiny_hf import TEXT_VOCAB, build_hf_model

    shutil.rmtree(args.out, ignore_errors=True)
    hf_dir, ckpt = os.path.join(args.out, "hf"), os.path.join(args.out, "ckpt")
    print(f"[1/4] building a tiny random Qwen3-VL (transformers) at {hf_dir}")
    hf = build_hf_model(hf_dir, seed=0)
    print(f"[2/4] converting: python -m convert import-hf {hf_dir} {ckpt} --dtype float32")
    if convert_main(["import-hf", hf_dir, ckpt, "--dtype", "float32"]) != 0:
        return 1

    print("[3/4] comparing logits on a left-padded batch of 3 samples (lengths 16, 11, 5)")
    rng = np.random.default_rng(0)
    lengths = [16, 11, 5]
    ids = rng.integers(0, TEXT_VOCAB, (3, 16))
    mask = (np.arange(16)[None] >= 16 - np.array(lengths)[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    for dtype in ("float32", "bfloat16"):
        ours = iada_jax.load_pretrained(ckpt, dtype=dtype).logits(ids, mask)
        err = np.abs(ours[valid] - ref[valid])
        print(f"  {dtype:9s} max |ours - transformers| = {err.max():.2e}  (mean {err.mean():.2e}, "
              f"logit scale {np.abs(ref[valid]).max():.1f})")
    model = iada_jax.load_pretrained(ckpt)
    text_err = np.abs(model.logits(ids, mask)[valid] - ref[valid]).max()

    print("[4/4] an image sample: PIL image -> pixel_values -> vision tower + DeepStack -> logits")
    from PIL import Image

    from iada_jax.data.image_processing import ImageProcessorConfig, preprocess_images
    from iada_jax.embedded.tiny_hf import SPECIAL_IDS

    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    pv, grid = preprocess_images([image], ImageProcessorConfig(patch_size=4, min_pixels=64, max_pixels=1024))
    n_tokens = int(grid.prod()) // 4
    sample = [5, 6, SPECIAL_IDS["vision_start_token_id"]] + [SPECIAL_IDS["image_token_id"]] * n_tokens + [
        SPECIAL_IDS["vision_end_token_id"], 7, 8, 9]
    image_ids = np.array([sample])
    with torch.no_grad():
        image_ref = hf(input_ids=torch.as_tensor(image_ids), pixel_values=torch.as_tensor(pv),
                       image_grid_thw=torch.as_tensor(grid),
                       mm_token_type_ids=torch.as_tensor((image_ids == SPECIAL_IDS["image_token_id"]).astype(int))).logits
    image_err = np.abs(model.logits(image_ids, pixel_values=pv, image_grid_thw=grid) - image_ref.numpy()).max()
    print(f"  image {image.width}x{image.height} -> grid {grid[0].tolist()}, {n_tokens} image tokens: "
          f"float32 max |ours - transformers| = {image_err:.2e}")
    ok = max(text_err, image_err) <= 1e-4
    print("float32 parity within 1e-4 (text and image):", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
