"""The reasoning-tax study: the paper's Table 1 in miniature, on the synthetic world.

    python -m iada_jax.study.reasoning_tax                 # the study (about 27 min on 2 CPU cores, 6 on a GPU)
    python -m iada_jax.study.reasoning_tax --quick         # a small smoke run (the test suite's)
    python -m iada_jax.study.reasoning_tax --out runs/study_all_descriptive --short-fraction 0 \
        --base runs/study/stage0/final/model --conditions A_pretrained,B_lora,D_iada_lora   # a variation

Stage 0: a small Qwen3-VL (study/model.py) from random initialisation, trained in full
(`train.py --exp full`) on the world's mix of perception, reasoning and text-only questions,
except its vision tower, which stays at its random initialisation (`--vision-lr 0`: trained at
the same rate, tower and language stack learned only the answers' priors).
Stage 1: that base, frozen, fine-tuned on perception-style instruction data only (mostly
descriptive answers) under the paper's conditions A (no fine-tuning), B (LoRA), C (fixed-query
AttnRes + LoRA), D (IADA + LoRA) and the ablations that fit (no modality split, token-level
routing, IADA rank 4): the same steps, data and learning rates (IADA's 5x LoRA's, the ratio of
our defaults: the paper's own two rates were lost from its text), several seeds each.
Every model answers the held-out perception, reasoning and text sets by greedy generation
(eval.py's Evaluator), scored by exact match.

Writes to --out: table.md (the paper's layout: R-Avg = reasoning and text sets, P-Avg =
perception, All-Avg = the three; mean ± standard deviation over seeds, Δ rows against A and
B), results.json (every run's scores by question kind), reasoning_tax.png, depth_weights.png
(what D's IADA retrieves), and the runs themselves (stage0/, stage1/<condition>/seed<k>/).
Finished runs and evaluations are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

CONDITIONS = ("A_pretrained", "B_lora", "C_attnres_lora", "D_iada_lora", "adaptive_no_split", "token_level", "rank4")
LABELS = {"A_pretrained": "A: base (no fine-tuning)", "B_lora": "B: LoRA", "C_attnres_lora": "C: AttnRes + LoRA",
          "D_iada_lora": "D: IADA + LoRA", "adaptive_no_split": "D, no modality split",
          "token_level": "D, token-level", "rank4": "D, IADA rank 4"}
SETS = ("perception", "reasoning", "text")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    out: str = "runs/study"
    size: str = "small"  # study/model.py SIZES
    image_size: int = 48  # 36 visual tokens
    block_size: int = 2  # IADA boundary spacing S (divides the layers)
    batch_size: int = 32
    stage0_rows: int = 20000
    stage0_steps: int = 1600  # 800 left reasoning and text at their answer priors (README)
    stage0_lr: float = 2e-3
    # The vision tower's rate in stage 0 (0: it stays at its random initialisation, a fixed random
    # feature map). Trained at stage0_lr, the tower and the language stack learned only the
    # answers' priors in 800 steps (README, the study's first run); weight decay as in the probe.
    stage0_vision_lr: float = 0.0
    stage0_weight_decay: float = 0.01
    stage1_rows: int = 4000
    stage1_steps: int = 100
    stage1_batch: int = 16
    stage1_buckets: tuple[int, ...] = (64, 96)  # descriptive answers reach 94 tokens, image included
    short_fraction: float = 0.25  # stage 1: share of short perception answers among the descriptions
    lora_lr: float = 1e-3
    iada_lr: float = 5e-3
    conditions: tuple[str, ...] = CONDITIONS
    seeds: tuple[int, ...] = (0, 1, 2)
    test_rows: int = 300  # per held-out set
    eval_batch: int = 100
    # Rematerialisation in both stages: "qkv" keeps the projections' outputs and recomputes the
    # rest in the backward pass. On the CPU a 1M-parameter step is bound by the copies that stack
    # the scanned layers' saved activations, not by arithmetic: measured 2026-11-30 on 2 cores,
    # stage 0's step is about 30% faster than with "none" (stage 1's B_lora about 17%), the same
    # gain as unrolling the scans. A setting, so a folder trained otherwise is not reused.
    remat: str = "qkv"
    jobs: int = 2  # stage-1 runs at once, in separate processes
    base: str = ""  # a stage-0 model to reuse (another study's stage0/final/model): no stage 0 here

    @classmethod
    def quick(cls, out: str) -> "StudyConfig":
        """Minutes, not half an hour: the test suite's run (its numbers mean nothing)."""
        return cls(out=out, size="tiny", batch_size=8, stage0_rows=96, stage0_steps=6, stage1_rows=48,
                   stage1_steps=4, stage1_batch=8, stage1_buckets=(64,), conditions=("A_pretrained", "B_lora", "D_iada_lora"), seeds=(0,), test_rows=12,
                   eval_batch=12, jobs=1)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _quiet(*_a) -> None:
    pass


