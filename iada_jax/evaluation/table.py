"""The paper's Table 1: 11 benchmark columns, R-Avg, P-Avg, All-Avg (the mean of all 11, as
the paper's rows show: 5 x 57.3 + 6 x 73.5 = 11 x 66.1), and the side-by-side comparison."""

from __future__ import annotations

import json
import os

from iada_jax.evaluation.benchmarks import PAPER, PERCEPTION, REASONING, WORLD, get_benchmark

RESULTS_FILE = "results.json"


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(scores: dict[str, float]) -> dict:
    """{bench: score} -> the Table 1 row: every column present, averages over what was run
    (an average is None unless all its benchmarks were run)."""
    row = {name: scores.get(name) for name in PAPER}
    for key, group in (("R-Avg", REASONING), ("P-Avg", PERCEPTION), ("All-Avg", PAPER)):
        values = [scores[n] for n in group if scores.get(n) is not None]
        row[key] = _mean(values) if len(values) == len(group) else None
    return row


def titles() -> list[str]:
    return [get_benchmark(n).TITLE for n in PAPER] + ["R-Avg", "P-Avg", "All-Avg"]


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def markdown(rows: dict[str, dict], deltas_from: str | None = None) -> str:
    """Rows {label: summarized row} as a markdown table; with deltas_from, a (Δ) row after each
    other row, against that label's row (as the paper's (DA), (DB) rows)."""
    keys = list(PAPER) + ["R-Avg", "P-Avg", "All-Avg"]
    lines = ["| Method | " + " | ".join(titles()) + " |", "|---" * (len(keys) + 1) + "|"]
    base = rows.get(deltas_from) if deltas_from else None
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
        if base is not None and label != deltas_from:
            cells = []
            for k in keys:
                a, b = row.get(k), base.get(k)
                cells.append("–" if a is None or b is None else f"{a - b:+.1f}")
            lines.append(f"| (Δ vs {deltas_from}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def world_markdown(rows: dict[str, dict]) -> str:
    """Rows {label: {world set: score}} of the synthetic world's held-out sets (exact match)."""
    lines = ["| Method | " + " | ".join(get_benchmark(n).TITLE for n in WORLD) + " |", "|---" * (len(WORLD) + 1) + "|"]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(n)) for n in WORLD) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, label: str, scores: dict[str, float], details: dict,
                  settings: dict | None = None) -> dict:
    """results.json (the row, lmms-eval's headline metrics of each benchmark as its aggregations
    return them, per-benchmark details, the evaluation's settings; the world sets' scores) and
    results.md (the paper's table when any of its benchmarks ran, the world's when any of its)."""
    row = summarize(scores)
    world = {n: scores[n] for n in WORLD if n in scores}
    lmms = {name: d["lmms_eval"] for name, d in details.items() if isinstance(d, dict) and "lmms_eval" in d}
    with open(os.path.join(out_dir, RESULTS_FILE), "w") as f:
        json.dump({"label": label, "row": row, "world": world, "lmms_eval": lmms, "details": details,
                   "settings": settings or {}}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(label, row, world))
    return row


def results_markdown(label: str, row: dict, world: dict) -> str:
    """The paper's table (if any of its benchmarks has a score), then the world's (if any)."""
    parts = [markdown({label: row})] if any(row.get(n) is not None for n in PAPER) else []
    if world:
        parts.append(world_markdown({label: world}))
    return "\n".join(parts)


def read_results(path: str) -> tuple[str, dict]:
    """(label, row) of an eval output folder (or its results.json)."""
    file = path if path.endswith(".json") else os.path.join(path, RESULTS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {RESULTS_FILE} (run eval.py --out {path} first)")
    with open(file) as f:
        data = json.load(f)
    return data["label"], data["row"]


def compare(paths: list[str]) -> str:
    """The rows of several eval outputs side by side, with deltas against the first."""
    rows = {}
    for p in paths:
        label, row = read_results(p)
        rows[label if label not in rows else f"{label} ({p})"] = row
    return markdown(rows, deltas_from=next(iter(rows)))
