"""Steady-state training-step speed of one case: our step (`iada_jax.train.step.TrainProgram`,
the one train.py runs) or transformers + PEFT, on random weights and a synthetic batch.

    python -m bench.train_step --stack jax --exp D_iada_lora --seq 2048 --batch 8 --images 0   # 2B dims
    python -m bench.train_step --stack torch --exp B_lora --seq 2048 --batch 8
    python -m bench.train_step --tiny --dtype float32 --seq 64 --batch 2 --stack jax           # CPU check
    python -m bench.train_step --lengths llava --pack --seq 2048 --batch 16 --pack-batch 4     # packed vs bucketed

One case per process, so the peak memory is the case's own (a process-lifetime maximum would
mix cases) and neither stack's allocator starves the other; `bench/device_run.sh` runs the
cases in order. The row (JSON, `--out`) gives the step time (median over --steps optimizer
steps after --warmup, each of --grad-accum micro-batches; step_s is per micro-batch),
tokens/s (batch x sequence / step_s: padded tokens, all real here), model TFLOP/s, MFU,
peak device memory, and for our stack the compile time and XLA's compiled memory analysis.

`--lengths llava --pack` (our stack only) compares the two layouts of train.py on the same
--samples samples, drawn to the shape of the llava-instruct-mix-like set (`llava_lengths`: the
bucket shares and means of its index; one image each): bucketed (`collate` into power-of-two
length buckets, --batch samples a batch, one compiled program per bucket) against packed
(`pack` + `collate_packed` into --pack-batch rows of --seq tokens). Each layout steps through
every sample once per timed pass (--passes), so the rates are per token of the same work:
real (non-padding) tokens/s, token slots/s, the real fraction, step time per batch, real
tokens per step, compile time, and the ratio of real tokens/s packed / bucketed. Incomplete
bucketed batches are dropped (as the loader drops them) and a last packed batch completed with
empty rows is not timed: both are an epoch's end. --check-loss: the loss of every sample in
each layout, which must agree (tests/test_bench_harness.py asserts it at tiny size).

FLOP formula (model FLOPs per micro-batch, what the step must compute, not what it does):
    text forward  F_t = 2 * P_text * B * T  +  4 * L * B * T^2 * Hq * hd
                  (P_text: language-stack matmul weights incl. lm_head; the attention term counts
                  QK^T and AV over the full T x T square)
    vision        F_v = 2 * P_vis * N_patch + 4 * depth * N_patch * L_frame * D_vis  (forward only: frozen)
    step          S = 2 * F_t + F_v + 4 * P_adapters * B * T
                  (the base is frozen: forward plus activation gradients, no weight gradients;
                  the vision tower runs forward only; adapter weight gradients for LoRA and IADA)
    Rematerialised recompute is not counted. MFU = S / step time / peak FLOP/s of the device
    (--peak-tflops; default the bf16 dense peak of an H100 / H200 SXM, 989; none on CPU).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shlex
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
    batch: int  # micro-batch
    grad_accum: int = 1


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


def build_jax_case(cfg, case: Case, args):
    """(program, state, frozen, batch): train.py's training program on random weights and a
    synthetic batch collated by the loader's `collate`. Used by hlo_report.py and memory.py too."""
    import jax
    import jax.numpy as jnp

    from convert.random_init import random_params
    from iada_jax.config import ForwardConfig
    from iada_jax.data.loader import collate
    from iada_jax.experiments import get_experiment
    from iada_jax.model.layers import resolve_attention
    from iada_jax.train.optimizer import OptimizerConfig
    from iada_jax.train.step import TrainProgram

    exp = get_experiment(case.exp, args.block_size)
    args.attention = resolve_attention(args.attention, args.dtype)  # "auto" -> what train.py would run
    fwd = ForwardConfig(block_size=args.block_size, remat=args.remat, attention=args.attention, dtype=args.dtype)
    program = TrainProgram(cfg, exp, fwd, OptimizerConfig(), total_steps=1000, grad_accum=case.grad_accum)
    params = random_params(cfg, args.dtype)
    examples = synthetic_examples(cfg, case, args.tiny)
    batch = jax.tree.map(jnp.asarray, collate(examples, case.seq, cfg, max_images=case.images))
    frozen = {"params": params}
    state = program.init_state(program.new_adapters(jax.random.PRNGKey(0), params), frozen)
    return program, state, frozen, batch


