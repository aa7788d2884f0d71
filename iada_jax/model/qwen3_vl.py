"""The full Qwen3-VL model: embeddings, (vision), text decoder, lm_head; and the pure forward.

Mirrors `Qwen3VLForConditionalGeneration` (transformers 5.23.0). The parameter tree keeps
HF's module paths: {"model": {"language_model": ..., "visual": ...}, "lm_head": ...}.
The vision tower is frozen by default (`frozen_vision`): its outputs pass through
`stop_gradient`, so no backward pass runs through it; full-parameter training turns that off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from iada_jax.config import ConfigError, ForwardConfig, IadaConfig, LoraConfig, Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.iada import init_iada_variables, token_masks
from iada_jax.model.kv_cache import KVCache
from iada_jax.lora import init_lora_variables
from iada_jax.model.layers import Dense
from iada_jax.model.text import NO_ADAPTERS, Adapters, TextModel, from_block_layout, to_block_layout
from iada_jax.model.vision import VisionModel

Array = jax.Array


class LanguageModelWrapper(nn.Module):
    """The `model` level of HF's tree (`Qwen3VLModel`): `visual` and `language_model`."""

    cfg: Qwen3VLConfig
    fwd: ForwardConfig
    keep_hidden: bool = False
    adapters: Adapters = NO_ADAPTERS
    cache_mode: str = "none"
    frozen_vision: bool = True  # stop_gradient on the tower's outputs (False: the base trains)

    def setup(self):
        self.language_model = TextModel(self.cfg.text, self.fwd, self.keep_hidden, self.adapters, self.cache_mode)
        self.visual = VisionModel(self.cfg.vision, jnp.dtype(self.fwd.dtype), self.fwd.attention)

    def vision_features(self, batch: Batch):
        """(merged [Nv, D], DeepStack [K, Nv, D]) of the batch's images and videos; frozen (no
        gradient flows back into the tower) unless the base trains."""
        features = self.visual(batch.vision)
        return jax.lax.stop_gradient(features) if self.frozen_vision else features

    def __call__(self, batch: Batch, cache: KVCache | None = None):
        embeds = self.language_model.embed_tokens(batch.input_ids)
        deepstack = None
        if batch.vision is not None:
            merged, deepstack = self.vision_features(batch)
            # masked_scatter of HF: visual features replace the placeholder embeddings.
            b, t, d = embeds.shape
            embeds = embeds.reshape(b * t, d).at[batch.visual_index].set(merged.astype(embeds.dtype), mode="drop")
            embeds = embeds.reshape(b, t, d)  # padding visual tokens (index B * T) are dropped
        masks = None
        if self.adapters.iada is not None:
            k = 0 if batch.sample_lengths is None else batch.sample_lengths.shape[1]
            masks = token_masks(batch.input_ids, batch.attention_mask, batch.loss_mask,
                                (self.cfg.image_token_id, self.cfg.video_token_id), batch.segment_ids, k)
        h, hidden, cache = self.language_model(
            embeds, batch.position_ids, batch.attention_mask, deepstack, batch.visual_index, masks, cache,
            batch.segment_ids, batch.sample_lengths,
        )
        return h, embeds, hidden, cache

    def tied_head(self, h: Array) -> Array:
        return self.language_model.embed_tokens.attend(h)


class Qwen3VLForConditionalGeneration(nn.Module):
    cfg: Qwen3VLConfig
    fwd: ForwardConfig
    keep_hidden: bool = False
    adapters: Adapters = NO_ADAPTERS
    cache_mode: str = "none"
    logits: bool = True  # False: return the final normed hidden states instead (the loss head's input)
    frozen_vision: bool = True  # False: gradients reach the vision tower (full-parameter training)

    @nn.compact
    def __call__(self, batch: Batch, cache: KVCache | None = None):
        """Returns (logits [B, T, V] in the compute dtype, hidden states or None), or with a
        cache (cache_mode prefill/decode) (logits, the updated cache). With logits=False the
        first value is the final normed hidden state [B, T, D] (`lm_head_weight` projects it).

        hidden states, when `keep_hidden`: [L + 1, B, T, D] = the embeddings, then the
        output of each decoder layer (the last one before the final norm).
        """
        model = LanguageModelWrapper(self.cfg, self.fwd, self.keep_hidden, self.adapters, self.cache_mode,
                                     self.frozen_vision, name="model")
        h, embeds, hidden, cache = model(batch, cache)
        if not self.logits:
            logits = h
        elif self.cfg.tie_word_embeddings:
            logits = model.tied_head(h)
        else:
            logits = Dense(self.cfg.text.vocab_size, name="lm_head")(h)
        if cache is not None:
            return logits, cache
        if hidden is not None:
            hidden = jnp.concatenate([embeds[None], hidden], axis=0)
        return logits, hidden


def lm_head_weight(params: dict, cfg: Qwen3VLConfig) -> tuple[jax.Array, str]:
    """The output projection and its layout: the tied embedding [V, D] ("vd") or lm_head's
    kernel [D, V] ("dv"); logits = h @ it (as `chunked_next_token_nll` takes it)."""
    if cfg.tie_word_embeddings:
        return params["model"]["language_model"]["embed_tokens"]["embedding"], "vd"
    return params["lm_head"]["kernel"], "dv"


