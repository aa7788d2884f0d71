"""Does the loader keep up? Batches per second of `SFTData.iterate` at the paper's settings
(batch 16, one 640x480 JPEG per row, sequence up to 2048, Qwen3-VL-2B geometry, the default
pixel limits), against what the training step consumes.

    python -m bench.loader_speed --data /big/loader640 [--batches 40] [--workers 2]

The step's need: the GPU row of bench/RESULTS.md when there is one (pass --step-s), else the
step's FLOPs (bench/train_step.step_flops for D_iada_lora at each batch's own text length)
at 45% MFU of an H100's 989 bf16 TFLOP/s. Headroom = the step's time / the loader's time per
batch; the consumer here does nothing else, as the training loop's main thread only dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loader_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder for the generated rows (created when missing)")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mfu", type=float, default=0.45)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    ap.add_argument("--step-s", type=float, default=None, help="a measured step time (s) to compare with instead")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from bench.index_speed import model_folder
    from bench.llava_like import write
    from bench.train_step import Case, step_flops
    from iada_jax.data.image_processing import ImageProcessorConfig
    from iada_jax.data.loader import DataConfig, SFTData
    from iada_jax.experiments import get_experiment
    from iada_jax.pretrained import load_config
    from iada_jax.train.loop import TrainConfig

    data = os.path.abspath(args.data)
    shards = os.path.join(data, "shards")
    if not os.path.isfile(os.path.join(shards, "llava_like.json")):
        write(shards, args.rows, image_size=(640, 480), shard_rows=2000)
    model = model_folder(os.path.join(data, "model"))
    tok = AutoTokenizer.from_pretrained(model)
    cfg, image = load_config(model)
    image = ImageProcessorConfig(**{**image.__dict__, "min_pixels": TrainConfig.min_pixels,
                                    "max_pixels": TrainConfig.max_pixels})
    sft = SFTData(DataConfig(path=shards, max_length=args.max_length, batch_size=args.batch_size,
                             workers=args.workers, index_cache=os.path.join(data, "index_cache")),
                  tok, image, cfg, log=lambda *a: print(*a, file=sys.stderr))
    exp = get_experiment("D_iada_lora")
    adapter_params = 0  # the adapters' FLOPs left out: a shorter step, so a stricter need on the loader

    lengths, t_first, t0 = [], None, time.perf_counter()
    for k, (_, batch) in enumerate(sft.iterate()):
        if k == 0:
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
        else:
            lengths.append(batch.input_ids.shape[1])
        if len(lengths) == args.batches:
            break
    seconds = time.perf_counter() - t0
    per_batch = seconds / len(lengths)
    flops = [step_flops(cfg, Case(exp.name, seq=n, images=1, batch=args.batch_size), adapter_params) for n in lengths]
    step_s = args.step_s or sum(flops) / len(flops) / (args.mfu * args.peak_tflops * 1e12)
    result = {
        "batch_size": args.batch_size, "max_length": args.max_length, "workers": args.workers, "cpus": os.cpu_count(),
        "image": "640x480 JPEG", "batches": len(lengths), "first_batch_s": t_first,
        "batches_per_s": 1 / per_batch, "rows_per_s": args.batch_size / per_batch,
        "mean_text_length": sum(lengths) / len(lengths),
        "step_s_needed": step_s, "step_basis": "measured" if args.step_s else
        f"D_iada_lora FLOPs at {args.mfu:.0%} MFU of {args.peak_tflops:.0f} TFLOP/s",
        "headroom": step_s / per_batch,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
