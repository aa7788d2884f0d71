"""The full Qwen3-VL model: embeddings, (vision), text decoder, lm_head; and the pure forward.

Mirrors `Qwen3VLForConditionalGeneration` (transformers 5.23.0). The parameter tree keeps
HF's module paths: {"model": {"language_model": ..., "visual": ...}, "lm_head": ...}.
The vision tower is frozen: its outputs pass through `stop_gradient`, so no backward pass
runs through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from iada_jax.config import ForwardConfig, Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.model.layers import Dense
from iada_jax.model.text import TextModel, to_block_layout
from iada_jax.model.vision import VisionModel

Array = jax.Array


class LanguageModelWrapper(nn.Module):
    """The `model` level of HF's tree (`Qwen3VLModel`): `visual` and `language_model`."""

    cfg: Qwen3VLConfig
    fwd: ForwardConfig
    keep_hidden: bool = False

    def setup(self):
        self.language_model = TextModel(self.cfg.text, self.fwd, self.keep_hidden)
        self.visual = VisionModel(self.cfg.vision, jnp.dtype(self.fwd.dtype))

    def vision_features(self, batch: Batch):
        """(merged [Nv, D], DeepStack [K, Nv, D]) of the batch's images and videos, frozen."""
        return jax.lax.stop_gradient(self.visual(batch.vision))

    def __call__(self, batch: Batch):
        embeds = self.language_model.embed_tokens(batch.input_ids)
        deepstack = None
        if batch.vision is not None:
            merged, deepstack = self.vision_features(batch)
            # masked_scatter of HF: visual features replace the placeholder embeddings.
            b, t, d = embeds.shape
            embeds = embeds.reshape(b * t, d).at[batch.visual_index].set(merged.astype(embeds.dtype)).reshape(b, t, d)
        h, hidden = self.language_model(
            embeds, batch.position_ids, batch.attention_mask, deepstack, batch.visual_index
        )
        return h, embeds, hidden

    def tied_head(self, h: Array) -> Array:
        return self.language_model.embed_tokens.attend(h)


class Qwen3VLForConditionalGeneration(nn.Module):
    cfg: Qwen3VLConfig
    fwd: ForwardConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, batch: Batch):
        """Returns (logits [B, T, V] in the compute dtype, hidden states or None).

        hidden states, when `keep_hidden`: [L + 1, B, T, D] = the embeddings, then the
        output of each decoder layer (the last one before the final norm).
        """
        model = LanguageModelWrapper(self.cfg, self.fwd, self.keep_hidden, name="model")
        h, embeds, hidden = model(batch)
        if self.cfg.tie_word_embeddings:
            logits = model.tied_head(h)
        else:
            logits = Dense(self.cfg.text.vocab_size, name="lm_head")(h)
        if hidden is not None:
            hidden = jnp.concatenate([embeds[None], hidden], axis=0)
        return logits, hidden


def vision_features(params: dict, batch: Batch, *, cfg: Qwen3VLConfig, fwd: ForwardConfig):
    """The vision tower alone: (merged [Nv, D], DeepStack [K, Nv, D])."""
    module = LanguageModelWrapper(cfg, fwd)
    return module.apply({"params": params["model"]}, batch, method=LanguageModelWrapper.vision_features)


def module_params(params: dict, fwd: ForwardConfig) -> dict:
    """Checkpoint-layout params -> the layout the module reads (layers grouped in blocks)."""
    lm = params["model"]["language_model"]
    model = dict(params["model"], language_model=to_block_layout(lm, fwd.block_size))
    return dict(params, model=model)


def forward(params: dict, batch: Batch, *, cfg: Qwen3VLConfig, fwd: ForwardConfig, keep_hidden: bool = False):
    """Pure forward over checkpoint-layout params. Jit with cfg/fwd/keep_hidden static."""
    fwd.check(cfg.text)
    module = Qwen3VLForConditionalGeneration(cfg, fwd, keep_hidden)
    return module.apply({"params": module_params(params, fwd)}, batch)
