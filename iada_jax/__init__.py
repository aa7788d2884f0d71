"""iada-jax: Input-Adaptive Depth Aggregation for fine-tuning Qwen3-VL, in JAX/Flax.

Public API:
    load_pretrained(path, dtype="float32") -> Qwen3VL   converted checkpoint or HF folder
    Qwen3VL.logits(input_ids, attention_mask=None, ...) -> float32 [B, T, vocab]
    Qwen3VLConfig, TextConfig, VisionConfig, ForwardConfig
    LoraConfig, IadaConfig, get_experiment(name)         adapters and the paper's named experiments
    forward, init_adapters                               the pure forward, fresh adapter variables
    get_rope_index(...)                                  host-side M-RoPE positions

The names are imported on first use, so `iada_jax.torch_iada` (the PyTorch side of exported
adapters) imports without JAX installed.
"""

import importlib

_EXPORTS = {
    "ForwardConfig": "iada_jax.config",
    "IadaConfig": "iada_jax.config",
    "LoraConfig": "iada_jax.config",
    "Qwen3VLConfig": "iada_jax.config",
    "TextConfig": "iada_jax.config",
    "VisionConfig": "iada_jax.config",
    "EXPERIMENTS": "iada_jax.experiments",
    "Experiment": "iada_jax.experiments",
    "get_experiment": "iada_jax.experiments",
    "forward": "iada_jax.model.qwen3_vl",
    "init_adapters": "iada_jax.model.qwen3_vl",
    "get_rope_index": "iada_jax.positions",
    "Qwen3VL": "iada_jax.pretrained",
    "load_pretrained": "iada_jax.pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'iada_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
