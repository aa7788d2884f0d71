"""A PEFT LoRA adapter trained in PyTorch -> an iada-jax adapters folder, to continue in JAX.

`python -m convert import-peft ADAPTER_DIR OUT --model CKPT` checks every tensor against the
base model's shapes (all problems in one error) and writes OUT as an adapters folder
(iada_jax/adapters.py), which `train.py --init-adapters OUT` starts from.
"""

from __future__ import annotations

import json
import os

from convert.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, from_peft
from convert.safetensors_io import SafetensorsError, load_tensor, read_header
from iada_jax.adapters import TrainedAdapters, save_adapters
from iada_jax.config import Qwen3VLConfig


class PeftImportError(ValueError):
    pass


def read_peft(adapter_dir: str, cfg: Qwen3VLConfig):
    """(LoraConfig, our `lora` collection) of a PEFT adapter folder."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isdir(adapter_dir):
        raise PeftImportError(f"{adapter_dir}: no such folder")
    if not os.path.isfile(config_path):
        raise PeftImportError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not os.path.isfile(weights_path):
        legacy = os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin"))
        hint = ("; it has adapter_model.bin: save it again with safe_serialization=True" if legacy else "")
        raise PeftImportError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as e:
        raise PeftImportError(f"{config_path}: not valid JSON ({e})") from None
    try:
        header = read_header(weights_path)
        tensors = {key: load_tensor(entry) for key, entry in header.items()}
    except SafetensorsError as e:
        raise PeftImportError(str(e)) from None
    try:
        return from_peft(config, tensors, cfg, adapter_dir)
    except ValueError as e:
        raise PeftImportError(str(e)) from None


def import_peft(adapter_dir: str, out_dir: str, model: str) -> str:
    config_path = os.path.join(model, "config.json")
    if not os.path.isfile(config_path):
        raise PeftImportError(f"--model {model}: no config.json (expected the converted base checkpoint)")
    cfg = Qwen3VLConfig.from_hf_config(config_path)
    lora, variables = read_peft(adapter_dir, cfg)
    save_adapters(out_dir, TrainedAdapters(lora=lora, iada=None, variables={"lora": variables},
                                           model=os.path.abspath(model), source=os.path.abspath(adapter_dir)))
    return out_dir
