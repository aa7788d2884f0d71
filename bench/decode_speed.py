"""Decoding speed: our jitted KV-cache generation (`iada_jax.evaluation.generate`, what eval.py
runs) against transformers' `Qwen3VLForConditionalGeneration.generate`, on the same random
weights and the same prompts, greedy, a fixed number of new tokens.

    python -m bench.decode_speed                       # Qwen3-VL-2B dims, bf16, batch 16, 1024-token prompts, 64 new
    python -m bench.decode_speed --tiny --dtype float32 --batch 2 --prompt 48 --new 8 --repeats 2   # CPU check

Weights: transformers' model built from the config on its device and randomised by
`iada_jax.embedded.tiny_hf.randomize_` (O(1) activations at any size), then converted to
ours in memory through the one mapping table (`convert.mapping`): both stacks hold identical
tensors. The output head is untied from the embedding (a random lm_head of the same shape:
the same matmul, the same FLOPs as Qwen3-VL-2B's tied head): with a random tied head the
token just generated dominates the next logits, every sample repeats one token, and
agreement would test the first token only. Inputs: `bench.train_step.synthetic_examples`,
one image per sample (448 x 448: 196 visual tokens; 8 x 8 patches when tiny) then random
text, all prompts of exactly --prompt tokens (no padding).

Each stack runs once untimed (ours: the compile; transformers: CUDA and cuBLAS warm-up), then
--repeats timed calls, each to tokens on the host: ours from numpy inputs (the host-side M-RoPE
positions, the vision layout and the copy to the device included), transformers from tensors
already on its device (it computes positions inside generate). Reported per stack:
wall time of prefill + decode (median), generated tokens/s (tokens actually generated, counted
from the output: no stop token exists, so every sample makes --new), the first call, and for
ours the compile time (first call less the median). transformers runs as a user calls it:
SDPA attention, its default dynamic KV cache, no torch.compile, `eos_token_id=None`.

Agreement: the fraction of samples whose first 8 generated tokens are equal in both stacks.
In float32 (tiny, CPU) it must be 1 (else the row is a mismatch); in bf16 the two stacks round
differently and random weights have near-ties, so it is reported, not judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np

AGREE_TOKENS = 8


def inputs(cfg, batch: int, prompt: int, tiny: bool):
    """(ids [B, T], pixel_values [N, patch_dim], image_grid_thw [B, 3]): one image per sample."""
    from bench.train_step import Case, synthetic_examples

    examples = synthetic_examples(cfg, Case("B_lora", seq=prompt, images=1, batch=batch), tiny)
    ids = np.stack([e.input_ids for e in examples]).astype(np.int64)
    return ids, np.concatenate([e.pixel_values for e in examples]), np.concatenate([e.image_grid_thw for e in examples])


def hf_model(cfg, dtype: str, device: str, seed: int = 0):
    """transformers' model of `cfg` on `device`, with O(1)-activation random weights."""
    import torch
    import transformers
    from transformers import Qwen3VLForConditionalGeneration

    from iada_jax.embedded.tiny_hf import randomize_

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    with torch.device(device):  # initialise on the device: seconds, not minutes, at 2B
        model = Qwen3VLForConditionalGeneration._from_config(transformers.Qwen3VLConfig(**cfg.to_hf_config()),
                                                             attn_implementation="sdpa", dtype=torch_dtype)
    randomize_(model, seed)
    return model.eval()


def params_from_hf(model, cfg) -> dict:
    """Our parameter tree, on JAX's default device, from the transformers model's tensors: the
    import direction of the one mapping table (`convert.mapping`), every tensor used once."""
    import jax.numpy as jnp
    import torch

    from convert.mapping import mapping_table, set_path
    from iada_jax.config import param_dtype

    state = model.state_dict()

    def to_numpy(t):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bf16 of its own: reinterpret the bits as ml_dtypes'
            return t.view(torch.int16).numpy().view(param_dtype("bfloat16"))
        return t.numpy()

    params: dict = {}
    used = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # the embedding itself
    for rule in mapping_table(cfg):
        slices = [rule.transform.to_jax(to_numpy(state[key])) for key in rule.hf_keys()]
        set_path(params, rule.jax, jnp.asarray(slices[0] if rule.count is None else np.stack(slices)))
        used.update(rule.hf_keys())
    if set(state) != used:
        raise RuntimeError(f"transformers' tensors without a rule in convert/mapping.py: {sorted(set(state) - used)}")
    return params


