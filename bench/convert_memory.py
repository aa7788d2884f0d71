"""Peak host memory of the converters on a random full-size checkpoint (no download).

    python -m bench.convert_memory --preset qwen3-vl-2b --work /tmp/convert_memory

1. `python -m convert random-init --format hf`: a random HF checkpoint of the preset (bf16);
2. `python -m convert import-hf` on it: peak resident memory over the source's size;
3. `python -m convert export-merged` of random LoRA adapters (rank 16, all linear layers) on
   the converted checkpoint: peak resident memory over the base's size.
Each command runs in its own process; its peak is that process's (os.wait4's ru_maxrss),
which includes the interpreter and the imported libraries (about 0.5 GB with JAX).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak resident GiB) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable] + argv, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux


def folder_bytes(folder: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(suffix))


def random_run(model_dir: str, run_dir: str, seed: int = 0) -> None:
    """A run directory holding random LoRA adapters (experiment B, rank 16) for `model_dir`."""
    import dataclasses

    import jax
    import numpy as np

    from iada_jax.checkpoint import read_base_checkpoint, save_params
    from iada_jax.config import ForwardConfig, Qwen3VLConfig
    from iada_jax.experiments import get_experiment
    from iada_jax.model.qwen3_vl import init_adapters

    hf_config, params = read_base_checkpoint(model_dir)
    cfg = Qwen3VLConfig.from_hf_config(hf_config)
    exp = get_experiment("B_lora")
    shapes = jax.eval_shape(lambda p: init_adapters(jax.random.PRNGKey(0), p, cfg=cfg, fwd=ForwardConfig(block_size=1),
                                                    lora=exp.lora), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda s: (0.01 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": {"model": model_dir}, "lora": dataclasses.asdict(exp.lora), "iada": None}, f)
    save_params(os.path.join(run_dir, "final"), adapters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.convert_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-vl-2b")
    ap.add_argument("--work", default="/tmp/convert_memory", help="a scratch folder (emptied first)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    hf, ours, run_dir, merged = (os.path.join(args.work, n) for n in ("hf", "ours", "run", "merged"))
    rows = []
    seconds, peak = run(["-m", "convert", "random-init", "--preset", args.preset, hf, "--format", "hf"])
    source = folder_bytes(hf) / 2**30
    print(f"random-init: {seconds:.0f} s, source {source:.2f} GiB", flush=True)
    seconds, peak = run(["-m", "convert", "import-hf", hf, ours])
    rows.append(("import-hf", seconds, peak, source))
    random_run(ours, run_dir)
    seconds, peak = run(["-m", "convert", "export-merged", run_dir, merged])
    rows.append(("export-merged", seconds, peak, folder_bytes(ours) / 2**30))
    print("\n| command | seconds | peak RSS GiB | checkpoint GiB | peak / checkpoint |\n|---|---|---|---|---|")
    for name, seconds, peak, size in rows:
        print(f"| {name} ({args.preset}) | {seconds:.0f} | {peak:.2f} | {size:.2f} | {peak / size:.2f}x |")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
