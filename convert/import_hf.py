"""Hugging Face Qwen3-VL folder (config.json + safetensors) -> our parameter tree / checkpoint.

Strict: before a single tensor is read, every key the mapping table expects must be present
with its exact shape, every key in the files must be claimed by a rule, and every file must
be structurally sound; all problems are reported together in one `ConversionError`. Tensors
are then read one at a time into preallocated stacked arrays, so host memory holds the
converted model once plus one source tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable

import jax
import numpy as np

from convert.mapping import mapping_table, set_path
from convert.safetensors_io import FLOAT_DTYPES, SafetensorsError, TensorEntry, load_tensor, read_header
from iada_jax.config import ConfigError, Qwen3VLConfig, param_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a user needs next to the weights to tokenize and preprocess (copied along as they are).
AUX_FILE_PREFIXES = (
    "tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
    "preprocessor_config", "video_preprocessor_config", "processor_config", "generation_config",
)


class ConversionError(Exception):
    """Everything wrong with one conversion, listed together."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"cannot convert {source}: {len(problems)} problem(s)\n{lines}")


def index_tensors(hf_dir: str) -> tuple[dict[str, TensorEntry], list[str]]:
    """All tensor entries of the folder's safetensors file(s), and the problems found."""
    problems: list[str] = []
    entries: dict[str, TensorEntry] = {}
    index_path, single_path = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, SINGLE_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return {}, [f"{index_path}: unreadable index ({e!r})"]
        headers: dict[str, dict[str, TensorEntry]] = {}
        for name in sorted(set(weight_map.values())):
            try:
                headers[name] = read_header(os.path.join(hf_dir, name))
            except SafetensorsError as e:
                problems.append(str(e))
        for key, name in sorted(weight_map.items()):
            if name not in headers:
                continue  # the file's own problem is already listed
            if key not in headers[name]:
                problems.append(f"{index_path}: lists {key!r} in {name}, which does not contain it")
            else:
                entries[key] = headers[name][key]
        for name, header in headers.items():
            for key in sorted(set(header) - set(weight_map)):
                problems.append(f"{os.path.join(hf_dir, name)}: tensor {key!r} is not listed in {INDEX_FILE}")
    elif os.path.exists(single_path):
        try:
            entries = read_header(single_path)
        except SafetensorsError as e:
            problems.append(str(e))
    else:
        problems.append(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    return entries, problems


def read_hf_params(
    hf_dir: str, dtype: str = "bfloat16", progress: Callable[[int, int, str], None] | None = None
) -> tuple[Qwen3VLConfig, dict]:
    """Read and check an HF folder; return (config, numpy parameter tree in `dtype`)."""
    hf_dir = os.fspath(hf_dir)
    try:
        cfg = Qwen3VLConfig.from_hf_config(hf_dir)
    except ConfigError as e:
        raise ConversionError(hf_dir, [str(e)]) from None
    target_dtype = param_dtype(dtype)
    entries, problems = index_tensors(hf_dir)
    rules = mapping_table(cfg)
    expected = {key: rule for rule in rules for key in rule.hf_keys()}

    consumed_aliases = set()
    if cfg.tie_word_embeddings and "lm_head.weight" in entries:
        # Some exports keep a copy of the tied head: accept it only if it is the same tensor.
        embed_key = "model.language_model.embed_tokens.weight"
        if embed_key in entries and not problems:
            if not np.array_equal(load_tensor(entries["lm_head.weight"]), load_tensor(entries[embed_key])):
                problems.append(
                    f"{entries['lm_head.weight'].file}: 'lm_head.weight' differs from {embed_key!r} "
                    "but config.json has tie_word_embeddings=true"
                )
        consumed_aliases.add("lm_head.weight")

    for key in sorted(set(expected) - set(entries)):
        problems.append(f"missing tensor {key!r} (expected shape {list(expected[key].hf_shape)})")
    for key in sorted(set(entries) - set(expected) - consumed_aliases):
        problems.append(f"{entries[key].file}: unexpected tensor {key!r} (no rule maps it; wrong model or config?)")
    for key in sorted(set(expected) & set(entries)):
        e, want = entries[key], expected[key].hf_shape
        if e.shape != tuple(want):
            problems.append(f"{e.file}: tensor {key!r} has shape {list(e.shape)}, config.json implies {list(want)}")
        if e.dtype not in FLOAT_DTYPES:
            problems.append(f"{e.file}: tensor {key!r} has non-float dtype {e.dtype}")
    if problems:
        raise ConversionError(hf_dir, problems)

    params: dict = {}
    total, done = len(expected), 0
    for rule in rules:
        target = np.empty(rule.jax_shape, target_dtype)
        for i, key in enumerate(rule.hf_keys()):
            value = rule.transform.to_jax(load_tensor(entries[key])).astype(target_dtype, copy=False)
            if rule.count is None:
                target[...] = value
            else:
                target[i] = value
            done += 1
            if progress:
                progress(done, total, key)
        set_path(params, rule.jax, target)
    return cfg, params


def copy_aux_files(src: str, dst: str) -> None:
    """Tokenizer, chat template and processor files, copied as they are."""
    for name in sorted(os.listdir(src)):
        if name.startswith(AUX_FILE_PREFIXES) and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def import_hf(hf_dir: str, out_dir: str, dtype: str = "bfloat16", verbose: bool = True) -> None:
    """Convert `hf_dir` into an iada-jax checkpoint at `out_dir` (created atomically)."""
    from iada_jax.checkpoint import write_base_checkpoint, write_folder_atomically

    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise ConversionError(hf_dir, [f"{out_dir}: already exists; remove it or choose another OUT_DIR"])
    last = [-1]

    def progress(done: int, total: int, key: str) -> None:
        pct = 100 * done // total
        if verbose and (pct // 10 != last[0] // 10 or done == total):
            last[0] = pct
            print(f"  converted {done}/{total} tensors ({pct}%)", file=sys.stderr, flush=True)

    cfg, params = read_hf_params(hf_dir, dtype, progress)

    def write(folder):
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_config = json.load(f)
        write_base_checkpoint(folder, params, hf_config, dtype=dtype, source=hf_dir)
        copy_aux_files(hf_dir, folder)

    write_folder_atomically(out_dir, write, lambda message: ConversionError(hf_dir, [message]))
    if verbose:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        print(f"wrote {out_dir} ({n:,} parameters, {dtype}; text layers {cfg.text.num_hidden_layers})", file=sys.stderr)

