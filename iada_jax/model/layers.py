"""Building blocks of the Qwen3-VL language stack: RMSNorm, dense, rotary / M-RoPE, attention.

Each mirrors a piece of `transformers/models/qwen3_vl/modeling_qwen3_vl.py` (5.23.0), named
in the docstrings. Parameters are stored in whatever dtype they were loaded with and cast to
the activation dtype at use, as a bf16 HF model would hold them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from iada_jax.config import LoraConfig
from iada_jax.lora import lora_delta

Array = jax.Array


class RMSNorm(nn.Module):
    """Mirrors `Qwen3VLTextRMSNorm`: statistics in float32, cast back BEFORE the weight multiply."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


class Dense(nn.Module):
    """`nn.Linear` with a Flax-layout kernel [in, out]; with `lora`, PEFT's LoRA Linear."""

    features: int
    use_bias: bool = False
    lora: LoraConfig | None = None
    deterministic: bool = True  # False enables LoRA dropout (needs a "dropout" rng)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        if self.lora is not None:
            y = y + lora_delta(self, x, self.features, self.lora, self.deterministic)
        # Named, so a rematerialisation policy can keep it (model/text.py REMAT_POLICIES).
        return checkpoint_name(y, self.name) if self.name else y


class Embed(nn.Module):
    """`nn.Embedding` [vocab, d]; `attend` is the tied lm_head (logits = h @ E^T)."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features)
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, h: Array) -> Array:
        return jnp.einsum("btd,vd->btv", h, self.embedding.astype(h.dtype))


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Mirrors `compute_default_rope_parameters`: float32 inverse frequencies [head_dim/2]."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def mrope_axis_of_frequency(head_dim: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
    """Which position row (0=T, 1=H, 2=W) drives each of the head_dim/2 frequencies.

    Mirrors `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`: start from T, then
    H takes indices 1, 4, ... < 3*section[1] and W takes 2, 5, ... < 3*section[2]
    (the interleaved layout, not Qwen2-VL's chunked one).
    """
    axis = np.zeros(head_dim // 2, dtype=np.int32)
    for row, offset in ((1, 1), (2, 2)):
        axis[offset : 3 * mrope_section[row] : 3] = row
    return axis


def mrope_cos_sin(
    position_ids: Array, head_dim: int, theta: float, mrope_section: tuple[int, int, int], dtype
) -> tuple[Array, Array]:
    """position_ids [3, B, T] -> (cos, sin) [B, T, head_dim], computed in float32, cast to `dtype`."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq  # [3, B, T, hd/2]
    axis = jnp.asarray(mrope_axis_of_frequency(head_dim, mrope_section))
    freqs = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Mirrors `apply_rotary_pos_emb` for x [B, T, H, hd] and cos/sin [B, T, hd] (in x's dtype)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- attention


def causal_padding_mask(attention_mask: Array, segment_ids: Array | None = None) -> Array:
    """[B, T] 0/1 -> boolean [B, 1, T, T]: query t sees key s iff s <= t and s is not padding;
    with segment_ids [B, T] (packed rows) also iff s is in t's sample (block-diagonal causal)."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    mask = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Array, seq_lengths: Array, implementation: str, causal: bool = True
) -> Array:
    """q [B, T, Hq, hd], k/v [B, S, Hkv, hd] (GQA: consecutive q heads share a kv head).

    "xla": explicit boolean mask (any padding side, packed rows); logits and softmax in float32.
    "cudnn": causal (or not: the vision tower's frames) + the sequences' lengths, so it is only
    right for right-padded batches (the public API has no left padding or packing; see
    PERF_NOTES.md traps). seq_lengths [B, K] (packed rows, samples from position 0 on): cuDNN's
    segment offsets (`cudnn_packed_attention`), block-diagonal causal.
    """
    scale = q.shape[-1] ** -0.5
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    if implementation == "cudnn" and seq_lengths.ndim == 2:
        return cudnn_packed_attention(q, k, v, seq_lengths, scale)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, query_seq_lengths=seq_lengths,
            key_value_seq_lengths=seq_lengths, implementation="cudnn",
        )
    raise ValueError(f"unknown attention implementation {implementation!r}; use 'xla' or 'cudnn'")


def resolve_attention(implementation: str, dtype: str) -> str:
    """The attention kernel a run uses. "auto" (train.py's default): cuDNN's fused attention on
    an NVIDIA GPU with bf16 / fp16 compute, XLA's elsewhere. On an H200 at Qwen3-VL-2B, sequence
    2048, cuDNN made the LoRA + IADA step 1.64x faster and 5.5 GiB smaller than XLA's
    (bench/RESULTS.md). "xla" and "cudnn" are taken as given, after a check that cuDNN can run."""
    if implementation not in ("auto", "xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {implementation!r}; use 'auto', 'xla' or 'cudnn'")
    fused_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if implementation == "auto":
        return "cudnn" if fused_ok and _nvidia_gpu() else "xla"
    if implementation == "cudnn" and not _nvidia_gpu():
        raise ValueError(f"attention 'cudnn' needs an NVIDIA GPU; this process runs on {jax.default_backend()!r} "
                         "(use 'auto' or 'xla')")
    if implementation == "cudnn" and not fused_ok:
        raise ValueError(f"attention 'cudnn' takes bf16 or fp16 compute, not {dtype} (use 'auto' or 'xla')")
    return implementation


def _nvidia_gpu() -> bool:
    device = jax.devices()[0]
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return device.platform == "gpu" and "rocm" not in version


def cudnn_packed_attention(q: Array, k: Array, v: Array, sample_lengths: Array, scale: float) -> Array:
    """Block-diagonal causal attention over packed rows with cuDNN's segment offsets (jax's
    internal `cudnn.fused_attention_stablehlo.dot_product_attention`: the public API takes no
    offsets). sample_lengths [B, K]: the samples lie back to back from position 0; unused slots
    (0) become cuDNN's -1. GPU only; bench/parity.py checks it against the XLA mask."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    lengths = sample_lengths.astype(jnp.int32)
    used = lengths > 0
    starts = jnp.cumsum(lengths, axis=1) - lengths
    seqlen = jnp.where(used, lengths, -1)
    # K + 1 entries: the samples' starts, -1 after them (the docstring's example of the function).
    offsets = jnp.concatenate([jnp.where(used, starts, -1), jnp.full(lengths.shape[:1] + (1,), -1, jnp.int32)], 1)
    return cudnn_attention(q, k, v, None, None, seqlen, seqlen, offsets, offsets, scale=scale,
                           mask_type=MaskType.PADDING_CAUSAL)
