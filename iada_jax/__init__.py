"""iada-jax: Input-Adaptive Depth Aggregation for fine-tuning Qwen3-VL, in JAX/Flax.

Public API:
    load_pretrained(path, dtype="float32") -> Qwen3VL   converted checkpoint or HF folder
    Qwen3VL.logits(input_ids, attention_mask=None, ...) -> float32 [B, T, vocab]
    Qwen3VLConfig, TextConfig, VisionConfig, ForwardConfig
    LoraConfig, IadaConfig, get_experiment(name)         adapters and the paper's named experiments
    forward, init_adapters                               the pure forward, fresh adapter variables
    get_rope_index(...)                                  host-side M-RoPE positions
"""

from iada_jax.config import ForwardConfig, IadaConfig, LoraConfig, Qwen3VLConfig, TextConfig, VisionConfig
from iada_jax.experiments import EXPERIMENTS, Experiment, get_experiment
from iada_jax.model.qwen3_vl import forward, init_adapters
from iada_jax.positions import get_rope_index
from iada_jax.pretrained import Qwen3VL, load_pretrained

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ForwardConfig",
    "IadaConfig",
    "LoraConfig",
    "forward",
    "get_experiment",
    "init_adapters",
    "Qwen3VL",
    "Qwen3VLConfig",
    "TextConfig",
    "VisionConfig",
    "get_rope_index",
    "load_pretrained",
]
