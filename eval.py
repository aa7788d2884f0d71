"""Evaluate Qwen3-VL (and trained adapters) on the paper's 11 benchmarks; write its Table 1.

    python eval.py                                       # embedded default: tiny model, fixture data
    python eval.py --model CKPT --adapter RUN_DIR --bench paper --data DIR --out evals/d
    python eval.py --model CKPT --bench mmmu,pope --limit 50 --out evals/quick
    python eval.py --compare evals/a evals/b evals/d     # rows side by side, deltas vs the first

--data DIR holds one entry per benchmark named after it (DIR/mmmu.parquet, DIR/pope/ as a
save_to_disk folder, ...), in the benchmark's own Hugging Face schema; without --data, each
benchmark's data set name is opened from the local `datasets` cache. --adapter takes a
train.py run directory or an adapters folder (python -m convert import-peft).
Outputs in --out: <bench>/predictions.jsonl, <bench>/scores.json, results.json, results.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def _source(data: str | None, bench) -> str:
    if data is None:
        return bench.DATASET
    for name in sorted(os.listdir(data)):
        if name == bench.NAME or os.path.splitext(name)[0] == bench.NAME:
            return os.path.join(data, name)
    raise FileNotFoundError(f"{data}: no entry for benchmark {bench.NAME!r} (expected {bench.NAME}.parquet, "
                            f"{bench.NAME}/ or similar)")


def _embedded(names: list[str], log) -> tuple[str, str]:
    """The embedded tiny model and a fixture of each benchmark (cached in runs/embedded)."""
    from iada_jax.embedded import prepare_embedded
    from iada_jax.evaluation.benchmarks import WORLD, get_benchmark

    ckpt, _ = prepare_embedded(log=log)
    data = os.path.join(os.path.dirname(ckpt), "bench")
    for name in names:
        folder = os.path.join(data, name)
        if not os.path.exists(folder):
            rows = WORLD_FIXTURE_ROWS if name in WORLD else 8
            path = get_benchmark(name).write_fixture(folder + ".tmp", num=rows, seed=0)
            os.rename(folder + ".tmp", folder)
            log(f"fixture {name}: {path.replace('.tmp', '')}")
    return ckpt, data


EMBEDDED_MAX_NEW_TOKENS = 16
WORLD_FIXTURE_ROWS = 100  # per world set of the embedded default: enough for a trained adapter to show


def pixel_limits(args, embedded: bool) -> dict:
    """min/max pixels: the flags, else the training run's (its config.json), else lmms-eval's
    qwen3_vl (200704, 1605632), or the embedded tiny model's own."""
    import json

    from iada_jax.train.loop import TrainConfig

    limits = {"min_pixels": TrainConfig.min_pixels, "max_pixels": TrainConfig.max_pixels}
    if embedded:
        from iada_jax.embedded import PREPROCESSOR_CONFIG

        limits = {"min_pixels": PREPROCESSOR_CONFIG["size"]["shortest_edge"],
                  "max_pixels": PREPROCESSOR_CONFIG["size"]["longest_edge"]}
    run_config = os.path.join(args.adapter or "", "config.json")
    if args.adapter and os.path.isfile(run_config):
        with open(run_config) as f:
            train = json.load(f).get("train", {})
        limits.update({k: train[k] for k in limits if train.get(k) is not None})
    limits.update({k: getattr(args, k) for k in limits if getattr(args, k) is not None})
    return limits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="converted checkpoint or HF folder with its tokenizer (default: the embedded tiny model)")
    ap.add_argument("--adapter", help="trained adapters: a run directory or an adapters folder")
    ap.add_argument("--step", type=int, default=None, help="with --adapter RUN_DIR: that run's checkpoint at this step")
    ap.add_argument("--bench", default=None,
                    help="'paper' (all 11), 'world' (the synthetic world's held-out perception, reasoning and text "
                         "sets) or comma-separated names, e.g. 'paper,world' (default: paper; the embedded default: "
                         "paper,world)")
    ap.add_argument("--data", help="folder with one entry per benchmark (default: data set names from the cache)")
    ap.add_argument("--out", default="evals/run", help="output folder (default: evals/run)")
    ap.add_argument("--label", help="row label in the table (default: the adapter or model folder name)")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each benchmark")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mode", choices=["generate", "loglik"], default="generate",
                    help="generate answers (lmms-eval), or pick multiple-choice options by log-likelihood")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: each benchmark's lmms-eval budget (MathVista 16384); the embedded default: 16")
    ap.add_argument("--max-length", type=int, default=4096, help="prompt tokens, images included")
    ap.add_argument("--min-pixels", type=int, default=None,
                    help="images resized to at least this many pixels (default: the --adapter run's training "
                         "setting, else 200704 = lmms-eval's qwen3_vl; the embedded model: its own)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="... and at most this many (default: the run's, else 1605632 = lmms-eval's qwen3_vl)")
    ap.add_argument("--reasoning-tags", default=None,
                    help="JSON list of [start, end] pairs whose blocks are cut from answers before scoring, or "
                         "'none' (default: lmms-eval 0.7.3's, [[\"<think>\", \"</think>\"], "
                         "[\"<analysis>\", \"</analysis>\"]])")
    ap.add_argument("--prompt-style", choices=["default", "qwen3_vl"], default="default",
                    help="lmms-eval 0.7.3 prompts: each task's defaults, or those it gives its qwen3_vl model "
                         "(MMMU and MMStar differ; the other tasks have none of their own)")
    ap.add_argument("--mathvista-prompt", choices=["cot", "format", "solution", "query"], default="cot",
                    help="MathVista prompt: lmms-eval's mathvista_testmini_cot (default), _format or _solution "
                         "task, or 'query' (the data set's own query column)")
    ap.add_argument("--mathvista-extractor", choices=["offline", "gpt"], default="offline",
                    help="MathVista answer extraction: offline rules (default), or lmms-eval's GPT extractor through "
                         "an OpenAI-compatible endpoint (OPENAI_API_KEY, OPENAI_API_URL, MODEL_VERSION from the "
                         "environment; default model gpt-4o-2024-11-20)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="compute dtype (default bfloat16; float32 for the embedded default)")
    ap.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="print the results of these eval folders side by side")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)

    from iada_jax.evaluation.table import compare

    if args.compare:
        try:
            print(compare(args.compare), end="")
        except (FileNotFoundError, KeyError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        return _evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _evaluate(args) -> int:
    from transformers import AutoTokenizer

    import iada_jax
    from iada_jax.adapters import load_adapters
    from iada_jax.config import ForwardConfig
    from iada_jax.evaluation.benchmarks import PAPER, WORLD, get_benchmark
    from iada_jax.evaluation.reasoning import parse_reasoning_tags
    from iada_jax.evaluation.runner import EvalConfig, Evaluator
    from iada_jax.evaluation.table import results_markdown, write_results

    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    groups = {"paper": list(PAPER), "world": list(WORLD)}
    bench = args.bench or ("paper,world" if args.model is None else "paper")
    names = [n for part in bench.split(",") if part.strip() for n in groups.get(part.strip(), [part.strip()])]
    benches = [get_benchmark(n) for n in names]
    model_dir, data = args.model, args.data
    if model_dir is None:
        model_dir, fixtures = _embedded(names, log)
        data = data or fixtures
        if args.max_new_tokens is None:  # lmms-eval's budgets (MathVista 16384) would take hours on a CPU
            args.max_new_tokens = EMBEDDED_MAX_NEW_TOKENS
            log(f"embedded default: at most {EMBEDDED_MAX_NEW_TOKENS} new tokens per answer (--max-new-tokens)")
    dtype = args.dtype or ("float32" if args.model is None else "bfloat16")
    lora = iada = variables = None
    if args.adapter:
        trained = load_adapters(args.adapter, args.step)
        lora, iada, variables = trained.lora, trained.iada, trained.variables
    # IADA fixes the block size; otherwise load_pretrained picks the default for the depth.
    fwd = None if iada is None else ForwardConfig(block_size=iada.block_size, dtype=dtype)
    model = iada_jax.load_pretrained(model_dir, dtype=dtype, fwd=fwd)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limits = pixel_limits(args, embedded=args.model is None)
    tags = parse_reasoning_tags(args.reasoning_tags)
    extractor = None
    if args.mathvista_extractor == "gpt" and "mathvista" in names:
        from iada_jax.evaluation.judge import OpenAIExtractor

        extractor = OpenAIExtractor()
    cfg = EvalConfig(batch_size=args.batch_size, mode=args.mode, max_length=args.max_length,
                     max_new_tokens=args.max_new_tokens, limit=args.limit, reasoning_tags=tags,
                     prompt_style=args.prompt_style, mathvista_prompt=args.mathvista_prompt,
                     mathvista_extractor=extractor, **limits)
    evaluator = Evaluator(model, tokenizer, lora=lora, iada=iada, adapters=variables, cfg=cfg, progress=args.progress)
    os.makedirs(args.out, exist_ok=True)
    scores, details = {}, {}
    for bench in benches:
        result = evaluator.run(bench, _source(data, bench), args.out)
        scores[bench.NAME], details[bench.NAME] = result["score"], result
        log(f"{bench.TITLE}: {result['score']:.1f}")
    label = args.label or os.path.basename(os.path.normpath(args.adapter or model_dir))
    settings = {"model": model_dir, "adapter": args.adapter, "mode": args.mode, "dtype": dtype,
                "max_length": args.max_length, "reasoning_tags": tags, "prompt_style": args.prompt_style,
                "mathvista_prompt": args.mathvista_prompt, "mathvista_extractor": args.mathvista_extractor,
                "max_new_tokens": {b.NAME: args.max_new_tokens or b.MAX_NEW_TOKENS for b in benches}, **limits}
    row = write_results(args.out, label, scores, details, settings)
    print(results_markdown(label, row, {n: scores[n] for n in WORLD if n in scores}), end="")
    print(f"wrote {args.out}/results.md and results.json; per-sample predictions in {args.out}/<bench>/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
