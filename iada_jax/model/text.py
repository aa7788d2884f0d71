"""The Qwen3-VL text decoder: decoder layer and the scanned block stack.

Mirrors `Qwen3VLTextDecoderLayer` / `Qwen3VLTextModel` (transformers 5.23.0). The L layers
run as a scan over N = L / S blocks, each block an inner scan over its S layers: the program
holds one traced copy of a layer however deep the model is, and the block boundary is where
IADA hooks in. Parameters are stored per layer, stacked [L, ...] under `layers` (the
checkpoint layout, independent of S); `to_block_layout` reshapes them to the [N, S, ...]
that the nested scan reads, inside jit, at no cost.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from iada_jax.config import ForwardConfig, TextConfig
from iada_jax.model.layers import (
    Dense,
    Embed,
    RMSNorm,
    apply_rotary,
    causal_padding_mask,
    dot_product_attention,
    mrope_cos_sin,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Per-forward inputs every layer reads (broadcast into the scan)."""

    cos: Array  # [B, T, hd]
    sin: Array  # [B, T, hd]
    mask: Array  # [B, 1, T, T] bool
    seq_lengths: Array  # [B] int32, valid tokens per sample (cuDNN path)
    deepstack: Array | None = None  # [K, Nv, D] visual features added after layers 0..K-1
    visual_index: Array | None = None  # [Nv] flat (b * T + t) positions of the visual tokens


jax.tree_util.register_dataclass(
    LayerContext, data_fields=["cos", "sin", "mask", "seq_lengths", "deepstack", "visual_index"], meta_fields=[]
)


def inject_deepstack(h: Array, layer_index: Array, ctx: LayerContext) -> Array:
    """Mirrors `Qwen3VLTextModel._deepstack_process`: after decoder layer k < K, add
    deepstack[k] at the visual positions. Selected by the scanned layer index, so the
    layer stays one traced body (layers >= K add zeros)."""
    if ctx.deepstack is None:
        return h
    k = ctx.deepstack.shape[0]
    add = jnp.where(layer_index < k, ctx.deepstack[jnp.minimum(layer_index, k - 1)], 0).astype(h.dtype)
    flat = h.reshape(-1, h.shape[-1]).at[ctx.visual_index].add(add)
    return flat.reshape(h.shape)


class Attention(nn.Module):
    """Mirrors `Qwen3VLTextAttention`: GQA with per-head q_norm/k_norm applied BEFORE RoPE."""

    cfg: TextConfig
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: Array, ctx: LayerContext) -> Array:
        c = self.cfg
        b, t, _ = x.shape
        q = Dense(c.num_attention_heads * c.head_dim, c.attention_bias, name="q_proj")(x)
        k = Dense(c.num_key_value_heads * c.head_dim, c.attention_bias, name="k_proj")(x)
        v = Dense(c.num_key_value_heads * c.head_dim, c.attention_bias, name="v_proj")(x)
        q = RMSNorm(c.rms_norm_eps, name="q_norm")(q.reshape(b, t, c.num_attention_heads, c.head_dim))
        k = RMSNorm(c.rms_norm_eps, name="k_norm")(k.reshape(b, t, c.num_key_value_heads, c.head_dim))
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        a = dot_product_attention(q, k, v, ctx.mask, ctx.seq_lengths, self.implementation)
        return Dense(c.hidden_size, c.attention_bias, name="o_proj")(a.reshape(b, t, -1))


class MLP(nn.Module):
    """Mirrors `Qwen3VLTextMLP`: down(silu(gate(x)) * up(x))."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate = Dense(self.cfg.intermediate_size, name="gate_proj")(x)
        up = Dense(self.cfg.intermediate_size, name="up_proj")(x)
        return Dense(self.cfg.hidden_size, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Mirrors `Qwen3VLTextDecoderLayer` (pre-norm). Scan signature: (carry, x) -> (carry, y)."""

    cfg: TextConfig
    implementation: str = "xla"
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, h: Array, layer_index: Array, ctx: LayerContext):
        x = RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(h)
        h = h + Attention(self.cfg, self.implementation, name="self_attn")(x, ctx)
        x = RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        h = h + MLP(self.cfg, name="mlp")(x)
        h = inject_deepstack(h, layer_index, ctx)
        return h, (h if self.keep_hidden else None)


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """S consecutive decoder layers as an inner scan; the IADA boundary is at its end."""

    cfg: TextConfig
    fwd: ForwardConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, h: Array, layer_index: Array, ctx: LayerContext):
        layer_cls = DecoderLayer
        if self.fwd.remat != "none":
            if self.fwd.remat not in _REMAT_POLICIES:
                raise ValueError(f"unknown remat policy {self.fwd.remat!r}; use one of {sorted(_REMAT_POLICIES)} or 'none'")
            # prevent_cse=False is safe (and faster) under scan, per the jax.checkpoint docs.
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[self.fwd.remat], prevent_cse=False)
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=self.fwd.block_size,
        )(self.cfg, self.fwd.attention, self.keep_hidden, name="layers")
        h, hidden = layers(h, layer_index, ctx)
        return h, hidden


class TextModel(nn.Module):
    """Mirrors `Qwen3VLTextModel`: embed -> N scanned blocks -> final RMSNorm."""

    cfg: TextConfig
    fwd: ForwardConfig
    keep_hidden: bool = False

    def setup(self):
        self.embed_tokens = Embed(self.cfg.vocab_size, self.cfg.hidden_size, jnp.dtype(self.fwd.dtype))
        self.blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=self.cfg.num_hidden_layers // self.fwd.block_size,
        )(self.cfg, self.fwd, self.keep_hidden)
        self.norm = RMSNorm(self.cfg.rms_norm_eps)

    def __call__(self, inputs_embeds: Array, position_ids: Array, attention_mask: Array,
                 deepstack: Array | None = None, visual_index: Array | None = None):
        """inputs_embeds [B, T, D], position_ids [3, B, T], attention_mask [B, T];
        deepstack [K, Nv, D] and visual_index [Nv] when the batch has images or videos.

        Returns (final normed hidden [B, T, D], per-layer outputs [L, B, T, D] or None);
        a layer's output is taken after its DeepStack addition (the state the next layer reads).
        """
        c = self.cfg
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, inputs_embeds.dtype)
        ctx = LayerContext(
            cos=cos, sin=sin, mask=causal_padding_mask(attention_mask),
            seq_lengths=attention_mask.sum(-1).astype(jnp.int32),
            deepstack=deepstack, visual_index=visual_index,
        )
        n_blocks = c.num_hidden_layers // self.fwd.block_size
        layer_index = jnp.arange(c.num_hidden_layers, dtype=jnp.int32).reshape(n_blocks, self.fwd.block_size)
        h, hidden = self.blocks(inputs_embeds, layer_index, ctx)
        if hidden is not None:
            hidden = hidden.reshape((c.num_hidden_layers,) + hidden.shape[2:])
        return self.norm(h), hidden


def to_block_layout(lm_params: dict, block_size: int) -> dict:
    """Checkpoint layout {layers: [L, ...]} -> module layout {blocks: {layers: [N, S, ...]}}."""
    out = {k: v for k, v in lm_params.items() if k != "layers"}
    out["blocks"] = {
        "layers": jax.tree.map(lambda x: x.reshape((-1, block_size) + x.shape[1:]), lm_params["layers"])
    }
    return out


def from_block_layout(lm_params: dict) -> dict:
    """Inverse of `to_block_layout`."""
    out = {k: v for k, v in lm_params.items() if k != "blocks"}
    out["layers"] = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), lm_params["blocks"]["layers"])
    return out
