"""Trained adapters -> PyTorch: a PEFT LoRA adapter, or a full HF checkpoint with LoRA merged;
IADA weights beside either, with the PyTorch module that applies them.

`python -m convert export-peft RUN_DIR OUT_DIR` writes
    adapter_config.json, adapter_model.safetensors    PEFT LoRA (PeftModel.from_pretrained)
    iada_config.json, iada.safetensors                IADA switches and weights (when trained)
    torch_iada.py                                     a copy of iada_jax/torch_iada.py: attach_iada
    README.md                                         how to load it

`python -m convert export-merged RUN_DIR OUT_DIR` writes a Hugging Face Qwen3-VL folder
(config.json, model*.safetensors, tokenizer and processor files) whose weights are
W + scaling * B A, loadable with plain `from_pretrained`, plus the same IADA files.

Both write into a temporary folder renamed at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from convert.import_hf import copy_aux_files
from convert.mapping import hf_sources, hf_specs, hf_tensor
from convert.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    IADA_CONFIG,
    IADA_WEIGHTS,
    check_lora,
    flatten,
    iada_config_json,
    module_group,
    to_peft_config,
    to_peft_state_dict,
)
from convert.safetensors_io import write_safetensors, write_safetensors_stream
from iada_jax.adapters import AdapterError, TrainedAdapters, load_adapters, resolve_model
from iada_jax.checkpoint import write_folder_atomically
from iada_jax.config import Qwen3VLConfig, param_dtype

TORCH_MODULE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "iada_jax", "torch_iada.py")
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


class ExportError(ValueError):
    pass


def _base_config(model_dir: str) -> tuple[dict, Qwen3VLConfig]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{model_dir}: no config.json (expected a converted checkpoint or an HF model folder)")
    with open(path) as f:
        hf_config = json.load(f)
    return hf_config, Qwen3VLConfig.from_hf_config(hf_config)


def _load(run_dir: str, step: int | None, model: str | None):
    adapters = load_adapters(run_dir, step)
    model_dir = resolve_model(adapters, model)
    hf_config, cfg = _base_config(model_dir)
    if adapters.lora is not None:
        try:
            check_lora(adapters.variables["lora"], adapters.lora, cfg, adapters.source)
        except ValueError as e:
            raise ExportError(f"{e} (base model {model_dir})") from None
    return adapters, model_dir, hf_config, cfg


def _source_name(model_dir: str) -> str:
    """The HF model the base checkpoint was converted from (for base_model_name_or_path)."""
    meta = os.path.join(model_dir, "iada_jax.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f).get("source") or model_dir
    return model_dir


def write_iada_files(folder: str, adapters: TrainedAdapters, cfg: Qwen3VLConfig) -> None:
    """iada_config.json + iada.safetensors + torch_iada.py (nothing when no IADA was trained)."""
    if adapters.iada is None:
        return
    with open(os.path.join(folder, IADA_CONFIG), "w") as f:
        json.dump(iada_config_json(adapters.iada, cfg), f, indent=1)
    write_safetensors(os.path.join(folder, IADA_WEIGHTS), flatten(adapters.variables["iada"]), {"format": "pt"})
    shutil.copy2(TORCH_MODULE, os.path.join(folder, "torch_iada.py"))


_README = """# Adapters exported by iada-jax

From `{source}`, trained on `{model}`.

```python
import sys, torch
from transformers import Qwen3VLForConditionalGeneration
{peft_import}
model = Qwen3VLForConditionalGeneration.from_pretrained({base!r}, dtype=torch.bfloat16)
{peft_load}{iada_load}
```
{iada_note}"""


def _readme(adapters: TrainedAdapters, model_dir: str, merged: bool) -> str:
    iada = adapters.iada is not None
    return _README.format(
        source=adapters.source, model=model_dir,
        peft_import="" if merged else "from peft import PeftModel",
        base="THIS_FOLDER" if merged else _source_name(model_dir),
        peft_load="" if merged else "model = PeftModel.from_pretrained(model, 'THIS_FOLDER')\n",
        iada_load="sys.path.insert(0, 'THIS_FOLDER')\nfrom torch_iada import attach_iada\n"
                  "iada = attach_iada(model, 'THIS_FOLDER')  # model(...) and model.generate(...) now apply IADA"
        if iada else "",
        iada_note="\nIADA runs as hooks at the block boundaries of the language model: see torch_iada.py.\n"
        if iada else "",
    )


def export_peft(run_dir: str, out_dir: str, step: int | None = None, model: str | None = None) -> str:
    """A run's (or adapters folder's) LoRA as a PEFT adapter, IADA files beside it."""
    adapters, model_dir, _, cfg = _load(run_dir, step, model)
    if adapters.lora is None:
        raise ExportError(f"{adapters.source}: the run trained no LoRA adapter, so there is no PEFT adapter to "
                          "write (its IADA weights go with export-merged)")

    def write(folder):
        with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
            json.dump(to_peft_config(adapters.lora, _source_name(model_dir)), f, indent=1)
        write_safetensors(os.path.join(folder, ADAPTER_WEIGHTS), to_peft_state_dict(adapters.variables["lora"], adapters.lora),
                          {"format": "pt"})
        write_iada_files(folder, adapters, cfg)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(_readme(adapters, model_dir, merged=False))

    return write_folder_atomically(out_dir, write, ExportError)


def merge_lora(params: dict, lora_vars: dict, lora) -> dict:
    """W + scaling * A @ B on every adapted kernel (float32), as PEFT's merge_and_unload; the
    other parameters are shared, not copied. Stacked kernels become lazy `MergedKernel`s: a
    layer's slice is merged when it is read, so a merged export holds one layer at a time."""
    layers = params["model"]["language_model"]["layers"]
    factors = lora_vars["model"]["language_model"]["layers"]
    new_layers = {group: dict(modules) for group, modules in layers.items()}
    for module in lora.modules:
        group = module_group(module)
        f = factors[group][module]
        new_layers[group][module] = dict(layers[group][module], kernel=MergedKernel(
            layers[group][module]["kernel"], f["lora_A"], f["lora_B"], lora.scaling))
    lm = dict(params["model"]["language_model"], layers=new_layers)
    return dict(params, model=dict(params["model"], language_model=lm))


