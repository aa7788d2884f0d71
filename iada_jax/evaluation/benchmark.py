"""What every benchmark file provides, and the shared plumbing (reading rows, images, scoring checks).

A benchmark is a module in `iada_jax/evaluation/benchmarks/` with:

    NAME            registry key, e.g. "mmmu"
    TITLE           column title in the paper's Table 1, e.g. "MMMU"
    GROUP           "reasoning" or "perception" (the paper's R-Avg / P-Avg)
    DATASET, SPLIT  the Hugging Face data set id and split lmms-eval evaluates
    MAX_NEW_TOKENS  generation budget for one answer (lmms-eval 0.7.3's, for its qwen3_vl model)
    load(source, limit=None) -> list[Sample]
        source: a local parquet / json / jsonl / arrow file, a save_to_disk folder, or a data
        set name the local `datasets` cache has, in the benchmark's own HF schema.
        A benchmark with PROMPT_STYLES ("default", "qwen3_vl") also takes prompt_style=; one
        with VARIANTS (MathVista's prompts) takes variant= (runner.load_kwargs passes them).
    score(samples, predictions) -> dict
        {"score": the Table 1 number (0-100), ...the benchmark's other metrics,
         "lmms_eval": {metric: value} as lmms-eval's own aggregations return them}
    write_fixture(folder, num=8, seed=0) -> str
        a tiny data set in the benchmark's real schema (images included); returns what load takes.

Prompts follow lmms-eval's formatting for the benchmark (QWEN3VL_REFERENCE.md §6); the images
of a sample go before its text in the user turn, as lmms-eval's qwen3_vl model places them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from iada_jax.data.loader import open_rows
from iada_jax.data.sft import BadRow, load_image


@dataclasses.dataclass
class Sample:
    id: str  # unique within the benchmark (the data set's own id where it has one)
    prompt: str  # the user text, formatted as lmms-eval does for this benchmark
    images: list  # PIL.Image.Image (RGB), in order; placed before the text
    target: Any  # what `score` compares a prediction with
    options: tuple[str, ...] | None = None  # candidate answers for log-likelihood scoring (e.g. "A".."D")
    meta: dict = dataclasses.field(default_factory=dict)  # what scoring needs besides the target


DATA_EXTENSIONS = (".parquet", ".arrow", ".jsonl", ".json")


def open_dataset(source: str, split: str):
    """A `datasets.Dataset` from a local file, a save_to_disk folder, a folder of data files
    (the one whose name holds the split, or the only one), or a cached data set name."""
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "dataset_info.json")):
        files = sorted(f for f in os.listdir(source) if f.endswith(DATA_EXTENSIONS))
        chosen = [f for f in files if split in f] or files
        if len(chosen) != 1:
            raise ValueError(f"{source}: expected one data file for split {split!r}, found {files or 'none'}")
        source = os.path.join(source, chosen[0])
    return open_rows(source, split)


def to_image(item, where: str) -> Image.Image:
    """An RGB image from a data set cell (PIL image, {"bytes", "path"} or a path)."""
    try:
        return load_image(item)
    except BadRow as e:
        raise ValueError(f"{where}: {e}") from None


def read_rows(source: str, split: str, limit: int | None = None, columns: Sequence[str] = (), schema: str = "",
              config: str | None = None) -> list[tuple[str, dict]]:
    """[(where, row)] for the first `limit` rows; `where` ("source row i") prefixes errors.

    `columns`: names the rows must have, checked up front (the error names `schema`, e.g. "POPE").
    `config`: the HF config to take when `source` is a data set name rather than a local file or
    folder (`open_dataset` cannot pass one)."""
    rows = open_dataset(source, split) if config is None or os.path.exists(source) else _open_config(source, config, split)
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"{source}: not the {schema} schema, missing columns {missing} (have {rows.column_names})")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [(f"{source} row {i}", row) for i, row in enumerate(rows)]


def _open_config(source: str, config: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # not cached, no such config, offline: the same to the user
        raise ValueError(f"cannot open data set {source!r} (config {config!r}, split {split!r}): {e}") from None


def check_predictions(name: str, samples: Sequence, predictions: Sequence, allow_empty: bool = True) -> None:
    """Scores pair predictions with samples by position, so the counts must agree; with
    `allow_empty=False`, there must also be something to score."""
    if len(predictions) != len(samples):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(samples)} samples; "
                         "give exactly one prediction per sample, in the samples' order")
    if not allow_empty and not samples:
        raise ValueError(f"{name}: no samples to score")


def percent(hits: float, total: int) -> float:
    """100 * hits / total, or 0 for an empty total."""
    return 100.0 * hits / total if total else 0.0
