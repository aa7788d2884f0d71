"""Steady-state training-step speed: iada-jax against transformers + PEFT, same shapes, one run.

    python -m bench.train_step                       # Qwen3-VL-2B dimensions, random weights (GPU)
    python -m bench.train_step --tiny --seq 128      # the harness itself on CPU, tiny dimensions
    python -m bench.train_step --exp B_lora,D_iada_lora --seq 1024,2048,4096 --images 0,1 --torch

Per case (experiment x sequence length x images per sample) it reports the step time (median
of --steps timed steps after --warmup), tokens/s (batch x sequence / step time), model FLOP
utilisation and peak device memory (where the backend reports it), for our jitted step and,
with --torch, for Qwen3VLForConditionalGeneration + PEFT LoRA (same targets and rank), SDPA,
gradient checkpointing, AdamW over the adapters; then our tokens/s over theirs.

FLOP formula (model FLOPs, what the step must compute, not what it does):
    text forward  F_t = 2 * P_text * B * T  +  4 * L * B * T^2 * Hq * hd
                  (P_text: language-stack matmul weights incl. lm_head; the attention term counts
                  QK^T and AV over the full T x T square)
    vision        F_v = 2 * P_vis * N_patch + 4 * depth * N_patch * L_frame * D_vis  (forward only: frozen)
    step          S = 2 * F_t + F_v + 4 * P_adapters * B * T
                  (the base is frozen: forward plus activation gradients, no weight gradients;
                  the vision tower runs forward only; adapter weight gradients for LoRA and IADA)
    Rematerialised recompute is not counted. MFU = step FLOPs / step time / peak FLOP/s of the
    device (--peak-tflops; default the bf16 dense peak for H100 SXM, 989; none on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, SXM (NVIDIA data sheets)


@dataclasses.dataclass(frozen=True)
class Case:
    exp: str
    seq: int
    images: int  # images per sample (448 x 448 each: 784 patches, 196 visual tokens)
    batch: int


def model_config(tiny: bool):
    from iada_jax.config import Qwen3VLConfig

    return Qwen3VLConfig.tiny(num_hidden_layers=8) if tiny else Qwen3VLConfig.qwen3_vl_2b()


def image_patches(tiny: bool) -> int:
    """Patches per image side: 28 (448 pixels at patch 16, 196 visual tokens); 8 when tiny."""
    return 8 if tiny else 28


# ----------------------------------------------------------------------------- FLOPs


def step_flops(cfg, case: Case, adapter_params: int, tiny: bool = False) -> float:
    t, v = cfg.text, cfg.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    p_text = t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size
    tokens = case.batch * case.seq
    f_text = 2 * p_text * tokens + 4 * t.num_hidden_layers * case.batch * case.seq**2 * q
    f_vis = 0.0
    if case.images:
        side = image_patches(tiny)
        patches = case.batch * case.images * side * side
        merged = v.hidden_size * v.spatial_merge_size**2
        p_block = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
        p_merger = merged * merged + merged * v.out_hidden_size
        p_vis = v.depth * p_block + (1 + len(v.deepstack_visual_indexes)) * p_merger / v.spatial_merge_size**2
        f_vis = 2 * p_vis * patches + 4 * v.depth * patches * side * side * v.hidden_size
    return 2 * f_text + f_vis + 4 * adapter_params * tokens


# ----------------------------------------------------------------------------- inputs


def random_params(cfg, dtype: str, seed: int = 0) -> dict:
    """A parameter tree with the checkpoint layout (convert/mapping.py), random, on device."""
    import jax
    import jax.numpy as jnp

    from convert.mapping import mapping_table, set_path

    params: dict = {}
    key = jax.random.PRNGKey(seed)
    for i, rule in enumerate(mapping_table(cfg)):
        shape = rule.jax_shape
        if rule.jax[-1] == "scale":
            value = jnp.ones(shape, dtype)
        else:
            value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype)
        set_path(params, rule.jax, value)
    return params


def synthetic_examples(cfg, case: Case, tiny: bool, seed: int = 0):
    """B examples of exactly `seq` tokens: images first, then random text; the second half supervised."""
    from iada_jax.data.sft import Example

    rng = np.random.default_rng(seed)
    v = cfg.vision
    side = image_patches(tiny)
    merged = side * side // v.spatial_merge_size**2
    if case.images * (merged + 2) >= case.seq:
        raise ValueError(f"{case.images} image(s) of {merged} tokens do not fit a sequence of {case.seq}")
    out = []
    for _ in range(case.batch):
        ids = list(rng.integers(0, min(cfg.text.vocab_size, 150000) // 2, case.seq))
        pixels = grid = None
        if case.images:
            block = [cfg.vision_start_token_id] + [cfg.image_token_id] * merged + [cfg.vision_end_token_id]
            ids[: len(block) * case.images] = block * case.images
            pixels = rng.standard_normal((case.images * side * side, v.patch_dim)).astype(np.float32)
            grid = np.asarray([[1, side, side]] * case.images, np.int64)
        loss = np.zeros(case.seq, np.int32)
        loss[case.seq // 2:] = 1
        out.append(Example(np.asarray(ids, np.int32), loss, pixels, grid))
    return out


# ----------------------------------------------------------------------------- JAX


def _device_memory():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def build_jax_step(cfg, case: Case, args):
    """The jitted training step on random weights and a synthetic batch, as train.py runs it:
    (step, state, frozen, batch, adapter parameter count). Used by hlo_report.py too."""
    import jax
    import jax.numpy as jnp

    from iada_jax.config import ForwardConfig
    from iada_jax.data.loader import collate
    from iada_jax.experiments import get_experiment
    from iada_jax.model.qwen3_vl import forward, init_adapters
    from iada_jax.training import OptimizerConfig, init_train_state, make_optimizer, train_step

    exp = get_experiment(case.exp, args.block_size)
    fwd = ForwardConfig(block_size=args.block_size, remat=args.remat, attention=args.attention, dtype=args.dtype)
    params = random_params(cfg, args.dtype)
    batch = jax.tree.map(jnp.asarray, collate(synthetic_examples(cfg, case, args.tiny), case.seq, cfg, case.images))
    trainable = jax.jit(lambda k, p: init_adapters(k, p, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada))(
        jax.random.PRNGKey(0), params)
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    adapter_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    tx = make_optimizer(OptimizerConfig(), 1000)
    frozen = {"params": params}
    state = jax.jit(lambda t, f: init_train_state(t, f, tx))(trainable, frozen)

    def forward_fn(frozen, batch, adapters, rng):
        return forward(frozen["params"], batch, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada, adapters=adapters,
                       dropout_rng=rng)[0]

    step = jax.jit(lambda s, f, b, k: train_step(s, f, b, k, forward_fn=forward_fn, tx=tx, accum_steps=1,
                                                 dropout=False, max_grad_norm=1.0), donate_argnums=0)
    return step, state, frozen, batch, adapter_params


def measure_jax(cfg, case: Case, args) -> dict:
    import jax

    step, state, frozen, batch, adapter_params = build_jax_step(cfg, case, args)
    key = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, batch, key)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = step(state, frozen, batch, key)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return _summary("jax", cfg, case, times, adapter_params, args, compile_s=compile_s,
                    loss=float(metrics["loss"]), peak_gib=_device_memory())


# ----------------------------------------------------------------------------- PyTorch


def hf_config(cfg):
    """transformers' Qwen3VLConfig with our config's dimensions."""
    from transformers import Qwen3VLConfig

    t, v = cfg.text, cfg.vision
    return Qwen3VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": list(t.mrope_section), "mrope_interleaved": True}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           num_position_embeddings=v.num_position_embeddings,
                           deepstack_visual_indexes=list(v.deepstack_visual_indexes)),
        tie_word_embeddings=cfg.tie_word_embeddings, image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
    )


def measure_torch(cfg, case: Case, args) -> dict:
    """transformers + PEFT LoRA (the experiment's rank and targets), no IADA: PyTorch has no
    trainable IADA, so the LoRA-only step (B_lora) is the baseline for every experiment."""
    import peft
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from iada_jax.experiments import get_experiment
    from iada_jax.lora import peft_target_modules

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    lora = get_experiment(case.exp, args.block_size).lora
    model = Qwen3VLForConditionalGeneration._from_config(hf_config(cfg), attn_implementation="sdpa", dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=0.0,
                                                       target_modules=peft_target_modules(lora))).to(device)
    if args.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    examples = synthetic_examples(cfg, case, args.tiny)
    ids = torch.as_tensor(np.stack([e.input_ids for e in examples]), device=device, dtype=torch.long)
    labels = torch.where(torch.as_tensor(np.stack([e.loss_mask for e in examples]), device=device) > 0, ids, -100)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    if case.images:
        inputs["pixel_values"] = torch.as_tensor(np.concatenate([e.pixel_values for e in examples]), device=device,
                                                 dtype=dtype)
        inputs["image_grid_thw"] = torch.as_tensor(np.concatenate([e.image_grid_thw for e in examples]), device=device)
        inputs["mm_token_type_ids"] = (ids == cfg.image_token_id).long()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    adapter_params = sum(p.numel() for p in trainable)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one():
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(max(1, args.warmup)):
        one()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = one()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return _summary("torch", cfg, case, times, adapter_params, args, loss=float(loss), peak_gib=peak)


# ----------------------------------------------------------------------------- report


def _summary(stack, cfg, case, times, adapter_params, args, **extra) -> dict:
    step_s = statistics.median(times)
    flops = step_flops(cfg, case, adapter_params, args.tiny)
    peak = args.peak_tflops
    return dict(stack=stack, **dataclasses.asdict(case), step_s=step_s, tokens_per_s=case.batch * case.seq / step_s,
                model_tflops=flops / step_s / 1e12, mfu=None if not peak else flops / step_s / (peak * 1e12),
                adapter_params=adapter_params, **extra)


def _peak_tflops(requested: float | None) -> float | None:
    import jax

    if requested is not None:
        return requested or None
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _versions() -> dict:
    import jax
    import transformers

    out = {"jax": jax.__version__, "transformers": transformers.__version__, "device": jax.devices()[0].device_kind}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| stack | exp | seq | images | batch | step s | tokens/s | model TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stack']} | {r['exp']} | {r['seq']} | {r['images']} | {r['batch']} | {r['step_s']:.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.3f} | {_fmt(r['mfu'], '.1%')} | "
                     f"{_fmt(r.get('peak_gib'), '.1f')} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Our tokens/s over the PyTorch LoRA baseline's, and IADA's cost over LoRA-only, per shape."""
    out = []
    by = {(r["stack"], r["exp"], r["seq"], r["images"]): r for r in rows}
    for (stack, exp, seq, images), r in by.items():
        if stack != "jax":
            continue
        base = by.get(("torch", "B_lora", seq, images))  # PyTorch has no IADA: LoRA-only is the baseline
        if base:
            out.append(f"{exp} seq {seq} images {images}: jax / torch tokens/s = "
                       f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
        lora = by.get(("jax", "B_lora", seq, images))
        if exp != "B_lora" and lora:
            out.append(f"{exp} seq {seq} images {images}: step time over B_lora = {r['step_s'] / lora['step_s'] - 1:+.1%}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU check of the harness)")
    ap.add_argument("--exp", default="B_lora,D_iada_lora")
    ap.add_argument("--seq", default="1024,2048,4096")
    ap.add_argument("--images", default="0,1", help="images per sample, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--torch", action="store_true", help="also measure transformers + PEFT")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (0: do not report)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    args.peak_tflops = _peak_tflops(args.peak_tflops)
    cfg = model_config(args.tiny)
    rows = []
    for exp in args.exp.split(","):
        for seq in (int(s) for s in args.seq.split(",")):
            for images in (int(i) for i in args.images.split(",")):
                case = Case(exp=exp, seq=seq, images=images, batch=args.batch)
                rows.append(measure_jax(cfg, case, args))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                if args.torch and exp == args.exp.split(",")[0]:
                    rows.append(measure_torch(cfg, dataclasses.replace(case, exp="B_lora"), args))
                    print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    report = {"versions": _versions(), "args": vars(args), "rows": rows}
    print(table(rows))
    for line in ratios(rows):
        print(line)
    print("FLOPs: 2 x text forward (forward + activation gradients; frozen base: no weight gradients) + vision "
          "forward + 4 x adapter params x tokens; attention counted over the full T x T; recompute not counted.")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
