"""The paper's 11 benchmarks, one module each (interface: iada_jax/evaluation/benchmark.py),
in the column order of its Table 1; and the synthetic world's held-out sets (world.py)."""

from __future__ import annotations

import importlib

REASONING = ("mmmu", "mathvista", "scienceqa", "mmstar", "ai2d")
PERCEPTION = ("mme", "pope", "realworldqa", "chartqa", "textvqa", "ocrbench")
PAPER = REASONING + PERCEPTION
WORLD = ("world_perception", "world_reasoning", "world_text")


def get_benchmark(name: str):
    """The benchmark module called `name` (a world set: its benchmark object)."""
    if name in WORLD:
        from iada_jax.evaluation.benchmarks.world import BENCHMARKS

        return BENCHMARKS[name]
    if name not in PAPER:
        raise ValueError(f"unknown benchmark {name!r}; choose from {list(PAPER) + list(WORLD)}, 'paper' or 'world'")
    return importlib.import_module(f"iada_jax.evaluation.benchmarks.{name}")
