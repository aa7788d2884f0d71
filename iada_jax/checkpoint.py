"""Checkpoints of parameter trees: converted base models, and orbax trees (adapters, runs).

A converted base model is a folder:
    config.json         the Hugging Face config, verbatim (our config is rebuilt from it)
    iada_jax.json       {"format": "iada-jax-base", "version": 2, "dtype": ..., "source": ...}
    params.safetensors  the parameter tree, one tensor per leaf keyed by its path
                        ("model/language_model/layers/mlp/up_proj/kernel"), layers stacked
                        [L, ...] (independent of the IADA block size)
    tokenizer*, chat_template*, preprocessor_config.json ...   copied from the HF folder

Why safetensors for the frozen base: it is written one tensor (one layer slice) at a time, so
converting a checkpoint holds one source tensor in memory, not the model (an orbax save takes
the whole tree), and it is read lazily, a tensor (or a layer slice) at a time. Version 1 folders
(an orbax `params/`) are still read. Adapters and training runs stay orbax (save_params).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import orbax.checkpoint as ocp

BASE_FORMAT = "iada-jax-base"
BASE_VERSION = 2
META_FILE = "iada_jax.json"
PARAMS_FILE = "params.safetensors"


def write_folder_atomically(out_dir: str, write: Callable[[str], None], error=FileExistsError) -> str:
    """Create `out_dir` by `write(tmp)` into a temporary sibling renamed at the end: a failure
    (or an interrupt) leaves no half-written folder. An existing `out_dir` raises `error`."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise error(f"{out_dir}: already exists; remove it or choose another output folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_params(path: str, params: dict) -> None:
    """Write a parameter tree with orbax; blocks until it is on disk."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), params)
        ckptr.wait_until_finished()


def load_params(path: str) -> dict:
    """Read a parameter tree written by `save_params`, as numpy arrays in their stored dtype."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path))


def param_key(path: tuple[str, ...]) -> str:
    """The key of a parameter in params.safetensors: its tree path joined by "/"."""
    return "/".join(path)


def write_base_checkpoint(out_dir: str, specs: list, chunks, hf_config: dict, *, dtype: str, source: str) -> None:
    """Write a base checkpoint streaming: specs [(path tuple, dtype, shape)] and chunks(path)
    yielding the parameter as consecutive pieces (`safetensors_io.write_safetensors_stream`)."""
    from convert.safetensors_io import write_safetensors_stream

    by_key = {param_key(path): path for path, _, _ in specs}
    write_safetensors_stream(os.path.join(out_dir, PARAMS_FILE), [(param_key(p), d, s) for p, d, s in specs],
                             lambda key: chunks(by_key[key]), {"format": BASE_FORMAT})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"format": BASE_FORMAT, "version": BASE_VERSION, "dtype": dtype, "source": source}, f, indent=2)


def tree_specs(params: dict) -> tuple[list, Callable]:
    """(specs, chunks) of an in-memory tree, for `write_base_checkpoint`: a leaf at a time."""
    import jax
    import numpy as np

    leaves = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    specs = [(path, np.dtype(leaf.dtype), tuple(leaf.shape)) for path, leaf in leaves.items()]
    return specs, lambda path: [np.asarray(leaves[path])]


def is_base_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def read_base_checkpoint(path: str) -> tuple[dict, dict]:
    """(hf config dict, params) of a folder written by `write_base_checkpoint`. The params are
    `LazyTensor`s (version 2): a leaf, or a layer slice of it, is read when it is used."""
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    version = meta.get("version")
    if meta.get("format") != BASE_FORMAT or version not in (1, 2):
        raise ValueError(f"{path}: {META_FILE} describes {meta.get('format')} v{version}, "
                         f"this code reads {BASE_FORMAT} v1 and v2")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    if version == 1:
        return hf_config, load_params(os.path.join(path, "params"))
    from convert.safetensors_io import LazyTensor, read_header

    params: dict = {}
    for key, entry in read_header(os.path.join(path, PARAMS_FILE)).items():
        node = params
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = LazyTensor(entry)
    return hf_config, params
