"""The paper's 11 benchmarks, one module each (interface: iada_jax/evaluation/benchmark.py),
in the column order of its Table 1."""

from __future__ import annotations

import importlib

REASONING = ("mmmu", "mathvista", "scienceqa", "mmstar", "ai2d")
PERCEPTION = ("mme", "pope", "realworldqa", "chartqa", "textvqa", "ocrbench")
PAPER = REASONING + PERCEPTION


def get_benchmark(name: str):
    """The benchmark module called `name`."""
    if name not in PAPER:
        raise ValueError(f"unknown benchmark {name!r}; choose from {list(PAPER)} or 'paper'")
    return importlib.import_module(f"iada_jax.evaluation.benchmarks.{name}")
