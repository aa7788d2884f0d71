"""iada-jax: Input-Adaptive Depth Aggregation for fine-tuning Qwen3-VL, in JAX/Flax.

Public API:
    load_pretrained(path, dtype="float32") -> Qwen3VL   converted checkpoint or HF folder
    Qwen3VL.logits(input_ids, attention_mask=None, ...) -> float32 [B, T, vocab]
    Qwen3VLConfig, TextConfig, VisionConfig, ForwardConfig
    get_rope_index(...)                                  host-side M-RoPE positions
"""

from iada_jax.config import ForwardConfig, Qwen3VLConfig, TextConfig, VisionConfig
from iada_jax.positions import get_rope_index
from iada_jax.pretrained import Qwen3VL, load_pretrained

__all__ = [
    "ForwardConfig",
    "Qwen3VL",
    "Qwen3VLConfig",
    "TextConfig",
    "VisionConfig",
    "get_rope_index",
    "load_pretrained",
]
