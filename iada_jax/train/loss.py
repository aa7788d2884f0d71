"""The supervised next-token loss: position t predicts token t + 1 where loss_mask[t + 1] = 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iada_jax.data.batch import Batch

Array = jax.Array


def next_token_logprobs(logits: Array, input_ids: Array) -> Array:
    """log p(token t + 1 | tokens <= t) in float32, [B, T - 1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def next_token_loss(logits: Array, batch: Batch) -> tuple[Array, Array]:
    """Mean cross-entropy of the supervised next tokens, in float32. Returns (loss, number
    of supervised tokens)."""
    if batch.loss_mask is None:
        raise ValueError("training needs batch.loss_mask (1 on the answer tokens to supervise)")
    weights = (batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]).astype(jnp.float32)
    nll = -next_token_logprobs(logits, batch.input_ids)
    count = weights.sum()
    return (nll * weights).sum() / jnp.maximum(count, 1.0), count
