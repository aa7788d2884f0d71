"""Orbax checkpoints of parameter trees.

A converted base model is a folder:
    config.json       the Hugging Face config, verbatim (our config is rebuilt from it)
    iada_jax.json     {"format": "iada-jax-base", "version": 1, "dtype": ..., "source": ...}
    params/           an orbax (StandardCheckpointer) checkpoint of the parameter tree,
                      layers stacked [L, ...] (independent of the IADA block size)
    tokenizer*, chat_template*, preprocessor_config.json ...   copied from the HF folder
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import orbax.checkpoint as ocp

BASE_FORMAT = "iada-jax-base"
BASE_VERSION = 1
META_FILE = "iada_jax.json"


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


def write_base_checkpoint(out_dir: str, params: dict, hf_config: dict, *, dtype: str, source: str) -> None:
    save_params(os.path.join(out_dir, "params"), params)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"format": BASE_FORMAT, "version": BASE_VERSION, "dtype": dtype, "source": source}, f, indent=2)


def is_base_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def read_base_checkpoint(path: str) -> tuple[dict, dict]:
    """(hf config dict, params) of a folder written by `write_base_checkpoint`."""
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != BASE_FORMAT or meta.get("version") != BASE_VERSION:
        raise ValueError(f"{path}: {META_FILE} describes {meta.get('format')} v{meta.get('version')}, "
                         f"this code reads {BASE_FORMAT} v{BASE_VERSION}")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    return hf_config, load_params(os.path.join(path, "params"))
