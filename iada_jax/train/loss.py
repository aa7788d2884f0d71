"""The supervised next-token loss: position t predicts token t + 1 where loss_mask[t + 1] = 1.

`chunked_next_token_nll` is the training loss head: it never holds the [B, T, V] logits (at
151,936 vocabulary entries, B = 8 and T = 2048 that is 10 GB in float32, and the float32
log-softmax kept for the backward as much again). From the final hidden states it computes
the logits of `chunk` tokens at a time, under `jax.checkpoint` (the backward recomputes a
chunk's logits instead of keeping them), and only for chunks holding a supervised token: the
supervised positions are gathered first, so an unsupervised chunk is skipped by a `lax.cond`
in the forward and the backward alike. It returns the sum of the token losses and their
count; the step divides once per optimizer step (token-weighted accumulation, as
transformers' Trainer does with `num_items_in_batch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iada_jax.data.batch import Batch

Array = jax.Array


def supervised_weights(batch: Batch) -> Array:
    """[B, T - 1] float32: 1 where position t's next token (t + 1) is supervised and real."""
    if batch.loss_mask is None:
        raise ValueError("training needs batch.loss_mask (1 on the answer tokens to supervise)")
    return (batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]).astype(jnp.float32)


def next_token_logprobs(logits: Array, input_ids: Array) -> Array:
    """log p(token t + 1 | tokens <= t) in float32, [B, T - 1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def next_token_loss(logits: Array, batch: Batch) -> tuple[Array, Array]:
    """Mean cross-entropy of the supervised next tokens from full logits [B, T, V], in float32
    (evaluation and the reference for the chunked head). Returns (loss, number of tokens)."""
    weights = supervised_weights(batch)
    nll = -next_token_logprobs(logits, batch.input_ids)
    count = weights.sum()
    return (nll * weights).sum() / jnp.maximum(count, 1.0), count


def chunked_next_token_nll(hidden: Array, head: Array, batch: Batch, chunk: int = 1024,
                           head_layout: str = "vd") -> tuple[Array, Array]:
    """(sum of -log p(next token) over the supervised positions, their count), float32.

    hidden [B, T, D]: the final normed hidden states; head: the output projection, [V, D]
    ("vd": a tied embedding) or [D, V] ("dv": lm_head's kernel), used in hidden's dtype with
    float32 accumulation. Never materialises more than [chunk, V] logits.
    """
    b, t, d = hidden.shape
    weights = supervised_weights(batch).reshape(-1)
    x = hidden[:, :-1].reshape(-1, d)
    targets = batch.input_ids[:, 1:].reshape(-1)
    # Supervised positions first (stable), so the chunks past ceil(count / chunk) are skipped.
    order = jnp.argsort(weights == 0, stable=True)
    x, targets, w = x[order], targets[order], weights[order]
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, ((0, pad), (0, 0)))
    targets, w = jnp.pad(targets, (0, pad)), jnp.pad(w, (0, pad))
    n = x.shape[0] // chunk
    spec = "cd,vd->cv" if head_layout == "vd" else "cd,dv->cv"
    head = head.astype(hidden.dtype)

    @jax.checkpoint  # the backward recomputes a chunk's logits rather than keep them all
    def chunk_nll(x, targets, w):
        logits = jnp.einsum(spec, x, head, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return ((jax.nn.logsumexp(logits, axis=-1) - picked) * w).sum()

    def body(total, xs):
        x, targets, w = xs
        nll = jax.lax.cond(w.sum() > 0, chunk_nll, lambda *_: jnp.zeros((), jnp.float32), x, targets, w)
        return total + nll, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (x.reshape(n, chunk, d), targets.reshape(n, chunk), w.reshape(n, chunk)))
    return total, weights.sum()
