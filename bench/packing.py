"""Real tokens per token slot, bucketed against packed, on a llava-instruct-mix-like data set.

    python -m bench.packing --data DATA [--max-length 2048] [--batch-size 16] [--samples 16] [--window 2048]

DATA is a folder made by `python -m bench.index_speed --data DATA` (the generated shards, the
model folder with the bench tokenizer, the index cache and datasets' Arrow cache). One epoch's
plan of each layout is built by the loader itself (`SFTData.epoch_plan`): power-of-two length
buckets up to --max-length with incomplete batches dropped (what train.py does without
--pack), and --pack (first-fit decreasing over shuffled windows). Counts only, no step runs:
rows placed, batches, token slots, real tokens, samples per packed row, and the planning time.
Prints a markdown table for bench/RESULTS.md and writes DATA/packing.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from iada_jax.data.packing import packing_stats


def plan_stats(data, plan, packed: bool) -> dict:
    out = {"batches": len(plan), "rows_usable": len(data.usable_rows)}
    if packed:
        out.update(packing_stats([r for _, batch in plan for r in batch], data.index.lengths, data.cfg.max_length))
        out.update(rows_placed=sum(len(r) for _, batch in plan for r in batch), packed_rows=out["rows"] - out["empty_rows"],
                   max_samples=out["max_samples_in_a_row"])
        return out
    rows = [r for _, batch in plan for r in batch]
    slots = sum(length * len(batch) for length, batch in plan)
    real = int(data.index.lengths[rows].sum()) if rows else 0
    return dict(out, rows_placed=len(rows), token_slots=int(slots), real_tokens=real,
                real_fraction=real / slots if slots else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16, help="--pack-samples")
    ap.add_argument("--window", type=int, default=2048, help="--pack-window")
    args = ap.parse_args(argv)
    data_dir = os.path.abspath(args.data)
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(data_dir, "hf_cache"))

    from transformers import AutoTokenizer

    from iada_jax.data.loader import DataConfig, SFTData
    from iada_jax.pretrained import load_config

    model = os.path.join(data_dir, "model")
    cfg, image_config = load_config(model)
    tok = AutoTokenizer.from_pretrained(model)
    base = DataConfig(path=os.path.join(data_dir, "shards"), max_length=args.max_length, batch_size=args.batch_size,
                      index_cache=os.path.join(data_dir, "index_cache"), pack_samples=args.samples,
                      pack_window=args.window)
    t0 = time.perf_counter()
    data = SFTData(base, tok, image_config, cfg, log=lambda *a: print(*a, file=sys.stderr))
    ready = time.perf_counter() - t0
    result = {"rows": len(data.rows), "data_ready_s": ready, "max_length": args.max_length,
              "batch_size": args.batch_size, "pack_samples": args.samples, "pack_window": args.window}
    t0 = time.perf_counter()
    result["bucketed"] = plan_stats(data, data.epoch_plan(0), packed=False)
    result["bucketed"]["plan_s"] = time.perf_counter() - t0
    data.cfg = dataclasses.replace(base, pack=True)
    t0 = time.perf_counter()
    result["packed"] = plan_stats(data, data.epoch_plan(0), packed=True)
    result["packed"]["plan_s"] = time.perf_counter() - t0
    result["command"] = (f"python -m bench.packing --data $DATA --max-length {args.max_length} --batch-size "
                         f"{args.batch_size} --samples {args.samples} --window {args.window}")
    with open(os.path.join(data_dir, "packing.json"), "w") as f:
        json.dump(result, f, indent=1)
    b, p = result["bucketed"], result["packed"]
    print("| layout | batches | rows placed / usable | token slots | real tokens | real fraction | plan |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bucketed (powers of two to {args.max_length}) | {b['batches']:,} | {b['rows_placed']:,} / "
          f"{b['rows_usable']:,} | {b['token_slots']:,} | {b['real_tokens']:,} | {b['real_fraction']:.1%} | "
          f"{b['plan_s']:.1f} s |")
    print(f"| packed ({p['samples_per_row']:.2f} samples a row, at most {p['max_samples']}) | {p['batches']:,} | "
          f"{p['rows_placed']:,} / {p['rows_usable']:,} | {p['token_slots']:,} | {p['real_tokens']:,} | "
          f"{p['real_fraction']:.1%} | {p['plan_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
