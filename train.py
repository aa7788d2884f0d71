"""Fine-tune Qwen3-VL with LoRA + IADA (or any experiment of the paper, or every weight: --exp full).

    python train.py                                  # embedded default: tiny model, synthetic data, CPU
    python train.py --model CKPT --data PATH --exp D_iada_lora --out runs/d \\
        --batch-size 4 --grad-accum 4 --max-length 1024 --epochs 1
    python train.py ... --resume                     # continue the run in --out exactly

CKPT: a converted checkpoint (python -m convert import-hf) or a Hugging Face folder, with its
tokenizer. PATH: parquet / json / jsonl / arrow file, a save_to_disk folder or a cached data
set name, in the trl-lib/llava-instruct-mix schema (images, prompt, completion) or messages.
Experiments: python -m iada_jax.params lists them with their parameter counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from iada_jax.train.loop import TrainConfig, TrainingError, fit


HELP = {
    "pack_samples": "with --pack: at most this many samples in a packed row (default 16)",
    "pack_window": "with --pack: rows placed first-fit decreasing together, from the shuffled order (default 2048)",
    "min_pixels": "images are resized to at least this many pixels (default 200704 = 256*28*28, lmms-eval's "
                  "qwen3_vl; README 'Images')",
    "max_pixels": "... and at most this many (default 1605632, lmms-eval's qwen3_vl: 1568 visual tokens)",
    "index_cache": "folder of cached data indexes (default $IADA_JAX_CACHE/index or ~/.cache/iada_jax/index; "
                   "'' for none)",
    "workers": "processes that build the data index, threads that decode images (default 2)",
    "init_adapters": "start from trained adapters: a run directory or an adapters folder "
                     "(python -m convert import-peft turns a PEFT LoRA adapter into one)",
    "vision_lr": "with --exp full: the vision tower's peak learning rate (default: --base-lr; 0 keeps the tower "
                 "as loaded, with no optimizer state and no backward through it)",
    "attention": "attention kernel: auto (default: cuDNN's fused attention on an NVIDIA GPU with bf16 compute, "
                 "XLA elsewhere), xla or cudnn",
    "base_lr": "peak learning rate of the base's own weights, with --exp full (AdamW on a float32 master "
               "copy, the schedule of the adapters; default 1e-4)",
}


def parse(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    ap.add_argument("--model", help="checkpoint or HF folder (default: the embedded tiny model)")
    ap.add_argument("--data", help="data file or folder (default: the embedded synthetic data)")
    ap.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "data", "out", "resume", "progress", "buckets", "index_only", "messages_loss", "pack"):
            continue
        kind = {int: int, float: float, str: str}.get(type(f.default), None)
        if f.name in ("steps", "lora_r", "block_size", "stop_after"):
            kind = int
        if f.name in ("max_grad_norm", "vision_lr"):
            kind = float
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=defaults[f.name],
                        help=HELP.get(f.name, f"default: {defaults[f.name]}"))
    ap.add_argument("--buckets", type=lambda s: tuple(int(x) for x in s.split(",")), default=(),
                    help="text length buckets, e.g. 256,512,1024 (default: powers of two up to --max-length)")
    ap.add_argument("--messages-loss", choices=("all", "assistant"), default=defaults["messages_loss"],
                    help="messages rows: supervise all tokens (TRL's default) or the assistant turns only")
    ap.add_argument("--index-only", action="store_true",
                    help="build (or load) the data index, print usable rows, skips, buckets and padding, exit")
    ap.add_argument("--pack", action="store_true",
                    help="pack several samples into each row of --max-length tokens (attention and IADA stay "
                         "inside each sample; README 'Packing')")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = vars(ap.parse_args(argv))
    if args["model"] is None or args["data"] is None:
        if (args["model"] is None) != (args["data"] is None):
            ap.error("give both --model and --data, or neither (the embedded default)")
        from iada_jax.embedded import PREPROCESSOR_CONFIG, prepare_embedded

        args["model"], args["data"] = prepare_embedded()
        size = PREPROCESSOR_CONFIG["size"]  # the tiny model's 64x64 images (64 visual tokens)
        for name, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
            if args[name] == defaults[name]:
                args[name] = value
        # Sized for 2 CPU cores: float32 (CPU bf16 matmuls are slow), short buckets.
        for name, value in dict(dtype="float32", param_dtype="float32", remat="none", max_length=128,
                                buckets=(128,), lora_lr=2e-3, iada_lr=1e-2, base_lr=1e-3, steps=300, batch_size=8,
                                grad_accum=1, warmup_ratio=0.05).items():
            if args[name] == defaults.get(name, ()) or (name == "buckets" and not args[name]):
                args[name] = value
    return TrainConfig(**args)


def main(argv=None) -> int:
    cfg = parse(argv)
    try:
        summary = fit(cfg)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    losses = summary["losses"]
    if losses:
        k = max(1, len(losses) // 10)
        print(f"loss: first {sum(losses[:k]) / k:.4f} -> last {sum(losses[-k:]) / k:.4f} over {summary['step']} steps")
    if summary.get("loss_png"):
        model = ", final/model/" if summary.get("model_dir") else ""
        print(f"run: {cfg.out} (metrics.jsonl, tensorboard/, loss.png, final/{model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
