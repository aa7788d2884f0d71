"""Trained adapters as files: the adapters folder, and reading adapters out of a run directory.

An adapters folder (written by `python -m convert import-peft`, read by `train.py
--init-adapters` and by the exporters):

    adapters.json   {"format": "iada-jax-adapters", "version": 1, "lora": LoraConfig | null,
                     "iada": IadaConfig | null, "model": the base checkpoint, "source": ...}
    params/         orbax tree {"lora": ..., "iada": ...}, storage layout, float32

A run directory (train.py --out) holds the same information in config.json (the experiment's
LoRA and IADA configs, the model path) and final/ or checkpoints/<step>/state. A run that
trained the base itself (experiment `full`) has no adapters: its model is RUN/final/model,
a base checkpoint to pass as --model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from iada_jax.checkpoint import load_params, save_params, write_folder_atomically
from iada_jax.config import IadaConfig, LoraConfig

FORMAT = "iada-jax-adapters"
VERSION = 1
META_FILE = "adapters.json"


class AdapterError(ValueError):
    """Adapters that cannot be read or do not fit; the message names the file or key."""


@dataclasses.dataclass
class TrainedAdapters:
    lora: LoraConfig | None
    iada: IadaConfig | None
    variables: dict  # {"lora": ..., "iada": ...}: numpy, storage layout (see model/qwen3_vl.py)
    model: str | None  # the base model the adapters were trained on, as recorded
    source: str  # where they were read from (for messages)


def config_dict(cfg) -> dict | None:
    return None if cfg is None else dataclasses.asdict(cfg)


def _config(cls, d: dict | None, where: str):
    """A LoraConfig / IadaConfig from its JSON dict (None stays None)."""
    if d is None:
        return None
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{where}: bad {cls.__name__} ({e})") from None


def save_adapters(out_dir: str, adapters: TrainedAdapters) -> str:
    """Write an adapters folder atomically."""

    def write(folder):
        save_params(os.path.join(folder, "params"), dict(adapters.variables))
        meta = {"format": FORMAT, "version": VERSION, "lora": config_dict(adapters.lora),
                "iada": config_dict(adapters.iada), "model": adapters.model, "source": adapters.source}
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    return write_folder_atomically(out_dir, write, AdapterError)


def _numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def load_adapters(path: str, step: int | None = None) -> TrainedAdapters:
    """Adapters from an adapters folder or a run directory (its final/ adapters, or those of
    checkpoints/<step> when `step` is given)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: no such folder (expected a run directory or an adapters folder)")
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        if step is not None:
            raise AdapterError(f"{path}: an adapters folder has no checkpoints; --step applies to run directories")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise AdapterError(f"{meta_path}: describes {meta.get('format')} v{meta.get('version')}, this code "
                               f"reads {FORMAT} v{VERSION}")
        variables = load_params(os.path.join(path, "params"))
        return TrainedAdapters(_config(LoraConfig, meta["lora"], meta_path), _config(IadaConfig, meta["iada"], meta_path),
                               _numpy(dict(variables)), meta.get("model"), path)
    return _load_run(path, step)


def _load_run(run_dir: str, step: int | None) -> TrainedAdapters:
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise AdapterError(f"{run_dir}: neither a run directory (no config.json) nor an adapters folder "
                           f"(no {META_FILE})")
    with open(config_path) as f:
        run = json.load(f)
    if run.get("base"):
        model = os.path.join(run_dir, "final", "model")
        raise AdapterError(f"{run_dir}: a full-parameter run (experiment {run.get('train', {}).get('exp')!r}) trained "
                           f"the base itself and has no adapters; pass its model {model} as --model instead")
    if step is None:
        weights = os.path.join(run_dir, "final")
        if not os.path.isdir(weights):
            steps = _saved_steps(run_dir)
            hint = f"; export a checkpoint with --step (saved: {steps})" if steps else ""
            raise AdapterError(f"{run_dir}: the run has no final/ adapters (it did not finish){hint}")
        variables = load_params(weights)
    else:
        weights = os.path.join(run_dir, "checkpoints", str(step), "state")
        if not os.path.isdir(weights):
            raise AdapterError(f"{run_dir}: no checkpoint for step {step} (saved: {_saved_steps(run_dir) or 'none'})")
        variables = load_params(weights)["trainable"]
    lora = _config(LoraConfig, run.get("lora"), config_path)
    iada = _config(IadaConfig, run.get("iada"), config_path)
    variables = _numpy(dict(variables))
    for name, cfg in (("lora", lora), ("iada", iada)):
        if (cfg is None) != (name not in variables):
            raise AdapterError(f"{weights}: the {name} weights do not match {config_path} "
                               f"({'config without weights' if cfg is not None else 'weights without config'})")
    return TrainedAdapters(lora, iada, variables, run.get("train", {}).get("model"), weights)


def _saved_steps(run_dir: str) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def resolve_model(adapters: TrainedAdapters, model: str | None) -> str:
    """The base model folder: the one given, else the one the adapters record."""
    chosen = model or adapters.model
    if chosen is None:
        raise AdapterError(f"{adapters.source}: records no base model; pass --model")
    if not os.path.isdir(chosen):
        raise AdapterError(f"base model {chosen} (recorded by {adapters.source}) is not a folder here; "
                           "pass --model with the checkpoint the adapters were trained on")
    return chosen
