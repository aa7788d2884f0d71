"""Start-up on the paper's data size: `train.py --index-only` on a generated 259K-row
llava-instruct-mix-like data set (bench/llava_like.py), cold (no cached index) and warm.

    python -m bench.index_speed --data /big/llava259k [--rows 259000] [--workers 2] [--layout trl-lib]

Steps, each timed: generating the data (skipped when DATA holds it), `datasets`' one-time
conversion of the parquet shards to its Arrow cache (what `load_dataset` does for any trainer,
TRL's included; DATA/hf_cache), then train.py --index-only with an empty index cache (cold)
and again (warm), each a fresh process, so the times include Python, JAX and tokenizer start-up.
The model folder holds a Qwen3-VL-2B config.json, Qwen's image processor config and the bench
tokenizer (llava_like.bench_tokenizer), and no weights (--index-only reads none).
Writes DATA/index_speed.json and prints a markdown row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_folder(path: str) -> str:
    """config.json (Qwen3-VL-2B, the bench tokenizer's special ids) + tokenizer + preprocessor."""
    from transformers import AutoTokenizer

    from bench.llava_like import bench_tokenizer
    from convert.random_init import QWEN_PREPROCESSOR_CONFIG
    from iada_jax.config import Qwen3VLConfig

    bench_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("image_token_id", "<|image_pad|>"),
                                                          ("video_token_id", "<|video_pad|>"),
                                                          ("vision_start_token_id", "<|vision_start|>"),
                                                          ("vision_end_token_id", "<|vision_end|>"))}
    cfg = dataclasses.replace(Qwen3VLConfig.qwen3_vl_2b(), **ids)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_config(), f, indent=1)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(QWEN_PREPROCESSOR_CONFIG, f, indent=1)
    return path


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return seconds, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.index_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of the generated data (created when missing)")
    ap.add_argument("--rows", type=int, default=259_000)
    ap.add_argument("--layout", choices=("trl-lib", "h4"), default="trl-lib")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    args = ap.parse_args(argv)

    from bench.llava_like import write

    data = os.path.abspath(args.data)
    shards = os.path.join(data, "shards")
    info_file = os.path.join(shards, "llava_like.json")
    if not os.path.isfile(info_file) or json.load(open(info_file))["rows"] != args.rows:
        shutil.rmtree(shards, ignore_errors=True)
        write(shards, args.rows, args.layout)
    info = json.load(open(info_file))
    model = model_folder(os.path.join(data, "model"))
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(data, "hf_cache"), PYTHONUNBUFFERED="1")

    # datasets' one-time parquet -> Arrow conversion (a second load only maps the cache files).
    load = [sys.executable, "-c", f"import datasets, time; t = time.perf_counter(); "
            f"ds = datasets.load_dataset({shards!r}, split='train'); print('rows', len(ds), time.perf_counter() - t)"]
    prepared_before = os.path.isdir(env["HF_DATASETS_CACHE"])
    prepare_s, _ = timed(load, env)
    reopen_s, _ = timed(load, env)

    cache = os.path.join(data, "index_cache")
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "train.py", "--model", model, "--data", shards, "--out", os.path.join(data, "run"),
           "--index-only", "--max-length", str(args.max_length), "--workers", str(args.workers), "--index-cache", cache]
    cold_s, cold_out = timed(cmd, env)
    warm_s, warm_out = timed(cmd, env)
    built = float(re.search(r"index: built in ([\d.]+) s", cold_out).group(1))
    loaded = float(re.search(r"from the cache \S+ \(([\d.]+) s\)", warm_out).group(1))
    ready = float(re.search(r"ready in ([\d.]+) s", warm_out).group(1))
    report = cold_out[cold_out.index("rows: "):]
    result = {
        "rows": args.rows, "layout": args.layout, "workers": args.workers, "cpus": os.cpu_count(),
        "data_gib": info["bytes"] / 2**30, "mean_row_bytes": info["mean_row_bytes"],
        "generate_s": info.get("seconds"),
        "datasets_prepare_s": None if prepared_before else prepare_s, "datasets_reopen_s": reopen_s,
        "index_build_s": built, "index_rows_per_s": args.rows / built,
        "cold_total_s": cold_s, "warm_total_s": warm_s, "warm_index_load_s": loaded, "warm_data_ready_s": ready,
        "command": " ".join(["python"] + cmd[1:]).replace(data, "$DATA"), "report": report,
    }
    with open(os.path.join(data, "index_speed.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report)
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