def _timed(call, repeats: int) -> tuple[object, float, list[float]]:
    """(output, first call seconds, timed repeat seconds)."""
    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return out, first, times


def _stack_summary(tokens: np.ndarray, first: float, times: list[float], **extra) -> dict:
    wall = statistics.median(times)
    generated = int(tokens.size)
    return dict(generate_s=wall, tokens_per_s=generated / wall, generated_tokens=generated, first_call_s=first,
                repeat_s=times, **extra)


def measure_jax(cfg, params, ids, pixels, grid, args) -> tuple[np.ndarray, dict]:
    import jax

    from bench.train_step import _device_peak_gib
    from iada_jax.config import ForwardConfig
    from iada_jax.evaluation.generate import GenerationConfig, generate
    from iada_jax.pretrained import Qwen3VL

    model = Qwen3VL(cfg, params, fwd=ForwardConfig(dtype=args.dtype))
    gen = GenerationConfig(max_new_tokens=args.new)  # greedy, no stop token: every sample makes args.new
    mask = np.ones_like(ids)
    with jax.default_matmul_precision("highest" if args.dtype == "float32" else "default"):
        tokens, first, times = _timed(lambda: generate(model, ids, mask, pixels, grid, config=gen), args.repeats)
    summary = _stack_summary(tokens, first, times, peak_gib=_device_peak_gib())
    summary["compile_s"] = first - summary["generate_s"]
    return tokens, summary


def measure_torch(model, ids, pixels, grid, args, device: str) -> tuple[np.ndarray, dict]:
    import torch

    from bench.train_step import hf_vision_kwargs

    dtype = next(model.parameters()).dtype
    ids_t = torch.as_tensor(ids, device=device)
    kw = dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t))
    kw.update(hf_vision_kwargs((ids_t == model.config.image_token_id).long(),
                               torch.as_tensor(pixels, device=device, dtype=dtype), torch.as_tensor(grid, device=device)))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=args.new, do_sample=False, eos_token_id=None)
        sync()
        return out[:, ids.shape[1]:].cpu().numpy()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, first, times = _timed(call, args.repeats)
    if tokens.shape != (ids.shape[0], args.new):
        raise RuntimeError(f"transformers generated {tokens.shape[1]} tokens per sample, not {args.new}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return tokens, _stack_summary(tokens, first, times, peak_gib=peak)


def agreement(ours: np.ndarray, theirs: np.ndarray, k: int = AGREE_TOKENS) -> dict:
    """Fraction of rows whose first k tokens are equal, and the mean length of the common prefix."""
    k = min(k, ours.shape[1])
    differ = ours != theirs
    prefix = np.where(differ.any(1), differ.argmax(1), ours.shape[1])
    return {"agree_tokens": k, "first_tokens_equal_fraction": float((prefix >= k).mean()),
            "mean_common_prefix": float(prefix.mean())}


def run(args) -> dict:
    import torch

    from bench.train_step import device_name, model_config

    cfg = dataclasses.replace(model_config(args.tiny), tie_word_embeddings=False)  # why: the docstring
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg, args.dtype, device)
    params = params_from_hf(model, cfg)
    ids, pixels, grid = inputs(cfg, args.batch, args.prompt, args.tiny)
    theirs, torch_row = measure_torch(model, ids, pixels, grid, args, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    ours, jax_row = measure_jax(cfg, params, ids, pixels, grid, args)
    merge = cfg.vision.spatial_merge_size
    row = dict(kind="decode", batch=args.batch, prompt=args.prompt, image_tokens=int(grid[0].prod()) // merge**2,
               new=args.new, dtype=args.dtype, tied_head=cfg.tie_word_embeddings, jax=dict(jax_row, device=device_name("jax")),
               torch=dict(torch_row, device=device_name("torch")),
               speedup=jax_row["tokens_per_s"] / torch_row["tokens_per_s"], **agreement(ours, theirs))
    row["status"] = ("mismatch" if args.dtype == "float32" and row["first_tokens_equal_fraction"] < 1 else "ok")
    return row


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU check of the harness)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sample, image tokens included")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sample (all generated: no stop token)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per stack after the first")
    ap.add_argument("--out", default=None, help="write the row as JSON here")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.new < 1:
        ap.error("--repeats and --new must be at least 1")
    from bench.train_step import emit_row

    row = run(args)
    row.update(device=row["jax"]["device"])
    emit_row(row, "bench.decode_speed", argv, args.out)
    return 0 if row["status"] == "ok" else 2


if __name__ == "__main__":
    sys.exit(main())