# ----------------------------------------------------------------------------- data and stages


def prepare(cfg: StudyConfig) -> dict[str, str]:
    """The initial model, the stage 0 and stage 1 training sets and the held-out sets."""
    from iada_jax.study import world
    from iada_jax.study.model import SIZES, build_initial_model

    paths = {"init": os.path.join(cfg.out, "init"), "stage0": os.path.join(cfg.out, "data", "stage0.parquet"),
             "stage1": os.path.join(cfg.out, "data", "stage1.parquet")}
    if not cfg.base and not os.path.isdir(paths["init"]):
        _log(f"initial model ({cfg.size}: {SIZES[cfg.size]}) at {paths['init']}")
        build_initial_model(paths["init"], SIZES[cfg.size], cfg.image_size, world.corpus_text())
    for name, rows, mix, seed in (("stage0", cfg.stage0_rows, world.STAGE0_MIX, 0),
                                  ("stage1", cfg.stage1_rows, world.stage1_mix(cfg.short_fraction), 1)):
        if not os.path.isfile(paths[name]):
            _log(f"{rows} rows of {name} data ({mix})")
            world.write_rows(paths[name], world.sample_rows(rows, mix, seed, cfg.image_size))
    for group in world.GROUPS:
        paths[group] = os.path.join(cfg.out, "data", f"world_{group}.parquet")
        if not os.path.isfile(paths[group]):
            world.write_rows(paths[group], world.heldout_rows(group, cfg.test_rows, 0, cfg.image_size))
    return paths


