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

from iada_jax.config import ForwardConfig, IadaConfig, LoraConfig, TextConfig
from iada_jax.iada import DepthAggregation, TokenMasks, attach_memory, stream_mask
from iada_jax.model.layers import (
    Dense,
    Embed,
    RMSNorm,
    apply_rotary,
    causal_padding_mask,
    dot_product_attention,
    mrope_cos_sin,
)
from iada_jax.model.kv_cache import KVCache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Per-forward inputs every layer reads (broadcast into the scan)."""

    cos: Array  # [B, T, hd]
    sin: Array  # [B, T, hd]
    mask: Array  # [B, 1, T, T] bool
    seq_lengths: Array  # [B] int32 valid tokens per row, or [B, K] per packed sample (cuDNN path)
    deepstack: Array | None = None  # [K, Nv, D] visual features added after layers 0..K-1
    visual_index: Array | None = None  # [Nv] flat (b * T + t) positions of the visual tokens
    token_masks: TokenMasks | None = None  # what IADA reads (streams, scope)
    cache_index: Array | None = None  # [] int32: KV-cache slot of the first token (decoding)


jax.tree_util.register_dataclass(
    LayerContext,
    data_fields=["cos", "sin", "mask", "seq_lengths", "deepstack", "visual_index", "token_masks", "cache_index"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """What is added to the frozen stack: LoRA on its Dense layers, IADA at block boundaries.
    `deterministic=False` turns LoRA dropout on (training; needs a "dropout" rng)."""

    lora: LoraConfig | None = None
    iada: IadaConfig | None = None
    deterministic: bool = True

    def dense(self, name: str) -> dict:
        """Keyword arguments of the `Dense` called `name` (q_proj, ..., down_proj)."""
        lora = self.lora if self.lora is not None and self.lora.targets(name) else None
        return dict(lora=lora, deterministic=self.deterministic, name=name)


NO_ADAPTERS = Adapters()


def inject_deepstack(h: Array, layer_index: Array, ctx: LayerContext) -> Array:
    """Mirrors `Qwen3VLTextModel._deepstack_process`: after decoder layer k < K, add
    deepstack[k] at the visual positions. Selected by the scanned layer index, so the
    layer stays one traced body (layers >= K add zeros)."""
    if ctx.deepstack is None:
        return h
    k = ctx.deepstack.shape[0]
    add = jnp.where(layer_index < k, ctx.deepstack[jnp.minimum(layer_index, k - 1)], 0).astype(h.dtype)
    flat = h.reshape(-1, h.shape[-1]).at[ctx.visual_index].add(add, mode="drop")
    return flat.reshape(h.shape)


class Attention(nn.Module):
    """Mirrors `Qwen3VLTextAttention`: GQA with per-head q_norm/k_norm applied BEFORE RoPE."""

    cfg: TextConfig
    implementation: str = "xla"
    adapters: Adapters = NO_ADAPTERS

    @nn.compact
    def __call__(self, x: Array, ctx: LayerContext, cache: tuple[Array, Array] | None = None):
        """Returns (output, cache): with a cache (k, v [B, S, Hkv, hd]) this call's keys and
        values are written at slot ctx.cache_index on, and the queries read every slot."""
        c, ad = self.cfg, self.adapters
        b, t, _ = x.shape
        q = Dense(c.num_attention_heads * c.head_dim, c.attention_bias, **ad.dense("q_proj"))(x)
        k = Dense(c.num_key_value_heads * c.head_dim, c.attention_bias, **ad.dense("k_proj"))(x)
        v = Dense(c.num_key_value_heads * c.head_dim, c.attention_bias, **ad.dense("v_proj"))(x)
        q = RMSNorm(c.rms_norm_eps, name="q_norm")(q.reshape(b, t, c.num_attention_heads, c.head_dim))
        k = RMSNorm(c.rms_norm_eps, name="k_norm")(k.reshape(b, t, c.num_key_value_heads, c.head_dim))
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if cache is None:
            a = dot_product_attention(q, k, v, ctx.mask, ctx.seq_lengths, self.implementation)
        else:
            k_all = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), ctx.cache_index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), ctx.cache_index, axis=1)
            # The mask (slot filled and not after the query) is explicit: the XLA path.
            a = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), ctx.mask, ctx.seq_lengths, "xla")
            cache = (k_all, v_all)
        return Dense(c.hidden_size, c.attention_bias, **ad.dense("o_proj"))(a.reshape(b, t, -1)), cache


class MLP(nn.Module):
    """Mirrors `Qwen3VLTextMLP`: down(silu(gate(x)) * up(x))."""

    cfg: TextConfig
    adapters: Adapters = NO_ADAPTERS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ad = self.adapters
        gate = Dense(self.cfg.intermediate_size, **ad.dense("gate_proj"))(x)
        up = Dense(self.cfg.intermediate_size, **ad.dense("up_proj"))(x)
        return Dense(self.cfg.hidden_size, **ad.dense("down_proj"))(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Mirrors `Qwen3VLTextDecoderLayer` (pre-norm). Scan signature: (carry, x) -> (carry, y)."""

    cfg: TextConfig
    implementation: str = "xla"
    keep_hidden: bool = False
    adapters: Adapters = NO_ADAPTERS

    @nn.compact
    def __call__(self, h: Array, xs, ctx: LayerContext):
        """xs = (layer_index, this layer's KV cache or None) -> (h, (hidden or None, cache))."""
        layer_index, cache = xs
        x = RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(h)
        a, cache = Attention(self.cfg, self.implementation, self.adapters, name="self_attn")(x, ctx, cache)
        h = h + a
        x = RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        h = h + MLP(self.cfg, self.adapters, name="mlp")(x)
        h = inject_deepstack(h, layer_index, ctx)
        return h, (h if self.keep_hidden else None, cache)