def vision_features(params: dict, batch: Batch, *, cfg: Qwen3VLConfig, fwd: ForwardConfig):
    """The vision tower alone: (merged [Nv, D], DeepStack [K, Nv, D])."""
    module = LanguageModelWrapper(cfg, fwd)
    return module.apply({"params": params["model"]}, batch, method=LanguageModelWrapper.vision_features)


def module_params(params: dict, fwd: ForwardConfig) -> dict:
    """Checkpoint-layout params -> the layout the module reads (layers grouped in blocks)."""
    lm = params["model"]["language_model"]
    model = dict(params["model"], language_model=to_block_layout(lm, fwd.block_size))
    return dict(params, model=model)


def module_variables(params: dict, adapters: dict | None, fwd: ForwardConfig) -> dict:
    """Storage layout -> the variables `Qwen3VLForConditionalGeneration.apply` reads.

    adapters: {"lora": {"model": {"language_model": {"layers": ...}}}, "iada": {...}} (either
    may be absent). LoRA factors are stacked like the layers; the IADA tree sits at the
    block scan, which broadcasts it to every boundary.
    """
    variables = {"params": module_params(params, fwd)}
    adapters = adapters or {}
    if "lora" in adapters:
        lm = adapters["lora"]["model"]["language_model"]
        variables["lora"] = {"model": {"language_model": to_block_layout(lm, fwd.block_size)}}
    if "iada" in adapters:
        variables["iada"] = {"model": {"language_model": {"blocks": {"iada": adapters["iada"]}}}}
    return variables


def storage_adapters(variables: dict) -> dict:
    """Inverse of `module_variables` for the adapter collections."""
    out = {}
    if "lora" in variables:
        lm = variables["lora"]["model"]["language_model"]
        out["lora"] = {"model": {"language_model": from_block_layout(lm)}}
    if "iada" in variables:
        out["iada"] = variables["iada"]["model"]["language_model"]["blocks"]["iada"]
    return out


def _adapters(lora: LoraConfig | None, iada: IadaConfig | None, fwd: ForwardConfig, deterministic: bool) -> Adapters:
    if iada is not None and iada.block_size != fwd.block_size:
        raise ConfigError(f"IADA block_size={iada.block_size} but the forward scans blocks of {fwd.block_size} "
                          f"layers; build the ForwardConfig with block_size={iada.block_size}")
    return Adapters(lora=lora, iada=iada, deterministic=deterministic)


def forward(params: dict, batch: Batch, *, cfg: Qwen3VLConfig, fwd: ForwardConfig, keep_hidden: bool = False,
            lora: LoraConfig | None = None, iada: IadaConfig | None = None, adapters: dict | None = None,
            dropout_rng: jax.Array | None = None, logits: bool = True, frozen_vision: bool = True):
    """Pure forward over storage-layout params (and adapter variables). Jit with cfg, fwd,
    keep_hidden, lora, iada, logits and frozen_vision static. LoRA dropout runs iff `dropout_rng`
    is given. logits=False returns the final normed hidden states [B, T, D] in place of the
    logits. frozen_vision=False lets gradients reach the vision tower (the base trains)."""
    fwd.check(cfg.text)
    module = Qwen3VLForConditionalGeneration(cfg, fwd, keep_hidden, _adapters(lora, iada, fwd, dropout_rng is None),
                                             logits=logits, frozen_vision=frozen_vision)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return module.apply(module_variables(params, adapters, fwd), batch, rngs=rngs)


def forward_cached(params: dict, batch: Batch, cache: KVCache, *, cfg: Qwen3VLConfig, fwd: ForwardConfig,
                   lora: LoraConfig | None = None, iada: IadaConfig | None = None, adapters: dict | None = None,
                   decode: bool = False):
    """The forward of T new tokens appended to a KV cache: the prompt (decode=False, the
    prefill: it also stores IADA's vectors) or generated tokens (decode=True: IADA adds the
    stored vectors). batch.position_ids are the new tokens' positions. Returns (logits, cache).
    Jit with cfg, fwd, lora, iada and decode static."""
    fwd.check(cfg.text)
    module = Qwen3VLForConditionalGeneration(cfg, fwd, False, _adapters(lora, iada, fwd, True),
                                             "decode" if decode else "prefill")
    return module.apply(module_variables(params, adapters, fwd), batch, cache)


def init_adapters(key: jax.Array, params: dict, *, cfg: Qwen3VLConfig, fwd: ForwardConfig,
                  lora: LoraConfig | None = None, iada: IadaConfig | None = None) -> dict:
    """Fresh adapter variables (storage layout) for a model whose base `params` are given:
    LoRA factors from the base kernels' shapes (`lora.init_lora_variables`), IADA from its
    operator alone (`iada.init_iada_variables`). No forward pass is traced, so this is cheap
    at any model size, and works under `jax.eval_shape` (abstract params) for parameter counts.
    """
    fwd.check(cfg.text)
    _adapters(lora, iada, fwd, True)  # the block-size check
    lora_key, iada_key = jax.random.split(key)
    out = {}
    if lora is not None:
        layers = params["model"]["language_model"]["layers"]
        out["lora"] = {"model": {"language_model": {"layers": init_lora_variables(lora_key, layers, lora)}}}
    if iada is not None:
        t = cfg.text
        out["iada"] = init_iada_variables(iada_key, iada, t.hidden_size, t.num_attention_heads, t.num_hidden_layers,
                                          t.rms_norm_eps)
    return out
