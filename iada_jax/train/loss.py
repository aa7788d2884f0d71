"""The supervised next-token loss: position t predicts token t + 1 where loss_mask[t + 1] = 1.

`chunked_next_token_nll` is the training loss head: it never holds the [B, T, V] logits (at
151,936 vocabulary entries, B = 8 and T = 2048 that is 10 GB in float32, and the float32
log-softmax kept for the backward as much again). From the final hidden states it computes
the logits of `chunk` tokens at a time, and only for chunks holding a supervised token: the
supervised positions are gathered first, so an unsupervised chunk is skipped by a `lax.cond`
in the forward and the backward alike. Its gradient is written out (`jax.custom_vjp`): the
forward keeps one float32 log-sum-exp per token, the backward recomputes a chunk's logits and
turns them into that chunk's gradients at once. (Left to autodiff, a scan of checkpointed
chunks behind a `cond` still kept about three float32 [tokens, V] residuals: 28 GiB at 2B
dimensions and 8 x 2048 tokens, measured from XLA's compiled memory analysis.) It returns the
sum of the token losses and their count; the step divides once per optimizer step
(token-weighted accumulation, as transformers' Trainer does with `num_items_in_batch`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iada_jax.data.batch import Batch

Array = jax.Array


def supervised_weights(batch: Batch) -> Array:
    """[B, T - 1] float32: 1 where position t's next token (t + 1) is supervised and real, and
    (packed rows) in t's own sample: a sample's first token has no predecessor, as alone."""
    if batch.loss_mask is None:
        raise ValueError("training needs batch.loss_mask (1 on the answer tokens to supervise)")
    weights = batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]
    if batch.segment_ids is not None:
        weights = weights * (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1])
    return weights.astype(jnp.float32)


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
    float32 accumulation. Never materialises more than [chunk, V] logits, forward or backward.
    """
    if head_layout not in ("vd", "dv"):
        raise ValueError(f"head_layout must be 'vd' or 'dv', got {head_layout!r}")
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
    total = _chunk_scan(x.reshape(n, chunk, d), head.astype(hidden.dtype), targets.reshape(n, chunk),
                         w.reshape(n, chunk), head_layout)
    return total, weights.sum()


def _logits(x: Array, head: Array, layout: str) -> Array:
    """[chunk, V] float32 logits of one chunk."""
    return jnp.einsum("cd,vd->cv" if layout == "vd" else "cd,dv->cv", x, head, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_scan(x: Array, head: Array, targets: Array, w: Array, layout: str) -> Array:
    return _chunk_scan_fwd(x, head, targets, w, layout)[0]


def _chunk_scan_fwd(x, head, targets, w, layout):
    """x [n, chunk, D], targets and w [n, chunk] -> (sum of w * nll, residuals incl. lse [n, chunk])."""

    def one(x, targets, w):
        logits = _logits(x, head, layout)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return ((lse - picked) * w).sum(), lse

    def skip(x, targets, w):
        return jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32)

    def body(total, xs):
        x, targets, w = xs
        nll, lse = jax.lax.cond(w.sum() > 0, one, skip, x, targets, w)
        return total + nll, lse

    total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x, targets, w))
    return total, (x, head, targets, w, lse)


def _chunk_scan_bwd(layout, residuals, g):
    """d(total)/d logits = w * (softmax - onehot(target)), a chunk at a time; then the chunk's
    share of d/dx (a [chunk, D] row block) and of d/dhead (summed in float32)."""
    x, head, targets, w, lse = residuals

    def one(dhead, x, targets, w, lse):
        logits = _logits(x, head, layout)
        dlogits = jnp.exp(logits - lse[:, None])
        dlogits = dlogits.at[jnp.arange(x.shape[0]), targets].add(-1.0) * (w * g)[:, None]
        dlogits = dlogits.astype(x.dtype)
        if layout == "vd":
            dx = jnp.einsum("cv,vd->cd", dlogits, head, preferred_element_type=jnp.float32)
            dh = jnp.einsum("cv,cd->vd", dlogits, x, preferred_element_type=jnp.float32)
        else:
            dx = jnp.einsum("cv,dv->cd", dlogits, head, preferred_element_type=jnp.float32)
            dh = jnp.einsum("cd,cv->dv", x, dlogits, preferred_element_type=jnp.float32)
        return dhead + dh, dx.astype(x.dtype)

    def skip(dhead, x, targets, w, lse):
        return dhead, jnp.zeros_like(x)

    def body(dhead, xs):
        x, targets, w, lse = xs
        return jax.lax.cond(w.sum() > 0, one, skip, dhead, x, targets, w, lse)

    dhead, dx = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), (x, targets, w, lse))
    return dx, dhead.astype(head.dtype), None, None


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)
