"""Device memory of the real training step at Qwen3-VL-2B dimensions, from XLA's compiled
memory analysis, on the CPU, without running anything (the weights are abstract shapes).

    python -m bench.memory                                   # micro-batch 1, 2, 4, 8 x 2048; text and 1 image
    python -m bench.memory --batch 8 --images 0 --remat full,qkv,proj

Per case: the step `train.py` runs (`TrainProgram`, experiment D: LoRA + IADA; bf16 base and
compute, float32 adapters and Adam), compiled for the CPU backend: arguments (base weights,
train state, batch), temporaries (activations kept for the backward, and the workspace), and
their sum less what the donated state aliases: the program's peak. The CPU backend also keeps
float32 copies of the bf16 weight stacks (it has no bf16 matmul); a GPU does not, so the last
column subtracts them (`cpu_weight_upcast_bytes`). A GPU program differs further
(fusion, algorithms, cuDNN attention), so these are estimates for planning, and the GPU run's
measured peaks (bench/device_run.sh) take precedence. Attention is "xla", train.py's default:
its scores and probabilities [B, 16, T, T] are materialised in float32 per layer being
recomputed, the largest term per sample at T = 2048; cuDNN's fused attention
(`--attention cudnn`, GPU only, not compilable here) keeps none of them. The paper's effective batch of 16 is
micro-batch x accumulation: memory is the micro-batch's (accumulation adds one gradient sum).
"""

from __future__ import annotations

import argparse
import sys
import time


def step_memory(cfg, exp_name: str, seq: int, batch: int, images: int, remat: str, attention: str = "xla",
                block_size: int = 4) -> dict:
    """Compiled memory (GiB) of one micro-batch step, abstract inputs only."""
    import jax
    import jax.numpy as jnp

    from bench.train_step import Case, synthetic_examples
    from convert.random_init import random_params
    from iada_jax.config import ForwardConfig
    from iada_jax.data.loader import collate
    from iada_jax.experiments import get_experiment
    from iada_jax.train.optimizer import OptimizerConfig
    from iada_jax.train.step import TrainProgram

    exp = get_experiment(exp_name, block_size)
    fwd = ForwardConfig(block_size=block_size, remat=remat, attention=attention, dtype="bfloat16")
    program = TrainProgram(cfg, exp, fwd, OptimizerConfig(), total_steps=1000, grad_accum=2)
    shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    params = jax.eval_shape(lambda: random_params(cfg, "bfloat16"))
    frozen = {"params": params}
    trainable = jax.eval_shape(program._adapters, jax.ShapeDtypeStruct((2,), jnp.uint32), params)
    state = jax.eval_shape(program._state, trainable, frozen)
    examples = synthetic_examples(cfg, Case(exp_name, seq, images, batch), tiny=cfg.vision.patch_size == 4)
    data = jax.tree.map(shape, collate(examples, seq, cfg, max_images=max(images, 1) if images else 1))
    t0 = time.perf_counter()
    compiled = program.step.lower(state, frozen, data, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = 2**30
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    upcast = cpu_weight_upcast_bytes(compiled.as_text(), params["model"]["language_model"])
    return {"args_gib": m.argument_size_in_bytes / gib, "temp_gib": m.temp_size_in_bytes / gib,
            "total_gib": total / gib, "upcast_gib": upcast / gib, "estimate_gib": (total - upcast) / gib,
            "compile_s": seconds}


def cpu_weight_upcast_bytes(hlo_text: str, params) -> int:
    """Bytes of the float32 copies XLA's CPU backend makes of the bf16 weight matrices in params
    (the step passes the language model's: they are what is live at the backward's peak; the
    frozen vision tower runs before it, and its copies would only lower the estimate).

    The CPU backend has no bf16 matmul: it converts each bf16 weight stack (e.g. the 28 stacked
    q projections, [28, 2048, 2048]) to float32 before the dot, and those copies are in its
    temporaries (checked in the compiled HLO: `f32[28,2048,6144] convert(...)`). A GPU multiplies
    bf16 natively and makes no such copy. Counted here: 4 bytes per element of every bf16 weight
    leaf (2 dims or more) whose element count matches an f32 `convert` in the compiled program,
    each weight once (the program may convert one twice, forward and backward).
    """
    import re

    import jax

    converted = set()
    for m in re.finditer(r"= f32\[([0-9,]+)\]\S* convert\(", hlo_text):
        n = 1
        for d in m.group(1).split(","):
            n *= int(d)
        converted.add(n)
    return sum(4 * leaf.size for leaf in jax.tree.leaves(params)
               if str(leaf.dtype) == "bfloat16" and len(leaf.shape) >= 2 and leaf.size in converted)


def main(argv=None) -> int:
    from iada_jax.config import Qwen3VLConfig

    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-vl-2b")
    ap.add_argument("--exp", default="D_iada_lora")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--images", default="0,1", help="images per sample (448 x 448), comma-separated")
    ap.add_argument("--remat", default="full,qkv,proj")
    args = ap.parse_args(argv)
    cfg = Qwen3VLConfig.preset(args.preset)
    print("| preset | exp | remat | micro-batch x seq | images | args GiB | temp GiB | CPU peak GiB "
          "| CPU f32 weight copies GiB | peak without them GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for remat in args.remat.split(","):
        for images in (int(i) for i in args.images.split(",")):
            for batch in (int(b) for b in args.batch.split(",")):
                r = step_memory(cfg, args.exp, args.seq, batch, images, remat)
                print(f"| {args.preset} | {args.exp} | {remat} | {batch} x {args.seq} | {images} | {r['args_gib']:.1f} | "
                      f"{r['temp_gib']:.1f} | {r['total_gib']:.1f} | {r['upcast_gib']:.1f} | {r['estimate_gib']:.1f} |",
                      flush=True)
                print(f"  (compiled in {r['compile_s']:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
