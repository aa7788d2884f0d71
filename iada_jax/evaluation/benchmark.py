"""What every benchmark file provides, and the shared plumbing (opening data sets, images).

A benchmark is a module in `iada_jax/evaluation/benchmarks/` with:

    NAME            registry key, e.g. "mmmu"
    TITLE           column title in the paper's Table 1, e.g. "MMMU"
    GROUP           "reasoning" or "perception" (the paper's R-Avg / P-Avg)
    DATASET, SPLIT  the Hugging Face data set id and split lmms-eval evaluates
    MAX_NEW_TOKENS  generation budget for one answer
    load(source, limit=None) -> list[Sample]
        source: a local parquet / json / jsonl / arrow file, a save_to_disk folder, or a data
        set name the local `datasets` cache has, in the benchmark's own HF schema.
    score(samples, predictions) -> dict
        {"score": the Table 1 number (0-100), ...the benchmark's other metrics}
    write_fixture(folder, num=8, seed=0) -> str
        a tiny data set in the benchmark's real schema (images included); returns what load takes.

Prompts follow lmms-eval's formatting for the benchmark (QWEN3VL_REFERENCE.md §6); the images
of a sample go before its text in the user turn, as lmms-eval's qwen3_vl model places them.
"""

from __future__ import annotations

import dataclasses
import os
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