def _train(cfg: StudyConfig, out: str, **kw) -> None:
    from iada_jax.train.loop import TrainConfig, fit

    if os.path.isdir(os.path.join(out, "final")):
        return
    pixels = cfg.image_size**2
    # resume: a run killed part-way continues from its last checkpoint (or starts again without one)
    settings = dict(batch_size=cfg.batch_size, grad_accum=1, dtype="float32", param_dtype="float32", remat=cfg.remat,
                    block_size=cfg.block_size, save_every=100, keep=1, min_pixels=pixels, max_pixels=pixels,
                    warmup_ratio=0.05, index_cache=os.path.join(cfg.out, "index"), progress=False, resume=True)
    settings.update(kw)
    t0 = time.perf_counter()
    summary = fit(TrainConfig(out=out, **settings), log=_quiet)
    losses = summary["losses"]
    if not losses:
        _log(f"  {out}: finished from its step-{summary['step']} checkpoint")
        return
    k = max(1, len(losses) // 10)
    _log(f"  {out}: loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} over {len(losses)} steps "
         f"({time.perf_counter() - t0:.0f} s)")


def stage0(cfg: StudyConfig, paths: dict) -> str:
    """The base: every weight trained from random initialisation on the world's mix."""
    out = os.path.join(cfg.out, "stage0")
    _log(f"stage 0: full-parameter training, {cfg.stage0_steps} steps of {cfg.batch_size}")
    _train(cfg, out, model=paths["init"], data=paths["stage0"], exp="full", steps=cfg.stage0_steps,
           base_lr=cfg.stage0_lr, vision_lr=cfg.stage0_vision_lr, weight_decay=cfg.stage0_weight_decay,
           max_length=64, buckets=(64,), seed=0)
    return os.path.join(out, "final", "model")


def stage1(cfg: StudyConfig, base: str, paths: dict, condition: str, seed: int) -> str:
    out = os.path.join(cfg.out, "stage1", condition, f"seed{seed}")
    _train(cfg, out, model=base, data=paths["stage1"], exp=condition, steps=cfg.stage1_steps, seed=seed,
           batch_size=cfg.stage1_batch, lora_lr=cfg.lora_lr, iada_lr=cfg.iada_lr,
           max_length=max(cfg.stage1_buckets), buckets=cfg.stage1_buckets)
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate(cfg: StudyConfig, base: str, paths: dict, run: str | None, out_file: str) -> dict:
    """{set: scores} of the base (run None) or of a stage-1 run's adapters; cached in out_file."""
    if os.path.isfile(out_file):
        with open(out_file) as f:
            return json.load(f)
    from iada_jax.evaluation.benchmarks.world import BENCHMARKS
    from iada_jax.evaluation.runner import EvalConfig

    _, _, evaluator = _evaluator(cfg, base, run, EvalConfig(batch_size=cfg.eval_batch, max_length=64,
                                                             max_new_tokens=6))
    folder = os.path.dirname(out_file)
    scores = {g: evaluator.run(BENCHMARKS[f"world_{g}"], paths[g], os.path.join(folder, "eval")) for g in SETS}
    with open(out_file, "w") as f:
        json.dump(scores, f, indent=1)
    return scores


def _evaluator(cfg: StudyConfig, base: str, run: str | None, eval_cfg):
    """(model, trained adapters or None, Evaluator with them) of the base and a stage-1 run."""
    from transformers import AutoTokenizer

    import iada_jax
    from iada_jax.adapters import load_adapters
    from iada_jax.config import ForwardConfig
    from iada_jax.evaluation.runner import Evaluator

    trained = load_adapters(run) if run else None
    model = iada_jax.load_pretrained(base, fwd=ForwardConfig(block_size=cfg.block_size))
    evaluator = Evaluator(model, AutoTokenizer.from_pretrained(base), progress=False,
                          lora=trained and trained.lora, iada=trained and trained.iada,
                          adapters=trained and trained.variables, cfg=eval_cfg)
    return model, trained, evaluator


def condition_run(cfg: StudyConfig, base: str, paths: dict, condition: str, seed: int) -> dict:
    """Stage 1 of one condition and seed (none for A), then its scores on the held-out sets."""
    if cfg.jobs > 1:
        _cache(cfg)
    run = None if condition == "A_pretrained" else stage1(cfg, base, paths, condition, seed)
    folder = os.path.join(cfg.out, "stage1", condition, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    scores = evaluate(cfg, base, paths, run, os.path.join(folder, "scores.json"))
    _log(f"{condition} seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in averages(scores).items()))
    return scores


def averages(scores: dict) -> dict:
    """The paper's three averages: R over the reasoning and text sets, P perception, All of the three."""
    s = {g: scores[g]["score"] for g in SETS}
    return {**s, "R-Avg": (s["reasoning"] + s["text"]) / 2, "P-Avg": s["perception"],
            "All-Avg": sum(s.values()) / len(SETS)}


def majority_baseline(paths: dict) -> dict:
    """Scores of answering each question kind with its most common answer in stage 0's data."""
    import collections

    import datasets

    from iada_jax.evaluation.benchmarks.world import BENCHMARKS

    train = datasets.load_dataset("parquet", data_files=paths["stage0"], split="train", columns=["completion", "kind"])
    counts = collections.defaultdict(collections.Counter)
    for row in train:
        counts[row["kind"]][row["completion"][0]["content"]] += 1
    out = {}
    for g in SETS:
        bench = BENCHMARKS[f"world_{g}"]
        samples = bench.load(paths[g])
        predictions = [counts[s.meta["kind"]].most_common(1)[0][0] if counts[s.meta["kind"]] else "" for s in samples]
        out[g] = bench.score(samples, predictions)
    return out


# ----------------------------------------------------------------------------- report


COLUMNS = ("perception", "reasoning", "text", "R-Avg", "P-Avg", "All-Avg")


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: dict[str, list[dict]], majority: dict | None) -> str:
    """Markdown in the paper's layout; rows {condition: [averages of each seed]}."""
    head = "| Condition | seeds | Perception | Reasoning | Text | R-Avg | P-Avg | All-Avg |"
    lines = [head, "|---" * 8 + "|"]
    means = {c: {k: statistics.mean(r[k] for r in runs) for k in COLUMNS} for c, runs in rows.items()}
    for c, runs in rows.items():
        lines.append(f"| {LABELS.get(c, c)} | {len(runs)} | " + " | ".join(_cell([r[k] for r in runs]) for k in COLUMNS) + " |")
        for ref in ("A_pretrained", "B_lora"):
            if ref in means and c != ref and not (ref == "B_lora" and c == "A_pretrained"):
                cells = " | ".join(f"{means[c][k] - means[ref][k]:+.1f}" for k in COLUMNS)
                lines.append(f"| (Δ vs {ref[0]}) | | {cells} |")
    if majority is not None:
        m = averages(majority)
        lines.append("| majority answer per kind | – | " + " | ".join(f"{m[k]:.1f}" for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, list[dict]], path: str, majority: dict | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    x = np.arange(len(names))
    for j, (key, colour) in enumerate((("R-Avg", "tab:red"), ("P-Avg", "tab:blue"))):
        vals = [[r[key] for r in rows[c]] for c in names]
        means = [statistics.mean(v) for v in vals]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + (j - 0.5) * 0.38, means, 0.36, yerr=spread, color=colour, alpha=0.75, label=key, capsize=3)
        for i, v in enumerate(vals):
            ax.scatter([x[i] + (j - 0.5) * 0.38] * len(v), v, color="black", s=8, zorder=3)
    if majority is not None:
        m = averages(majority)
        for key, colour in (("R-Avg", "tab:red"), ("P-Avg", "tab:blue")):
            ax.axhline(m[key], color=colour, linestyle="--", linewidth=1, label=f"{key}: majority answer per kind")
    ax.set_xticks(x, [LABELS.get(c, c) for c in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_title("Reasoning tax on the synthetic world (bars: mean over seeds; dots: seeds)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def depth_figure(cfg: StudyConfig, base: str, paths: dict, run: str, path: str) -> str:
    """Heat maps of IADA's retrieval weights: per stream (rows of panels) and question set
    (columns), boundary n (rows) by stored depth j (columns), averaged over the questions."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from iada_jax.data.loader import collate
    from iada_jax.evaluation.benchmarks.world import BENCHMARKS
    from iada_jax.evaluation.runner import EvalConfig
    from iada_jax.study.depth_weights import depth_weights

    model, trained, evaluator = _evaluator(cfg, base, run, EvalConfig(max_length=64, system_prompt=None))
    fwd = model.fwd
    weights = {}
    for g in ("perception", "reasoning"):
        samples = BENCHMARKS[f"world_{g}"].load(paths[g], limit=64)
        examples = [evaluator.prompt_example(s) for s in samples]
        batch = jax.tree.map(jax.numpy.asarray, collate(examples, 64, model.config, 1))
        w = depth_weights(model.params, trained.variables, batch, cfg=model.config, fwd=fwd, lora=trained.lora,
                          iada=trained.iada)
        weights[g] = {m: v.mean(0) for m, v in w.items()}
    streams = list(weights["perception"])
    gates = np.asarray(trained.variables["iada"]["gate"]).reshape(-1)
    fig, axes = plt.subplots(len(streams), 2, figsize=(10, 3.4 * len(streams)), squeeze=False,
                             layout="constrained")
    for i, m in enumerate(streams):
        for j, g in enumerate(("perception", "reasoning")):
            ax, w = axes[i][j], weights[g][m]
            im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
            n, n1 = w.shape
            ax.set_xticks(range(n1), ["emb"] + [f"B{k}" for k in range(1, n1)])
            ax.set_yticks(range(n), [f"after B{k}" for k in range(1, n + 1)])
            for a in range(n):
                for b in range(n1):
                    if b <= a + 1:
                        ax.text(b, a, f"{w[a, b]:.2f}", ha="center", va="center", color="w", fontsize=8)
            gate = f" (gate {gates[i]:+.3f})" if i < len(gates) else ""
            ax.set_title(f"{m} stream{gate}\n{g} questions", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="retrieval weight")
    fig.suptitle(f"What IADA reads ({os.path.relpath(run, cfg.out)}): weight on each stored depth")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({g: {m: v.tolist() for m, v in w.items()} for g, w in weights.items()} | {"gates": gates.tolist()},
                  f, indent=1)
    return path


# ----------------------------------------------------------------------------- the study


def _cache(cfg: StudyConfig) -> None:
    """The seeds of a condition compile the same programs: keep them across fits (and processes)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(cfg.out, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run_study(cfg: StudyConfig) -> dict:

    os.makedirs(cfg.out, exist_ok=True)
    _cache(cfg)
    t0 = time.perf_counter()
    settings = os.path.join(cfg.out, "study.json")
    if os.path.isfile(settings):  # finished runs are reused: only under the settings that made them
        with open(settings) as f:
            before = json.load(f)
        now = json.loads(json.dumps(dataclasses.asdict(cfg)))
        differ = sorted(k for k in now if k not in ("jobs", "eval_batch") and before.get(k) != now[k])
        if differ:
            raise ValueError(f"{cfg.out} holds a study with other settings ({', '.join(differ)}); its runs would be "
                             "reused: choose another --out (--base reuses a stage 0)")
    with open(settings, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    paths = prepare(cfg)
    base = cfg.base or stage0(cfg, paths)
    # Seed-major order: the jobs running at once train different conditions, so each condition's
    # programs are compiled once (by its first seed) and its other seeds read them from the cache;
    # condition-major, two seeds of a condition compiled the same programs side by side.
    tasks = [(cfg, base, paths, c, 0) for c in cfg.conditions if c == "A_pretrained"]  # no training: one run
    tasks += [(cfg, base, paths, c, s) for s in cfg.seeds for c in cfg.conditions if c != "A_pretrained"]
    if cfg.jobs > 1 and len(tasks) > 1:
        import concurrent.futures
        import multiprocessing

        # Separate processes: a small model's step leaves CPU cores idle that another run fills.
        # Each process takes task after task (imports, about 6 s, paid once), as --jobs 1 does.
        with concurrent.futures.ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(condition_run, *zip(*tasks)))
    else:
        done = [condition_run(*t) for t in tasks]
    results, rows = {}, {}
    for (_, _, _, condition, seed), scores in zip(tasks, done):
        avg = averages(scores)
        results.setdefault(condition, {})[seed] = {"averages": avg, "by_kind": {g: scores[g]["by_kind"] for g in SETS}}
        rows.setdefault(condition, []).append(avg)
    majority = majority_baseline(paths)
    text = table(rows, majority)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(text)
    figures = {"plot": plot(rows, os.path.join(cfg.out, "reasoning_tax.png"), majority)}
    if "D_iada_lora" in cfg.conditions:
        run = os.path.join(cfg.out, "stage1", "D_iada_lora", f"seed{cfg.seeds[0]}")
        figures["depth_weights"] = depth_figure(cfg, base, paths, run, os.path.join(cfg.out, "depth_weights.png"))
    summary = {"config": dataclasses.asdict(cfg), "results": results, "majority": averages(majority),
               "table": text, "figures": figures,
               "minutes_this_invocation": (time.perf_counter() - t0) / 60}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    # On a GPU, every process of the study (stage 0 here, stage-1 runs in --jobs processes) would
    # otherwise take 75% of the device's memory at start: a 1M-parameter model needs megabytes.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    ap = argparse.ArgumentParser(prog="python -m iada_jax.study.reasoning_tax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (minutes; its numbers mean nothing)")
    defaults = StudyConfig()
    for f in dataclasses.fields(StudyConfig):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            kind = int if f.name in ("seeds", "stage1_buckets") else str
            ap.add_argument(flag, type=lambda s, k=kind: tuple(k(x) for x in s.split(",")), default=None,
                            help=f"comma-separated (default: {','.join(map(str, f.default))})")
        else:
            ap.add_argument(flag, type=type(f.default), default=None, help=f"default: {getattr(defaults, f.name)}")
    args = vars(ap.parse_args(argv))
    cfg = StudyConfig.quick(args["out"]) if args.pop("quick") else StudyConfig(out=args["out"])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in args.items() if v is not None and k != "out"})
    from iada_jax.experiments import EXPERIMENTS
    from iada_jax.study.model import SIZES

    unknown = [c for c in cfg.conditions if c not in EXPERIMENTS]
    if unknown or cfg.size not in SIZES:
        ap.error(f"unknown conditions {unknown} (see python -m iada_jax.params)" if unknown
                 else f"--size {cfg.size}: choose from {list(SIZES)}")
    try:
        summary = run_study(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary["table"], end="")
    print(f"{cfg.out}: table.md, results.json, " + ", ".join(os.path.basename(p) for p in summary["figures"].values())
          + f" ({summary['minutes_this_invocation']:.1f} min this invocation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
