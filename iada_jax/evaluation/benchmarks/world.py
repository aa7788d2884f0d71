"""The synthetic world's held-out sets (iada_jax/study/world.py): perception, reasoning and
text-only arithmetic questions with one-word answers, scored by exact match (up to case,
surrounding space and a final full stop). Not lmms-eval tasks: they are the reasoning-tax
study's own test sets, and the embedded default's (`make eval`) numbers that training moves.

Each group is a benchmark object with the module interface of iada_jax/evaluation/benchmark.py.
Prompts are the question alone, without a system prompt, as the world's training rows are.
"""

from __future__ import annotations

import collections
import dataclasses

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.study import world

GROUPS = world.GROUPS


@dataclasses.dataclass(frozen=True)
class WorldBenchmark:
    group: str
    SPLIT: str = "train"
    MAX_NEW_TOKENS: int = 12  # the longest answer ("triangle") in the byte-level tiny tokenizer
    SYSTEM_PROMPT: str | None = None  # the world's rows carry none

    @property
    def NAME(self) -> str:
        return f"world_{self.group}"

    @property
    def TITLE(self) -> str:
        return f"World-{self.group.capitalize()}"

    @property
    def GROUP(self) -> str:
        return self.group

    @property
    def DATASET(self) -> str:  # no hub copy: written by write_fixture / the study
        return f"world_{self.group}.parquet"

    def load(self, source: str, limit: int | None = None) -> list[Sample]:
        rows = read_rows(source, self.SPLIT, limit, ("images", "prompt", "completion", "kind"), self.TITLE)
        out = []
        for i, (where, row) in enumerate(rows):
            images = [to_image(x, where) for x in row["images"] or []]
            out.append(Sample(id=f"{self.NAME}-{i}", prompt=row["prompt"][0]["content"], images=images,
                              target=row["completion"][0]["content"], meta={"kind": row["kind"]}))
        return out

    def score(self, samples: list[Sample], predictions: list[str]) -> dict:
        check_predictions(self.NAME, samples, predictions)
        hits = [world.normalize_answer(p) == world.normalize_answer(s.target) for s, p in zip(samples, predictions)]
        by_kind = collections.defaultdict(list)
        for s, h in zip(samples, hits):
            by_kind[s.meta["kind"]].append(h)
        return {"score": percent(sum(hits), len(hits)), "n": len(hits),
                "by_kind": {k: percent(sum(v), len(v)) for k, v in sorted(by_kind.items())}}

    def write_fixture(self, folder: str, num: int = 8, seed: int = 0, image_size: int = 48) -> str:
        import os

        rows = world.heldout_rows(self.group, num, seed, image_size)
        return world.write_rows(os.path.join(folder, f"{self.NAME}.parquet"), rows)


BENCHMARKS = {b.NAME: b for b in (WorldBenchmark(g) for g in GROUPS)}