class MergedKernel:
    """kernel [L, in, out] + scaling * A[l] @ B[l], computed per layer slice on indexing."""

    def __init__(self, kernel, a, b, scaling: float):
        self.kernel, self.a, self.b, self.scaling = kernel, a, b, scaling
        self.shape = tuple(kernel.shape)

    def __getitem__(self, i: int) -> np.ndarray:
        a, b = np.asarray(self.a[i], np.float32), np.asarray(self.b[i], np.float32)
        return np.asarray(self.kernel[i], np.float32) + self.scaling * (a @ b)

    def __array__(self, dtype=None, copy=None):
        out = np.stack([self[i] for i in range(self.shape[0])])
        return out if dtype is None else out.astype(dtype)


def write_hf_weights(folder: str, specs: list, tensor, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """specs [(key, dtype, shape)] and tensor(key) -> array: model.safetensors, or
    model-0000i-of-0000n.safetensors shards of at most `max_shard_bytes` plus
    model.safetensors.index.json (as save_pretrained writes them). Streaming: the shards are
    planned from the shapes, then each tensor is made and written alone."""
    nbytes = {key: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for key, dtype, shape in specs}
    shards: list[list] = [[]]
    size = 0
    for key, dtype, shape in sorted(specs, key=lambda spec: spec[0]):
        if shards[-1] and size + nbytes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, dtype, shape))
        size += nbytes[key]
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    dtypes = {key: dtype for key, dtype, _ in specs}
    for name, shard in zip(names, shards):
        write_safetensors_stream(os.path.join(folder, name), shard,
                                 lambda key: [np.asarray(tensor(key)).astype(dtypes[key], copy=False)], {"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    return names


def export_merged(run_dir: str, out_dir: str, step: int | None = None, model: str | None = None,
                  dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, verbose: bool = True) -> str:
    """A full HF checkpoint with the run's LoRA merged in (dtype: that of the base by default).
    Streams: the base is read a tensor (a layer slice) at a time, merged, written."""
    from iada_jax.checkpoint import is_base_checkpoint, read_base_checkpoint

    adapters, model_dir, hf_config, cfg = _load(run_dir, step, model)
    if is_base_checkpoint(model_dir):
        _, params = read_base_checkpoint(model_dir)  # memory-mapped: read as written out
    else:
        from convert.import_hf import lazy_hf_params

        _, params = lazy_hf_params(model_dir)  # each tensor read from the source when written
    base_dtype = np.asarray(params["model"]["language_model"]["norm"]["scale"]).dtype
    target = param_dtype(dtype) if dtype else base_dtype
    if adapters.lora is not None:
        params = merge_lora(params, adapters.variables["lora"], adapters.lora)
    dtype_name = "float32" if np.dtype(target) == np.float32 else "bfloat16"
    hf_config = dict(hf_config, dtype=dtype_name)
    if "torch_dtype" in hf_config:
        hf_config["torch_dtype"] = dtype_name
    sources = hf_sources(cfg)

    def write(folder):
        shards = write_hf_weights(folder, hf_specs(cfg, target), lambda key: hf_tensor(params, cfg, key, sources),
                                  max_shard_bytes)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        copy_aux_files(model_dir, folder)
        write_iada_files(folder, adapters, cfg)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(_readme(adapters, model_dir, merged=True))
        if verbose:
            print(f"wrote {len(shards)} weight file(s), {dtype_name}", file=sys.stderr)

    return write_folder_atomically(out_dir, write, ExportError)


__all__ = ["AdapterError", "ExportError", "export_merged", "export_peft", "merge_lora", "write_hf_weights"]
