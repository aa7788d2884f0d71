"""Correctness on the device the benchmarks run on (a GPU is not the CPU the tests ran on).

    python -m bench.parity attention [--tiny]     cuDNN against XLA attention, right-padded bf16
    python -m bench.parity forward                our forward against transformers', LoRA + IADA

`attention`: the 2B head shapes (16 query heads, 8 KV heads, head_dim 128), a right-padded
bf16 batch of lengths T, 3T/4, T/3 and 1. Reports the max abs difference of cuDNN's output
and its gradients from XLA's on the valid rows, and whether the padded rows are finite in
both: a NaN there reaches the loss and IADA's pooling through a multiply by zero. Without a
GPU the cuDNN half is reported as not run, and only the XLA rows are checked.

`forward`: a tiny random Qwen3-VL with vision and DeepStack (iada_jax.embedded.tiny_hf), LoRA + IADA
(experiment D, random adapters of std 0.1) on both sides: ours in JAX on the default device,
transformers + PEFT + `attach_iada` (the exported adapter) in PyTorch. float32 (JAX at
"highest" matmul precision) against PyTorch float32 on the CPU; bf16 against the same float32
reference, beside PyTorch's own bf16 error for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

# ----------------------------------------------------------------------------- attention


def attention_check(tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from iada_jax.model.layers import causal_padding_mask, dot_product_attention

    b, t = (4, 64) if tiny else (4, 2048)
    hq, hkv, hd = 16, 8, 128
    lengths = np.asarray([t, 3 * t // 4, t // 3, 1], np.int32)
    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
                    for s in ((b, t, hq, hd), (b, t, hkv, hd), (b, t, hkv, hd), (b, t, hq, hd)))
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    full_mask = causal_padding_mask(jnp.asarray(mask))
    valid = mask.astype(bool)
    seq = jnp.asarray(lengths)
    # The loss only reads valid rows: the cotangent is zero on padded ones, as in training.
    weight = jnp.asarray(valid, jnp.bfloat16)[:, :, None, None] * cot

    def run(impl):
        def f(q, k, v):
            return dot_product_attention(q, k, v, full_mask, seq, impl)

        out, vjp = jax.vjp(f, q, k, v)
        grads = vjp(weight)
        return [np.asarray(x, np.float32) for x in (out,) + grads]

    ref = run("xla")
    row = {"kind": "attention", "shape": f"B={b} T={t} Hq={hq} Hkv={hkv} hd={hd} bf16, lengths {lengths.tolist()}",
           "xla_padded_rows_finite": bool(np.isfinite(ref[0][~valid]).all()),
           "xla_grads_finite": bool(all(np.isfinite(g).all() for g in ref[1:]))}
    if jax.devices()[0].platform != "gpu":
        row.update(status="partial", reason="cuDNN attention needs a GPU: only the XLA path was checked")
        return row
    got = run("cudnn")
    scale = float(np.abs(ref[0][valid]).max())
    row.update(
        cudnn_max_abs_diff_valid=float(np.abs(got[0] - ref[0])[valid].max()), output_scale=scale,
        cudnn_padded_rows_finite=bool(np.isfinite(got[0][~valid]).all()),
        cudnn_grad_max_abs_diff={n: float(np.abs(g - r).max()) for n, g, r in zip("qkv", got[1:], ref[1:])},
        cudnn_grads_finite=bool(all(np.isfinite(g).all() for g in got[1:])),
    )
    # bf16 outputs of O(1) values: a few bf16 ulps (2^-8 relative) of difference is rounding.
    ok = (row["cudnn_max_abs_diff_valid"] <= 2e-2 * max(scale, 1.0) and row["cudnn_padded_rows_finite"]
          and row["cudnn_grads_finite"] and row["xla_padded_rows_finite"])
    packed = packed_attention_check(q, k, v, cot)
    row.update(packed)
    frames = frame_attention_check(tiny)
    row.update(frames)
    ok = ok and packed["packed_status"] == "ok" and frames["frames_status"] == "ok"
    row["status"] = "ok" if ok else "mismatch"
    return row


def packed_attention_check(q, k, v, cot) -> dict:
    """Packed rows (several samples back to back, then padding): cuDNN with segment offsets
    (`cudnn_packed_attention`, what `--pack --attention cudnn` runs) against the XLA
    block-diagonal causal mask, output and gradients on the samples' tokens. GPU only."""
    import jax
    import jax.numpy as jnp

    from iada_jax.model.layers import causal_padding_mask, dot_product_attention

    b, t = q.shape[:2]
    parts = [[t // 2, t // 4, t // 8], [t], [t // 3, t // 3], [5, 7, 1]]  # samples per row; the rest padding
    k_max = max(map(len, parts))
    sample_lengths = np.zeros((b, k_max), np.int32)
    segments = np.zeros((b, t), np.int32)
    for r, lengths in enumerate(parts):
        sample_lengths[r, :len(lengths)] = lengths
        segments[r, :sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    valid = segments > 0
    mask = causal_padding_mask(jnp.asarray(valid.astype(np.int32)), jnp.asarray(segments))
    weight = jnp.asarray(valid, jnp.bfloat16)[:, :, None, None] * cot

    def run(impl):
        def f(q, k, v):
            return dot_product_attention(q, k, v, mask, jnp.asarray(sample_lengths), impl)

        out, vjp = jax.vjp(f, q, k, v)
        return [np.asarray(x, np.float32) for x in (out,) + vjp(weight)]

    ref, got = run("xla"), run("cudnn")
    scale = float(np.abs(ref[0][valid]).max())
    row = {"packed_rows": [list(p) for p in parts],
           "packed_cudnn_max_abs_diff": float(np.abs(got[0] - ref[0])[valid].max()),
           "packed_cudnn_grad_max_abs_diff": {n: float(np.abs(g - r)[valid].max())
                                              for n, g, r in zip("qkv", got[1:], ref[1:])}}
    grad_scale = max(float(np.abs(r[valid]).max()) for r in ref[1:])
    ok = (row["packed_cudnn_max_abs_diff"] <= 2e-2 * max(scale, 1.0)
          and max(row["packed_cudnn_grad_max_abs_diff"].values()) <= 2e-2 * max(grad_scale, 1.0)
          and all(np.isfinite(x[valid]).all() for x in got))
    row["packed_status"] = "ok" if ok else "mismatch"
    return row


def frame_attention_check(tiny: bool) -> dict:
    """The vision tower's attention (not causal, within each frame over its real patches, what
    `--attention cudnn` and train.py's "auto" run on a GPU): cuDNN against XLA on frames of
    Qwen3-VL-2B's vision heads (16 x 64), output and gradients on the real patches. GPU only."""
    import jax
    import jax.numpy as jnp

    from iada_jax.model.vision import frame_attention

    f, length, h, hd = (4, 64, 16, 64) if tiny else (4, 1024, 16, 64)
    # 784 patches: a 448x448 image; 0: a padding frame (the batch's frame count is a power of two)
    lengths = np.asarray([length, 784 * length // 1024, length // 10, 0], np.int32)
    rng = np.random.default_rng(1)
    q, k, v, cot = (jnp.asarray(rng.standard_normal((f, length, h, hd)), jnp.bfloat16) for _ in range(4))
    valid = np.arange(length)[None] < lengths[:, None]
    weight = jnp.asarray(valid, jnp.bfloat16)[:, :, None, None] * cot

    def run(impl):
        out, vjp = jax.vjp(lambda q, k, v: frame_attention(q, k, v, jnp.asarray(lengths), impl), q, k, v)
        return [np.asarray(x, np.float32) for x in (out,) + vjp(weight)]

    ref, got = run("xla"), run("cudnn")
    scale = float(np.abs(ref[0][valid]).max())
    grad_scale = max(float(np.abs(r[valid]).max()) for r in ref[1:])
    row = {"frames": f"F={f} L={length} H={h} hd={hd} bf16, lengths {lengths.tolist()}",
           "frames_cudnn_max_abs_diff": float(np.abs(got[0] - ref[0])[valid].max()),
           "frames_cudnn_grad_max_abs_diff": {n: float(np.abs(g - r)[valid].max())
                                              for n, g, r in zip("qkv", got[1:], ref[1:])}}
    ok = (row["frames_cudnn_max_abs_diff"] <= 2e-2 * max(scale, 1.0)
          and max(row["frames_cudnn_grad_max_abs_diff"].values()) <= 2e-2 * max(grad_scale, 1.0)
          and all(np.isfinite(x).all() for x in got))  # padding rows and frames too: they are dropped, not masked
    row["frames_status"] = "ok" if ok else "mismatch"
    return row


# ----------------------------------------------------------------------------- forward


def _inputs(image_token: int, vision_start: int, vision_end: int):
    """Two right-padded samples (the training layout): an image question and a text one, the
    last 3 real tokens of each supervised. 16 patches of a 1x4x4 grid = 4 merged tokens."""
    rows = [[3, 4, vision_start] + [image_token] * 4 + [vision_end, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int64)
    mask, loss = np.zeros_like(ids), np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)], loss[r, len(row) - 3:len(row)] = row, 1, 1
    pixels = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    return ids, mask, loss, pixels, np.asarray([[1, 4, 4]])


def forward_check(tmp: str) -> list[dict]:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import peft
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    import iada_jax
    from bench.train_step import hf_vision_kwargs
    from convert.export import export_peft
    from convert.import_hf import import_hf
    from iada_jax.checkpoint import save_params
    from iada_jax.config import ForwardConfig
    from iada_jax.experiments import get_experiment
    from iada_jax.model.qwen3_vl import forward, init_adapters
    from iada_jax.embedded.tiny_hf import SPECIAL_IDS, build_hf_model
    from iada_jax.torch_iada import attach_iada

    hf_dir, ckpt, run, out = (os.path.join(tmp, n) for n in ("hf", "ckpt", "run", "peft"))
    build_hf_model(hf_dir, seed=7, layers=4, vision_depth=2, deepstack=(0, 1), merge=2, tied=True)
    import_hf(hf_dir, ckpt, dtype="float32", verbose=False)
    exp = get_experiment("D_iada_lora", block_size=2)
    vlm = iada_jax.load_pretrained(ckpt, fwd=ForwardConfig(block_size=2))
    fresh = jax.eval_shape(lambda p: init_adapters(jax.random.PRNGKey(0), p, cfg=vlm.config, fwd=vlm.fwd, lora=exp.lora,
                                                   iada=exp.iada), vlm.params)
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda x: np.asarray(rng.normal(size=x.shape) * 0.1, np.float32), fresh)
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"train": {"model": ckpt}, "lora": dataclasses.asdict(exp.lora), "iada": dataclasses.asdict(exp.iada)}, f)
    save_params(os.path.join(run, "final"), adapters)
    export_peft(run, out)

    ids, mask, loss, pixels, grid = _inputs(SPECIAL_IDS["image_token_id"], SPECIAL_IDS["vision_start_token_id"],
                                            SPECIAL_IDS["vision_end_token_id"])
    valid = mask.astype(bool)

    def torch_logits(dtype, device):
        model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        model = peft.PeftModel.from_pretrained(model, out).eval()
        attach_iada(model, out)
        ids_t = torch.as_tensor(ids, device=device)
        kw = dict(input_ids=ids_t, attention_mask=torch.as_tensor(mask, device=device),
                  labels=torch.as_tensor(np.where(loss == 1, ids, -100), device=device))
        kw.update(hf_vision_kwargs((ids_t == SPECIAL_IDS["image_token_id"]).long(),
                                   torch.as_tensor(pixels, device=device, dtype=dtype), torch.as_tensor(grid, device=device)))
        with torch.no_grad():
            return model(**kw).logits.float().cpu().numpy()

    def jax_logits(dtype):
        model = iada_jax.load_pretrained(ckpt, dtype=dtype, fwd=ForwardConfig(block_size=2, dtype=dtype))
        batch = model.make_batch(ids, mask, pixel_values=pixels, image_grid_thw=grid)
        batch = batch.replace(loss_mask=jnp.asarray(loss, jnp.int32))
        run_fwd = jax.jit(lambda p, a, b: forward(p, b, cfg=model.config, fwd=model.fwd, lora=exp.lora, iada=exp.iada,
                                                   adapters=a)[0])
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            return np.asarray(run_fwd(model.params, adapters, batch), np.float32)

    reference = torch_logits(torch.float32, "cpu")
    scale = float(np.abs(reference[valid]).max())
    rows = []
    ours32 = jax_logits("float32")
    err = float(np.abs(ours32 - reference)[valid].max())
    rows.append({"kind": "parity", "dtype": "float32", "max_abs_diff": err, "logit_scale": scale, "tol": 1e-4,
                 "status": "ok" if err <= 1e-4 else "mismatch",
                 "what": "ours (JAX, default device, matmul precision highest) vs transformers + PEFT + attach_iada "
                         "(PyTorch float32, CPU), tiny vision model, LoRA + IADA (D, std 0.1)"})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theirs16 = torch_logits(torch.bfloat16, device)
    ours16 = jax_logits("bfloat16")
    err16 = float(np.abs(ours16 - reference)[valid].max())
    their_err = float(np.abs(theirs16 - reference)[valid].max())
    # bf16 has 8 bits of mantissa: both stacks round differently; ours may err at most 2x theirs (+1 ulp of scale).
    tol = 2 * their_err + scale * 2**-8
    rows.append({"kind": "parity", "dtype": "bfloat16", "max_abs_diff": err16, "torch_bf16_max_abs_diff": their_err,
                 "logit_scale": scale, "tol": tol, "status": "ok" if err16 <= tol else "mismatch",
                 "what": f"ours bf16 vs the PyTorch float32 reference, beside PyTorch bf16 ({device}) vs the same"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["attention", "forward"])
    ap.add_argument("--tiny", action="store_true", help="attention: sequence 64 instead of 2048 (CPU)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.check == "attention":
        rows = [attention_check(args.tiny)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = forward_check(tmp)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["status"] in ("ok", "partial") for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
