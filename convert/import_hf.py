"""Hugging Face Qwen3-VL folder (config.json + safetensors) -> our parameter tree / checkpoint.

Strict: before a single tensor is read, every key the mapping table expects must be present
with its exact shape, every key in the files must be claimed by a rule, and every file must
be structurally sound; all problems are reported together in one `ConversionError`.

`import_hf` streams: the checkpoint's header is written from the table's shapes, then every
source tensor is read, transformed and appended to params.safetensors one at a time (a stacked
parameter slice by slice), so host memory holds one source tensor, never the model.
`read_hf_params` (loading an HF folder directly) builds the tree in memory instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

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


def checked_source(hf_dir: str) -> tuple[Qwen3VLConfig, dict[str, TensorEntry], list]:
    """(config, tensor entries, mapping rules) of an HF folder, after every check."""
    hf_dir = os.fspath(hf_dir)
    try:
        cfg = Qwen3VLConfig.from_hf_config(hf_dir)
    except ConfigError as e:
        raise ConversionError(hf_dir, [str(e)]) from None
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
    return cfg, entries, rules


def source_dtype(entries: dict[str, TensorEntry]) -> str:
    """The parameter dtype that keeps the source exactly: bfloat16 when every tensor is BF16,
    float32 otherwise (F32, or a mix, or F16 / F64, which float32 holds or rounds least)."""
    return "bfloat16" if {e.dtype for e in entries.values()} == {"BF16"} else "float32"


def rule_slices(rule, entries: dict[str, TensorEntry], target_dtype, progress=None):
    """The parameter of one rule in our layout, one source tensor (stacked slice) at a time."""
    for key in rule.hf_keys():
        yield rule.transform.to_jax(load_tensor(entries[key])).astype(target_dtype, copy=False)
        if progress:
            progress(key)


class LazyParam:
    """A parameter of an HF folder in our layout, read from the source when used: `p[i]` reads
    one stacked slice (one source tensor), `np.asarray(p)` the whole parameter."""

    def __init__(self, rule, entries: dict[str, TensorEntry], dtype):
        self.rule, self.entries, self.dtype = rule, entries, np.dtype(dtype)
        self.shape = tuple(rule.jax_shape)

    def __getitem__(self, i: int) -> np.ndarray:
        return next(rule_slices(_one(self.rule, i), self.entries, self.dtype))

    def __array__(self, dtype=None, copy=None):
        out = np.stack(list(rule_slices(self.rule, self.entries, self.dtype)))
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


def _one(rule, i: int):
    """The rule of stacked tensor i alone."""
    import dataclasses

    return dataclasses.replace(rule, hf=rule.hf.format(i=i), count=None)


def lazy_hf_params(hf_dir: str, dtype: str = "auto") -> tuple[Qwen3VLConfig, dict]:
    """(config, tree of `LazyParam`s in `dtype`, "auto" the source's): nothing is read until used."""
    cfg, entries, rules = checked_source(hf_dir)
    target_dtype = param_dtype(source_dtype(entries) if dtype == "auto" else dtype)
    params: dict = {}
    for rule in rules:
        set_path(params, rule.jax, LazyParam(rule, entries, target_dtype))
    return cfg, params


def read_hf_params(hf_dir: str, dtype: str = "bfloat16") -> tuple[Qwen3VLConfig, dict]:
    """Read and check an HF folder; return (config, numpy parameter tree in `dtype`, or the
    source's with "auto"), all in memory."""
    cfg, params = lazy_hf_params(hf_dir, dtype)
    return cfg, jax.tree.map(np.asarray, params)


def copy_aux_files(src: str, dst: str) -> None:
    """Tokenizer, chat template and processor files, copied as they are."""
    for name in sorted(os.listdir(src)):
        if name.startswith(AUX_FILE_PREFIXES) and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def import_hf(hf_dir: str, out_dir: str, dtype: str = "auto", verbose: bool = True) -> None:
    """Convert `hf_dir` into an iada-jax checkpoint at `out_dir` (created atomically), streaming.
    dtype: "auto" (the source's: `source_dtype`), "bfloat16" or "float32"."""
    from iada_jax.checkpoint import write_base_checkpoint, write_folder_atomically

    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise ConversionError(hf_dir, [f"{out_dir}: already exists; remove it or choose another OUT_DIR"])
    cfg, entries, rules = checked_source(hf_dir)
    dtype = source_dtype(entries) if dtype == "auto" else dtype
    target_dtype = param_dtype(dtype)
    total = sum(len(rule.hf_keys()) for rule in rules)
    state = {"done": 0, "decile": -1}

    def progress(key: str) -> None:
        state["done"] += 1
        decile = 10 * state["done"] // total
        if verbose and (decile != state["decile"] or state["done"] == total):
            state["decile"] = decile
            print(f"  converted {state['done']}/{total} tensors ({100 * state['done'] // total}%)", file=sys.stderr,
                  flush=True)

    by_path = {rule.jax: rule for rule in rules}
    specs = [(rule.jax, target_dtype, rule.jax_shape) for rule in rules]

    def write(folder):
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_config = json.load(f)
        write_base_checkpoint(folder, specs, lambda path: rule_slices(by_path[path], entries, target_dtype, progress),
                              hf_config, dtype=dtype, source=hf_dir)
        copy_aux_files(hf_dir, folder)

    write_folder_atomically(out_dir, write, lambda message: ConversionError(hf_dir, [message]))
    if verbose:
        n = sum(int(np.prod(rule.jax_shape)) for rule in rules)
        print(f"wrote {out_dir} ({n:,} parameters, {dtype}; text layers {cfg.text.num_hidden_layers})", file=sys.stderr)