def _device_peak_gib():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def compiled_memory_gib(compiled) -> dict:
    """XLA's compiled memory analysis: arguments, outputs, temporaries and their sum less the
    donated (aliased) bytes, which is the program's peak footprint."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = lambda n: n / 2**30  # noqa: E731
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"compiled_args_gib": gib(m.argument_size_in_bytes), "compiled_temp_gib": gib(m.temp_size_in_bytes),
            "compiled_total_gib": gib(total)}


def measure_jax(cfg, case: Case, args) -> dict:
    import jax

    program, state, frozen, batch = build_jax_case(cfg, case, args)
    key = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    compiled = program.step.lower(state, frozen, batch, key).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled_memory_gib(compiled)

    def optimizer_step(state):
        for _ in range(case.grad_accum):
            state, metrics = compiled(state, frozen, batch, key)
        jax.block_until_ready(metrics["nll_sum"])
        return state, metrics

    t0 = time.perf_counter()
    state, metrics = optimizer_step(state)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = optimizer_step(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = optimizer_step(state)
        times.append((time.perf_counter() - t0) / case.grad_accum)
    adapter_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["trainable"]))
    loss = float(metrics["nll_sum"]) / max(float(metrics["tokens"]), 1.0)
    return _summary("jax", cfg, case, times, adapter_params, args, compile_s=compile_s, first_step_s=first_s,
                    loss=loss, peak_gib=_device_peak_gib(), **memory)


# ----------------------------------------------------------------------------- packed against bucketed

# The llava-instruct-mix-like set's sample lengths (bench/RESULTS.md, the index of the generated
# 259K rows): (shortest, longest, rows, mean real tokens) of each power-of-two bucket holding rows.
LLAVA_BUCKETS = ((129, 256, 838, 254.3), (257, 512, 201506, 416.7), (513, 695, 56656, 556.3))
# One image per sample of (h, w) patches: 273 visual tokens at 2B (the set's mean is 275), a
# narrower one when a sample cannot hold it and 32 text tokens (5% of the samples; about 271
# visual tokens a sample on average). --tiny: lengths / 8 and a 25-token image that every sample holds,
# so that each layout compiles what it does at 2B (a program per bucket; one packed).
LLAVA_GRID = {False: (26, 42), True: (10, 10)}
LLAVA_TINY_SCALE = 8


def llava_lengths(n: int, rng: np.random.Generator, scale: int = 1) -> np.ndarray:
    """n sample lengths of the set's shape, in a random order: each bucket's share of the n as
    its share of the rows (rounded, largest remainders first, so that even a few hundred
    samples fill the buckets in proportion), each length in its bucket from a Beta of the
    bucket's mean (Beta(a, 1) or Beta(1, b), skewed toward the side the mean lies on);
    divided by `scale`."""
    lo, hi, rows, mean = (np.asarray(c, np.float64) for c in zip(*LLAVA_BUCKETS))
    share = n * rows / rows.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[: n - counts.sum()]] += 1
    which = rng.permutation(np.repeat(np.arange(len(rows)), counts))
    m = (mean - lo) / (hi - lo)
    a, b = np.where(m > 0.5, m / (1 - m), 1.0), np.where(m > 0.5, 1.0, (1 - m) / m)
    lengths = lo[which] + rng.beta(a[which], b[which]) * (hi - lo)[which]
    return np.maximum(np.round(lengths / scale), 8).astype(np.int64)


def llava_examples(cfg, n: int, tiny: bool, seed: int = 0):
    """n examples of llava-like lengths: one image first, then random text; the second half of
    each sample supervised. Samples of one image shape share its (random) pixels."""
    from iada_jax.data.sft import Example

    rng = np.random.default_rng(seed)
    scale = LLAVA_TINY_SCALE if tiny else 1
    merge = cfg.vision.spatial_merge_size
    h, widest = LLAVA_GRID[tiny]
    text_min = 32 // scale
    pixels = {}
    out = []
    for length in llava_lengths(n, rng, scale).tolist():
        w = min(widest, (length - 2 - text_min) * merge**2 // h // merge * merge)
        if w < merge:
            raise ValueError(f"a sample of {length} tokens cannot hold an image and {text_min} text tokens")
        visual = h * w // merge**2
        ids = rng.integers(0, min(cfg.text.vocab_size, 150000) // 2, length).astype(np.int32)
        ids[: visual + 2] = [cfg.vision_start_token_id] + [cfg.image_token_id] * visual + [cfg.vision_end_token_id]
        if w not in pixels:
            pixels[w] = rng.standard_normal((h * w, cfg.vision.patch_dim)).astype(np.float32)
        loss = np.zeros(length, np.int32)
        loss[length // 2:] = 1
        out.append(Example(ids, loss, pixels[w], np.asarray([[1, h, w]], np.int64)))
    return out


def llava_layouts(cfg, examples, seq: int, batch: int, pack_batch: int, pack_samples: int = 16):
    """(bucketed, packed): host Batches of the same examples, as the loader lays them out.

    bucketed: power-of-two length buckets up to seq (DataConfig.text_buckets), `batch` samples
    a batch, a batch emitted when its bucket fills, incomplete ones dropped (SFTData.epoch_plan);
    packed: exactly the samples the bucketed layout kept, placed by `pack` (first-fit
    decreasing, one window) into rows of seq tokens, `pack_batch` rows a batch, the last
    completed with empty rows, collated by `collate_packed`. Every packed batch gets the vision
    frame bucket of the largest (the loader's, min_frames = rows x images, would give some
    batches a smaller one): one program, a little more vision padding for a few batches."""
    from iada_jax.data.loader import DataConfig, collate, next_pow2
    from iada_jax.data.packing import collate_packed, pack

    buckets = np.asarray(DataConfig(path="", max_length=seq).text_buckets())
    lengths = np.asarray([len(e.input_ids) for e in examples])
    if lengths.max() > seq:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit --seq {seq}")
    pending, plan = collections.defaultdict(list), []
    for i, b in enumerate(buckets[np.searchsorted(buckets, lengths)].tolist()):
        pending[b].append(i)
        if len(pending[b]) == batch:
            plan.append((b, pending.pop(b)))
    kept = np.asarray(sorted(i for _, rows in plan for i in rows))
    bucketed = [collate([examples[i] for i in rows], b, cfg, max_images=1) for b, rows in plan]
    images = np.asarray([len(e.image_grid_thw) for e in examples])
    rows = pack(kept, lengths, images, seq, pack_samples, pack_samples, window=len(kept))
    rows += [[] for _ in range(-len(rows) % pack_batch)]
    groups = [rows[i:i + pack_batch] for i in range(0, len(rows), pack_batch)]
    frames = max(next_pow2(int(sum(images[r].sum() for r in g)), pack_batch) for g in groups)
    packed = [collate_packed([[examples[i] for i in r] for r in g], seq, cfg, pack_samples, min_frames=frames)
              for g in groups]
    return bucketed, packed


def moved(trainable, scale: float = 0.05, seed: int = 1):
    """The adapters plus Gaussian noise: fresh LoRA B and IADA gates are zero, and a loss
    compared at them would not see the adapters at all."""
    import jax

    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def layout_loss(program, trainable, frozen, batches) -> float:
    """The token-weighted mean loss of the batches (the training loss, without dropout)."""
    import jax
    import jax.numpy as jnp

    nll = jax.jit(program.nll_sum)
    total = count = 0.0
    for batch in batches:
        s, n = nll(trainable, frozen, jax.tree.map(jnp.asarray, batch), None)
        total, count = total + float(s), count + float(n)
    return total / count


def time_layout(program, state, frozen, batches, key, passes: int):
    """Compile the step once per batch shape, run one step of each, then `passes` timed passes
    over all the batches (each synchronised). Returns (state, measurements)."""
    import jax
    import jax.numpy as jnp

    real = [int(b.attention_mask.sum()) for b in batches]
    slots = [int(b.attention_mask.size) for b in batches]
    batches = [jax.tree.map(jnp.asarray, b) for b in batches]
    programs, compile_s, memory = {}, 0.0, []
    signature = [(jax.tree.structure(b), tuple(x.shape for x in jax.tree.leaves(b))) for b in batches]
    for sig, b in zip(signature, batches):
        if sig not in programs:
            t0 = time.perf_counter()
            programs[sig] = program.step.lower(state, frozen, b, key).compile()
            compile_s += time.perf_counter() - t0
            memory.append(compiled_memory_gib(programs[sig]).get("compiled_total_gib"))
            state, metrics = programs[sig](state, frozen, b, key)  # the first run of each program, not timed
            jax.block_until_ready(metrics["nll_sum"])
    times = []
    for _ in range(passes):
        for sig, b in zip(signature, batches):
            t0 = time.perf_counter()
            state, metrics = programs[sig](state, frozen, b, key)
            jax.block_until_ready(metrics["nll_sum"])
            times.append(time.perf_counter() - t0)
    wall = sum(times)
    lengths = collections.Counter(int(b.input_ids.shape[1]) for b in batches)
    out = dict(batches=len(batches), batch_rows=int(batches[0].input_ids.shape[0]),
               lengths={str(k): v for k, v in sorted(lengths.items())},
               programs=len(programs), compile_s=compile_s, step_s=wall / len(times),
               real_tokens_per_s=passes * sum(real) / wall, token_slots_per_s=passes * sum(slots) / wall,
               real_fraction=sum(real) / sum(slots), real_tokens_per_step=sum(real) / len(batches),
               compiled_total_gib=max((m for m in memory if m is not None), default=None))
    if batches[0].vision is not None:  # frames a batch's vision tower runs, and how many hold an image
        out["vision_frames"] = int(batches[0].vision.frame_lengths.shape[0])
        out["images_per_batch"] = float(np.mean([int((b.vision.frame_lengths > 0).sum()) for b in batches]))
    return state, out


def measure_layouts(cfg, args) -> dict:
    """Bucketed (and with --pack, packed) training steps over the same llava-like samples."""
    import jax

    from convert.random_init import random_params
    from iada_jax.config import ForwardConfig
    from iada_jax.experiments import get_experiment
    from iada_jax.model.layers import resolve_attention
    from iada_jax.train.optimizer import OptimizerConfig
    from iada_jax.train.step import TrainProgram

    exp = get_experiment(args.exp, args.block_size)
    args.attention = resolve_attention(args.attention, args.dtype)  # "auto" -> what train.py would run
    fwd = ForwardConfig(block_size=args.block_size, remat=args.remat, attention=args.attention, dtype=args.dtype)
    program = TrainProgram(cfg, exp, fwd, OptimizerConfig(), total_steps=1000)
    params = random_params(cfg, args.dtype)
    frozen = {"params": params}
    examples = llava_examples(cfg, args.samples, args.tiny)
    bucketed, packed = llava_layouts(cfg, examples, args.seq, args.batch, args.pack_batch, args.pack_samples)
    # Steady state: a last packed batch completed with empty rows (an epoch's end, once in
    # thousands of batches at the set's size) is not timed, as the bucketed layout's incomplete
    # batches are not formed at all.
    full = [b for b in packed if (b.segment_ids.max(axis=1) > 0).all()]
    layouts = {"bucketed": bucketed, **({"packed": full} if args.pack else {})}
    state = program.init_state(program.new_adapters(jax.random.PRNGKey(0), params), frozen)
    row = dict(kind="layouts", stack="jax", exp=args.exp, seq=args.seq, dtype=args.dtype, remat=args.remat,
               attention=args.attention, lengths="llava", samples_drawn=len(examples),
               samples=sum(b.input_ids.shape[0] for b in bucketed), passes=args.passes,
               visual_tokens_per_sample=float(np.mean([(e.input_ids == cfg.image_token_id).sum() for e in examples])),
               basis="per real token: each layout steps through its full batches of the same samples once a pass")
    if args.check_loss and args.pack:  # every sample, the last packed batch included
        trainable = moved(state["trainable"])
        losses = {name: layout_loss(program, trainable, frozen, batches)
                  for name, batches in (("bucketed", bucketed), ("packed", packed))}
        row["loss_check"] = dict(losses, relative_difference=abs(losses["packed"] / losses["bucketed"] - 1))
    key = jax.random.PRNGKey(1)
    for name, batches in layouts.items():
        state, row[name] = time_layout(program, state, frozen, batches, key, args.passes)
    if args.pack:
        row["packed"]["untimed_batches"] = len(packed) - len(full)
        row["packed"]["samples_per_row"] = row["samples"] / sum(int((b.segment_ids.max(axis=1) > 0).sum())
                                                                  for b in packed)
        row["ratio"] = row["packed"]["real_tokens_per_s"] / row["bucketed"]["real_tokens_per_s"]
    row["peak_gib"] = _device_peak_gib()
    return row


# ----------------------------------------------------------------------------- PyTorch


def hf_vision_kwargs(ids, pixel_values, grid):
    """The vision keyword arguments of transformers' Qwen3-VL forward. `mm_token_type_ids`
    (1 at image placeholders) is passed only to versions whose forward takes it (5.23 does;
    the GPU image's 5.17 may not)."""
    import inspect

    from transformers.models.qwen3_vl import modeling_qwen3_vl

    kw = dict(pixel_values=pixel_values, image_grid_thw=grid)
    if "mm_token_type_ids" in inspect.signature(modeling_qwen3_vl.Qwen3VLModel.forward).parameters:
        kw["mm_token_type_ids"] = ids
    return kw


def measure_torch(cfg, case: Case, args) -> dict:
    """transformers + PEFT LoRA (the experiment's rank and targets), no IADA: PyTorch has no
    trainable IADA, so the LoRA-only step (B_lora) is the baseline for every experiment."""
    import peft
    import torch
    import transformers
    from transformers import Qwen3VLForConditionalGeneration

    from iada_jax.experiments import get_experiment
    from iada_jax.lora import peft_target_modules

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    lora = get_experiment(case.exp, args.block_size).lora
    with torch.device(device):  # initialise on the device: seconds, not minutes, at 2B
        model = Qwen3VLForConditionalGeneration._from_config(transformers.Qwen3VLConfig(**cfg.to_hf_config()),
                                                             attn_implementation="sdpa", dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha,
                                                       lora_dropout=lora.lora_dropout,
                                                       target_modules=peft_target_modules(lora)))
    if args.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    examples = synthetic_examples(cfg, case, args.tiny)
    ids = torch.as_tensor(np.stack([e.input_ids for e in examples]), device=device, dtype=torch.long)
    labels = torch.where(torch.as_tensor(np.stack([e.loss_mask for e in examples]), device=device) > 0, ids, -100)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    if case.images:
        pixels = torch.as_tensor(np.concatenate([e.pixel_values for e in examples]), device=device, dtype=dtype)
        grid = torch.as_tensor(np.concatenate([e.image_grid_thw for e in examples]), device=device)
        inputs.update(hf_vision_kwargs((ids == cfg.image_token_id).long(), pixels, grid))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    adapter_params = sum(p.numel() for p in trainable)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def optimizer_step():
        for _ in range(case.grad_accum):
            loss = model(**inputs).loss
            (loss / case.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    optimizer_step()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        optimizer_step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = optimizer_step()
        times.append((time.perf_counter() - t0) / case.grad_accum)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return _summary("torch", cfg, case, times, adapter_params, args, first_step_s=first_s, loss=float(loss),
                    peak_gib=peak)


# ----------------------------------------------------------------------------- report


def emit_row(row: dict, module: str, argv, out: str | None) -> None:
    """A bench row with the versions and the command that made it: printed as one JSON line
    (what bench/device_run.py reads), and written to `out` when given."""
    row.update(versions=versions(), command=f"python -m {module} " + " ".join(shlex.quote(a) for a in
                                                                               (argv or sys.argv[1:])))
    print(json.dumps(row))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(row, f, indent=1)


def versions() -> dict:
    """Installed versions (read from package metadata: nothing is imported or initialised)."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "peft", "torch", "datasets",
                 "numpy", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(stack: str) -> str:
    if stack == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    import jax

    d = jax.devices()[0]
    return d.device_kind if d.platform != "cpu" else "cpu"


def _summary(stack, cfg, case, times, adapter_params, args, **extra) -> dict:
    step_s = statistics.median(times)
    flops = step_flops(cfg, case, adapter_params, args.tiny)
    peak = args.peak_tflops
    return dict(kind="step", stack=stack, **dataclasses.asdict(case), dtype=args.dtype, remat=args.remat,
                attention="sdpa" if stack == "torch" else args.attention, step_s=step_s,
                tokens_per_s=case.batch * case.seq / step_s,
                model_tflops=flops / step_s / 1e12, mfu=None if not peak else flops / step_s / (peak * 1e12),
                adapter_params=adapter_params, **extra)


def peak_tflops(requested: float | None, device: str) -> float | None:
    if requested is not None:
        return requested or None
    return next((v for k, v in PEAK_TFLOPS.items() if k in device), None)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", choices=["jax", "torch"], default="jax")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU check of the harness)")
    ap.add_argument("--exp", default="D_iada_lora")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--images", type=int, default=0, help="images per sample")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                    help="jax stack: auto (train.py's default: cuDNN on an NVIDIA GPU with bf16, else XLA), xla, cudnn")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--lengths", choices=["fixed", "llava"], default="fixed",
                    help="fixed: every sample --seq tokens (--images square images); llava: --samples samples of the "
                         "llava-instruct-mix-like set's lengths, one image each, in power-of-two buckets of --batch")
    ap.add_argument("--pack", action="store_true",
                    help="with --lengths llava: also the same samples packed, --pack-batch rows of --seq tokens")
    ap.add_argument("--pack-batch", type=int, default=4, help="packed rows a batch")
    ap.add_argument("--pack-samples", type=int, default=16, help="at most this many samples in a packed row")
    ap.add_argument("--samples", type=int, default=256, help="--lengths llava: samples drawn")
    ap.add_argument("--passes", type=int, default=2, help="--lengths llava: timed passes over all the batches")
    ap.add_argument("--check-loss", action="store_true",
                    help="with --pack: the loss (no dropout) of both layouts before training, which must be equal")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (0: do not report)")
    ap.add_argument("--out", default=None, help="write the row as JSON here")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = model_config(args.tiny)
    case = Case(exp=args.exp, seq=args.seq, images=args.images, batch=args.batch, grad_accum=args.grad_accum)
    device = device_name(args.stack)
    args.peak_tflops = peak_tflops(args.peak_tflops, device)
    if args.lengths == "llava":
        if args.stack != "jax":
            raise SystemExit("--lengths llava measures our step only (--stack jax)")
        row = measure_layouts(cfg, args)
    else:
        row = (measure_jax if args.stack == "jax" else measure_torch)(cfg, case, args)
    row.update(device=device)
    emit_row(row, "bench.train_step", argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
