"""The Qwen3-VL vision tower: patch embedding, blocks (scanned), patch merger, DeepStack mergers.

Mirrors `Qwen3VLVisionModel` and its parts (transformers 5.23.0). Parameter names follow the
converter's layout (`convert/mapping.py`): blocks stacked [depth, ...], the DeepStack
mergers stacked [K, ...], the Conv3d patch embedding as a matmul kernel. All images and
frames of a batch are one sequence of F frames of L rows (data/vision_inputs.py: real patches
first in each frame, padding after); attention is within a frame, over its real patches only
(memory F * L^2, never N^2): XLA with a length mask, or cuDNN's fused kernel with the frames'
lengths on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from iada_jax.config import VisionConfig
from iada_jax.data.vision_inputs import VisionInputs
from iada_jax.model.layers import Dense, dot_product_attention, rope_inv_freq, rotate_half

Array = jax.Array


class LayerNorm(nn.Module):
    """torch `nn.LayerNorm(eps=1e-6)`: statistics in float32, output in the input dtype."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


def vision_cos_sin(rot_pos: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """Mirrors `Qwen3VLVisionRotaryEmbedding`: (row, col) [N, 2] -> float32 cos/sin [N, head_dim].

    head_dim/4 frequencies per axis; layout [row freqs, col freqs] twice (rotate_half style).
    """
    inv_freq = jnp.asarray(rope_inv_freq(head_dim // 2, theta))
    freqs = rot_pos[..., None].astype(jnp.float32) * inv_freq  # [N, 2, hd/4]
    f = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def frame_attention(q: Array, k: Array, v: Array, lengths: Array, implementation: str) -> Array:
    """Non-causal attention within each frame: q/k/v [F, L, H, hd], a frame's rows past its
    length are padding (read by nobody; their own outputs are meaningless)."""
    valid = jnp.arange(q.shape[1])[None, :] < lengths[:, None]  # [F, L]
    # cuDNN: a padding frame (length 0) attends to its first row instead: finite, and dropped later.
    return dot_product_attention(q, k, v, valid[:, None, None, :], jnp.maximum(lengths, 1), implementation,
                                 causal=False)


class VisionAttention(nn.Module):
    """Mirrors `Qwen3VLVisionAttention`: fused qkv, 2-D RoPE in float32, non-causal, per frame."""

    cfg: VisionConfig
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, vis: VisionInputs) -> Array:
        c = self.cfg
        n = x.shape[0]
        qkv = Dense(3 * c.hidden_size, use_bias=True, name="qkv")(x).reshape(n, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]

        def rope(t):  # apply_rotary_pos_emb_vision: in float32, then back
            t32 = t.astype(jnp.float32)
            return (t32 * cos[:, None] + rotate_half(t32) * sin[:, None]).astype(t.dtype)

        q, k = rope(q), rope(k)
        f = vis.frame_lengths.shape[0]
        frames = [a.reshape(f, n // f, c.num_heads, c.head_dim) for a in (q, k, v)]  # [F, L, H, hd]
        out = frame_attention(*frames, vis.frame_lengths, self.implementation)
        return Dense(c.hidden_size, use_bias=True, name="proj")(out.reshape(n, c.hidden_size))


class VisionMLP(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = Dense(self.cfg.intermediate_size, use_bias=True, name="linear_fc1")(x)
        # gelu_pytorch_tanh: the tanh approximation (the mergers use the exact erf form).
        return Dense(self.cfg.hidden_size, use_bias=True, name="linear_fc2")(jax.nn.gelu(h, approximate=True))


class VisionBlock(nn.Module):
    """Mirrors `Qwen3VLVisionBlock` (pre-norm). Scan body: also records DeepStack taps.

    carry = (h [N, D], taps [K, N, D]); taps[k] takes h after block deepstack_visual_indexes[k].
    """

    cfg: VisionConfig
    implementation: str = "xla"

    @nn.compact
    def __call__(self, carry, layer_index: Array, cos: Array, sin: Array, vis: VisionInputs):
        h, taps = carry
        h = h + VisionAttention(self.cfg, self.implementation, name="attn")(LayerNorm(name="norm1")(h), cos, sin, vis)
        h = h + VisionMLP(self.cfg, name="mlp")(LayerNorm(name="norm2")(h))
        tap_here = jnp.asarray(self.cfg.deepstack_visual_indexes) == layer_index  # [K]
        taps = jnp.where(tap_here[:, None, None], h[None], taps)
        return (h, taps), None


class PatchMerger(nn.Module):
    """Mirrors `Qwen3VLVisionPatchMerger`: 2x2 windows -> one LLM token.

    The final merger normalises over D before the shuffle; the DeepStack mergers
    (postshuffle) over 4D after it. GELU is the exact erf form here.
    """

    cfg: VisionConfig
    postshuffle: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        merged = self.cfg.hidden_size * self.cfg.spatial_merge_size**2
        if self.postshuffle:
            x = LayerNorm(name="norm")(x.reshape(-1, merged))
        else:
            x = LayerNorm(name="norm")(x).reshape(-1, merged)
        x = jax.nn.gelu(Dense(merged, use_bias=True, name="linear_fc1")(x), approximate=False)
        return Dense(self.cfg.out_hidden_size, use_bias=True, name="linear_fc2")(x)


def vision_pixels(vis: VisionInputs, temporal: int) -> Array:
    """The processor's float32 pixel rows [N, C*T*p*p]: as given, or, for uint8 rows of one
    temporal slice with a pixel_table, each byte looked up in its channel's row of the table
    (the float32 values the host would have computed) and written to all `temporal` slices,
    padding rows zero as in the float layout."""
    if vis.pixel_table is None:
        return vis.pixel_values
    raw, table = vis.pixel_values, vis.pixel_table
    rows, channels = raw.shape[0], table.shape[0]
    per = raw.shape[1] // channels
    index = raw.astype(jnp.int32) + 256 * jnp.repeat(jnp.arange(channels, dtype=jnp.int32), per)[None, :]
    values = table.reshape(-1)[index].reshape(rows, channels, 1, per)
    values = jnp.broadcast_to(values, (rows, channels, temporal, per)).reshape(rows, channels * temporal * per)
    length = rows // vis.frame_lengths.shape[0]
    real = (jnp.arange(length)[None, :] < vis.frame_lengths[:, None]).reshape(-1, 1)
    return jnp.where(real, values, 0.0)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride as a matmul over flattened (C, T, y, x) patches."""

    cfg: VisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        return Dense(self.cfg.hidden_size, use_bias=True, name="proj")(pixel_values)


class PositionEmbedding(nn.Module):
    """Learned square position table, bilinearly resampled per patch with host-computed taps."""

    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, index: Array, weight: Array) -> Array:
        table = self.param("embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features))
        return (table[index] * weight[..., None].astype(table.dtype)).sum(1)


class VisionModel(nn.Module):
    """Mirrors `Qwen3VLVisionModel.forward`: returns (merged [N/4, out], DeepStack [K, N/4, out])
    in the frame-major layout (padding rows included: `vision_inputs.merged_rows` picks the real
    ones, the scatter into the text drops the rest)."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, vis: VisionInputs):
        c = self.cfg
        x = PatchEmbed(c, name="patch_embed")(vision_pixels(vis, self.cfg.temporal_patch_size).astype(self.dtype))
        pos = PositionEmbedding(c.num_position_embeddings, c.hidden_size, name="pos_embed")(vis.pos_index, vis.pos_weight)
        x = x + pos.astype(x.dtype)
        cos, sin = vision_cos_sin(vis.rot_pos, c.head_dim, c.rope_theta)

        blocks = nn.scan(
            VisionBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.depth,
        )(c, self.attention, name="blocks")
        taps = jnp.zeros((len(c.deepstack_visual_indexes),) + x.shape, x.dtype)
        (x, taps), _ = blocks((x, taps), jnp.arange(c.depth), cos, sin, vis)

        merged = PatchMerger(c, postshuffle=False, name="merger")(x)
        deepstack = nn.vmap(
            PatchMerger,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=0,
            axis_size=len(c.deepstack_visual_indexes),
        )(c, True, name="deepstack_merger_list")(taps)
        return merged, deepstack