# Rematerialisation of a decoder layer, by name: what its backward keeps of the forward (the
# layer input is always kept, by the scan). Every Dense tags its output with its own name.
_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
    "full": None,  # keep nothing: the backward recomputes the whole layer
    # the q/k/v projections: the recompute redoes o_proj, the attention core and the MLP
    "qkv": _save("q_proj", "k_proj", "v_proj"),
    # every projection the recompute would redo (down_proj's output only feeds the next layer,
    # whose input the scan keeps): norms, RoPE, the attention core and activations are recomputed
    "proj": _save("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul, the attention logits included
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Collections of the layer stack: base params and LoRA are stacked per layer; RNG streams
# (init, LoRA dropout) are split per layer; IADA parameters are one set broadcast to all blocks.
_STACKED = {"params": 0, "lora": 0}
_SPLIT_RNGS = {"params": True, "dropout": True, "iada": False}


def _remat(cls, fwd: ForwardConfig):
    if fwd.remat == "none":
        return cls
    if fwd.remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {fwd.remat!r}; use one of {sorted(REMAT_POLICIES)} or 'none'")
    # prevent_cse=False is safe (and faster) under scan, per the jax.checkpoint docs.
    return nn.remat(cls, policy=REMAT_POLICIES[fwd.remat], prevent_cse=False)


class Block(nn.Module):
    """S consecutive decoder layers as an inner scan, then IADA at the boundary.

    Scan signature: ((h, buffer, shadow), (layer_index [S], block_index, cache, vectors), ctx)
    -> ((h, buffer, shadow), (hidden, cache, vectors)). buffer is the [N + 1, B, T, D] store of
    boundary states and shadow its twin that carries the final buffer to the reads' backward
    (iada.read_memory; both None without IADA); cache the block's KV cache [S, ...] (None
    without one). cache_mode "prefill" also returns IADA's injected vectors [M, B, D]; "decode"
    adds the prefill's vectors instead of running the operator (iada_jax/model/kv_cache.py).
    """

    cfg: TextConfig
    fwd: ForwardConfig
    keep_hidden: bool = False
    adapters: Adapters = NO_ADAPTERS
    cache_mode: str = "none"

    @nn.compact
    def __call__(self, carry, xs, ctx: LayerContext):
        h, buffer, shadow = carry
        layer_index, block_index, cache, vectors = xs
        layers = nn.scan(
            _remat(DecoderLayer, self.fwd),
            variable_axes=_STACKED,
            split_rngs=_SPLIT_RNGS,
            in_axes=(0, nn.broadcast),
            length=self.fwd.block_size,
        )(self.cfg, self.fwd.attention, self.keep_hidden, self.adapters, name="layers")
        h, (hidden, cache) = layers(h, (layer_index, cache), ctx)
        iada_cfg = self.adapters.iada
        if iada_cfg is not None and self.cache_mode == "decode":
            masks = ctx.token_masks
            add = sum(jnp.where(stream_mask(masks, m)[..., None], vectors[i][:, None, :], 0.0)
                      for i, m in enumerate(iada_cfg.streams))
            h = h + add.astype(h.dtype)
        elif iada_cfg is not None:
            # Not rematerialised: its own residuals are O(B T D) per boundary, and the reads
            # save no buffer (remat would save its inputs, the buffer among them, per boundary).
            iada = DepthAggregation(
                iada_cfg, self.cfg.hidden_size, self.cfg.num_attention_heads,
                self.cfg.num_hidden_layers // self.fwd.block_size, self.cfg.rms_norm_eps,
                return_vectors=self.cache_mode == "prefill", name="iada",
            )
            out = iada(h, buffer, block_index, ctx.token_masks, shadow)
            h, buffer, shadow = out[:3]
            if self.cache_mode == "prefill":
                vectors = out[3]
        return (h, buffer, shadow), (hidden, cache, vectors)


class TextModel(nn.Module):
    """Mirrors `Qwen3VLTextModel`: embed -> N scanned blocks (IADA at each end) -> final RMSNorm."""

    cfg: TextConfig
    fwd: ForwardConfig
    keep_hidden: bool = False
    adapters: Adapters = NO_ADAPTERS
    cache_mode: str = "none"  # "prefill" / "decode": a KV cache is read and written

    def setup(self):
        self.embed_tokens = Embed(self.cfg.vocab_size, self.cfg.hidden_size, jnp.dtype(self.fwd.dtype))
        self.blocks = nn.scan(
            Block,
            variable_axes=_STACKED,
            variable_broadcast="iada",
            split_rngs=_SPLIT_RNGS,
            in_axes=(0, nn.broadcast),
            length=self.cfg.num_hidden_layers // self.fwd.block_size,
        )(self.cfg, self.fwd, self.keep_hidden, self.adapters, self.cache_mode)
        self.norm = RMSNorm(self.cfg.rms_norm_eps)

    def __call__(self, inputs_embeds: Array, position_ids: Array, attention_mask: Array,
                 deepstack: Array | None = None, visual_index: Array | None = None,
                 token_masks: TokenMasks | None = None, cache: KVCache | None = None,
                 segment_ids: Array | None = None, sample_lengths: Array | None = None):
        """inputs_embeds [B, T, D], position_ids [3, B, T], attention_mask [B, T];
        deepstack [K, Nv, D] and visual_index [Nv] when the batch has images or videos;
        token_masks when IADA is on; cache (cache_mode prefill/decode) the KV cache the T
        tokens are appended to; segment_ids [B, T] and sample_lengths [B, K] for packed rows
        (attention stays inside each sample: block-diagonal causal).

        Returns (final normed hidden [B, T, D], per-layer outputs [L, B, T, D] or None, the
        updated cache or None); a layer's output is taken after its DeepStack addition (the
        state the next layer reads), and before the IADA injection at a block boundary.
        """
        c = self.cfg
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, inputs_embeds.dtype)
        n_blocks = c.num_hidden_layers // self.fwd.block_size
        seq_lengths = attention_mask.sum(-1).astype(jnp.int32)
        if cache is None:
            mask, cache_index, layer_cache, vectors = causal_padding_mask(attention_mask, segment_ids), None, None, None
            if segment_ids is not None:
                seq_lengths = sample_lengths.astype(jnp.int32)
        elif segment_ids is not None:
            raise ValueError("packed rows (segment_ids) cannot be decoded with a KV cache")
        else:
            kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(jnp.int32), cache.index, 1)
            slots = jnp.arange(kv_mask.shape[1])
            query_slot = cache.index + jnp.arange(attention_mask.shape[1])
            mask = (kv_mask[:, None, None, :] > 0) & (slots[None, :] <= query_slot[:, None])[None, None]
            cache_index = cache.index
            to_blocks = lambda x: x.reshape((n_blocks, self.fwd.block_size) + x.shape[1:])  # noqa: E731
            layer_cache = (to_blocks(cache.k), to_blocks(cache.v))
            vectors = cache.iada if self.cache_mode == "decode" else None
        ctx = LayerContext(
            cos=cos, sin=sin, mask=mask, seq_lengths=seq_lengths,
            deepstack=deepstack, visual_index=visual_index, token_masks=token_masks, cache_index=cache_index,
        )
        layer_index = jnp.arange(c.num_hidden_layers, dtype=jnp.int32).reshape(n_blocks, self.fwd.block_size)
        block_index = jnp.arange(n_blocks, dtype=jnp.int32)
        buffer = shadow = None
        if self.adapters.iada is not None:
            if token_masks is None:
                raise ValueError("IADA needs token_masks (streams and scope of every token)")
            if self.cache_mode != "decode":
                # Boundary states H_0, H_S, ..., H_NS; entry 0 is the input embeddings.
                buffer = jnp.zeros((n_blocks + 1,) + inputs_embeds.shape, inputs_embeds.dtype).at[0].set(inputs_embeds)
                shadow = jnp.zeros_like(buffer)
        (h, buffer, shadow), (hidden, layer_cache, vectors) = self.blocks(
            (inputs_embeds, buffer, shadow), (layer_index, block_index, layer_cache, vectors), ctx)
        if shadow is not None:
            h = attach_memory(h, shadow, buffer)
        if hidden is not None:
            hidden = hidden.reshape((c.num_hidden_layers,) + hidden.shape[2:])
        if cache is not None:
            from_blocks = lambda x: x.reshape((c.num_hidden_layers,) + x.shape[2:])  # noqa: E731
            cache = KVCache(k=from_blocks(layer_cache[0]), v=from_blocks(layer_cache[1]), mask=kv_mask,
                            index=cache.index + attention_mask.shape[1],
                            iada=vectors if self.cache_mode == "prefill" else cache.iada)
        return self.norm(h), hidden, cache


def to_block_layout(lm_params: dict, block_size: int) -> dict:
    """Checkpoint layout {layers: [L, ...]} -> module layout {blocks: {layers: [N, S, ...]}}
    (for any collection stacked with the layers: params, lora)."""
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
