"""Input-Adaptive Depth Aggregation: the operator at a block boundary, every switch of
docs/IADA_SPEC.md.

At boundary n (after decoder layer n*S) and for each routing stream m:

    memory   M = {H_0, H_S, ..., H_nS} restricted to the stream's readable tokens
    context  c = pool(H_nS over the stream's readable tokens)          float32
    query    q = W_up (W_down c + b_down) + b_up                        (rank r)
    retrieve a = softmax(q . rms(M) / sqrt(d_h)) M, per head, no projections
    inject   H_nS[t] += g * a for every token t of the stream

"Readable" is the scope: `prompt` = the sample's tokens before its first supervised token
(all of them at inference), `full` = every token (leaks the answer), `causal` = prefix of
each position. With packing (several samples in one row, `TokenMasks.segments`) all of it is
per sample: a sample pools its own tokens, its query reads only its own tokens in the memory,
and its result is injected into its own tokens; a row of one sample is the case K = 1. The boundary states are kept in a preallocated buffer [N + 1, B, T, D]
carried by the block scan: entry 0 is H_0, entry n is H_nS before injection.

Memory linear in depth. Differentiating a scan saves what each iteration's backward needs:
a read of the carried buffer would save the buffer at every boundary, N copies of N + 1
states. The buffer is append-only, and a read at boundary n masks every entry past n, so the
final buffer serves every boundary's backward. `read_memory` saves no buffer; its backward
receives the final buffer through the cotangent of a `shadow` carry (threaded through every
read, and handed the final buffer by `attach_memory` after the scan) and recomputes the read
from it. Gradients are unchanged; the stored states are the buffer once (plus its shadow
and its cotangent), not once per boundary.

Parameters live in the `iada` collection and are shared by all boundaries. Streams are
named "visual" and "text" (or "all" for shared routing); a stream's parameters sit under
`query_<stream>`, `pool_<stream>`, `gate`.

Choices the spec fixes as ours: keys are RMS-normalised over the full hidden size (eps of
the backbone, no scale) before the head split; the adaptive gate is tanh(w . c + b) with
w = b = 0 (the spec's sigmoid cannot start at exactly 0, and identity at init is required).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from iada_jax.config import IadaConfig

Array = jax.Array

COLLECTION = "iada"


@dataclasses.dataclass(frozen=True)
class TokenMasks:
    """Per-token masks IADA reads, [B, T] bool each (built once per forward)."""

    valid: Array  # real token (not padding)
    visual: Array  # image/video placeholder position (valid only)
    prompt: Array  # valid and before its sample's first supervised token
    segments: Array | None = None  # [B, T, K] bool: token t belongs to packed sample k; None: one per row


jax.tree_util.register_dataclass(TokenMasks, data_fields=["valid", "visual", "prompt", "segments"], meta_fields=[])


def token_masks(input_ids: Array, attention_mask: Array, loss_mask: Array | None, visual_ids: tuple[int, ...],
                segment_ids: Array | None = None, num_segments: int = 0) -> TokenMasks:
    """The masks from the batch: visual = placeholder ids; prompt = before the sample's first
    loss_mask 1 (every valid token when loss_mask is None, as at inference: the prefill is the
    prompt). segment_ids [B, T] (0 padding, k >= 1 the k-th packed sample) with num_segments K
    slots per row: the masks of packed rows."""
    valid = attention_mask > 0
    visual = valid & jnp.isin(input_ids, jnp.asarray(visual_ids, input_ids.dtype))
    segments = None
    if segment_ids is not None:
        segments = (segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)) & valid[..., None]
    if loss_mask is None:
        prompt = valid
    elif segments is None:
        prompt = valid & (jnp.cumsum(loss_mask > 0, axis=1) == 0)
    else:  # supervised tokens before t within t's own sample: the row's count minus the count at its start
        supervised = ((loss_mask > 0) & valid).astype(jnp.int32)
        count = jnp.cumsum(supervised, axis=1)
        before = count - supervised
        at_start = jnp.min(jnp.where(segments, before[..., None], jnp.iinfo(jnp.int32).max), axis=1)  # [B, K]
        base = jnp.sum(jnp.where(segments, at_start[:, None, :], 0), axis=-1)
        prompt = valid & (count - base == 0)
    return TokenMasks(valid=valid, visual=visual, prompt=prompt, segments=segments)


def sample_masks(masks: TokenMasks) -> Array:
    """[B, T, K] bool: which sample of its row each valid token belongs to (K = 1 unpacked)."""
    return masks.valid[..., None] if masks.segments is None else masks.segments


def same_sample(masks: TokenMasks) -> Array | None:
    """[B, T, T] bool: tokens q and t belong to the same sample; None unpacked (all of them)."""
    if masks.segments is None:
        return None
    ids = jnp.argmax(masks.segments, axis=-1)
    return ids[:, :, None] == ids[:, None, :]


def sample_starts(masks: TokenMasks) -> Array:
    """[B, T] bool: the first token of each sample (the first valid token, unpacked)."""
    seg = sample_masks(masks)
    first = seg & ~jnp.pad(seg, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return first.any(-1)


def stream_mask(masks: TokenMasks, stream: str) -> Array:
    """The tokens a stream injects into (all of its tokens, answer included)."""
    if stream == "all":
        return masks.valid
    if stream == "visual":
        return masks.visual
    return masks.valid & ~masks.visual


def rms_normalize(x: Array, eps: float) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


# ----------------------------------------------------------------------------- pooling


def _reset_add(a, b):
    """Prefix sums that restart where a sample starts (an associative scan's operator)."""
    (f1, x1), (f2, x2) = a, b
    return f1 | f2, jnp.where(f2, x2, x1 + x2)


def mean_pool(h: Array, mask: Array, causal: bool, samples: Array, starts: Array) -> Array:
    """Masked mean of h [B, T, D] (float32) over mask [B, T] within each sample (samples
    [B, T, K]) -> [B, K, D]; causal: prefix means [B, T, D] over the tokens <= t of t's own
    sample (starts [B, T]: a sample's first token). An empty set gives 0."""
    w = mask.astype(jnp.float32)
    if causal:
        flags = starts[..., None]
        _, total = jax.lax.associative_scan(_reset_add, (flags, h * w[..., None]), axis=1)
        _, count = jax.lax.associative_scan(_reset_add, (flags, w[..., None]), axis=1)
    else:
        sw = samples.astype(jnp.float32) * w[..., None]
        total = jnp.einsum("btd,btk->bkd", h, sw)
        count = sw.sum(axis=1)[..., None]
    return total / jnp.maximum(count, 1.0)


def _finite_or_zero(m: Array) -> Array:
    """A softmax shift: the running max, or 0 where nothing was seen yet (max = -inf). The
    shift cancels in the result, so it carries no gradient."""
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


def safe_softmax(s: Array, mask: Array, axis: int) -> Array:
    """Softmax over the masked entries of `axis`; all-masked rows give 0, with no NaN in the
    forward or the backward (masked logits become -inf, whose exp and its derivative are 0)."""
    s = jnp.where(mask, s, -jnp.inf)
    e = jnp.exp(s - _finite_or_zero(jnp.max(s, axis=axis, keepdims=True)))
    total = e.sum(axis=axis, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def _softmax_monoid(a, b):
    """Combine two (max, normaliser, weighted sum) partial softmaxes (online softmax). The
    maxes carry no gradient: the normalisers and sums hold it (exp(s - max) at the leaves)."""
    m1, l1, v1 = a
    m2, l2, v2 = b
    m = jnp.maximum(m1, m2)
    m_safe = _finite_or_zero(m)
    c1, c2 = jnp.exp(m1 - m_safe), jnp.exp(m2 - m_safe)
    return m, l1 * c1 + l2 * c2, v1 * c1[..., None] + v2 * c2[..., None]


def _reset_softmax(a, b):
    """`_softmax_monoid` restarting where a sample starts."""
    (f1, *x1), (f2, *x2) = a, b
    merged = _softmax_monoid(tuple(x1), tuple(x2))
    keep = lambda new, old: jnp.where(f2.reshape(f2.shape + (1,) * (new.ndim - f2.ndim)), old, new)  # noqa: E731
    return (f1 | f2,) + tuple(keep(n, o) for n, o in zip(merged, x2))


def attention_pool(h: Array, mask: Array, u: Array, causal: bool, samples: Array, starts: Array) -> Array:
    """sum_t softmax_t(u . h_t) h_t over mask (float32) within each sample -> [B, K, D];
    causal: over the tokens <= t of t's sample [B, T, D], computed with an associative scan so
    a later token never touches an earlier result."""
    s = jnp.einsum("btd,d->bt", h, u)
    if causal:
        # Each position starts as a one-token softmax: max s_t (no gradient), weight
        # exp(s_t - max) = 1 (which carries the gradient in s_t), value weight * h_t.
        m = jax.lax.stop_gradient(jnp.where(mask, s, -jnp.inf))
        l = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - _finite_or_zero(m)), 0.0)
        v = l[..., None] * h
        _, m, l, v = jax.lax.associative_scan(_reset_softmax, (starts, m, l, v), axis=1)
        return v / jnp.where(l > 0, l, 1.0)[..., None]
    within = jnp.moveaxis(samples, 2, 1) & mask[:, None, :]  # [B, K, T]
    p = safe_softmax(jnp.broadcast_to(s[:, None, :], within.shape), within, axis=2)
    return jnp.einsum("bkt,btd->bkd", p, h)


# ----------------------------------------------------------------------------- retrieval


def cross_depth_attention(q: Array, buffer: Array, depth_ok: Array, allowed: Array, num_heads: int,
                          eps: float) -> Array:
    """Multi-head attention of queries q [B, Tq, D] over every (depth, token) of the memory.

    buffer [N+1, B, T, D]; depth_ok [N+1] bool; allowed [B, Tq, T] bool: the tokens query i
    may read (its sample's readable tokens; the prefix of its position under the causal
    scope). Softmax over all allowed (depth, token) pairs, in float32, accumulated online one
    depth at a time (memory O(B H Tq T), not O(N B H Tq T)).
    Returns [B, Tq, D] float32, 0 for a query with nothing to read.
    """
    b, tq, d = q.shape
    t = buffer.shape[2]
    dh = d // num_heads
    qh = q.reshape(b, tq, num_heads, dh) * (dh**-0.5)
    allowed = allowed[:, None]  # [B, 1, Tq, T]

    @jax.checkpoint  # keep per-depth float32 keys and logits out of the backward's residuals
    def step(carry, xs):
        m, l, acc = carry
        state, ok = xs
        k = rms_normalize(state, eps).reshape(b, t, num_heads, dh)
        v = state.astype(jnp.float32).reshape(b, t, num_heads, dh)
        mask = allowed & ok
        s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", qh, k), -jnp.inf)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))  # a shift: no gradient
        m_safe = _finite_or_zero(m_new)
        p = jnp.exp(s - m_safe[..., None])  # masked: exp(-inf) = 0
        corr = jnp.exp(m - m_safe)  # 0 while m is still -inf
        l = l * corr + p.sum(axis=-1)
        acc = acc * jnp.moveaxis(corr, 1, 2)[..., None] + jnp.einsum("bhqk,bkhd->bqhd", p, v)
        return (m_new, l, acc), None

    init = (
        jnp.full((b, num_heads, tq), -jnp.inf, jnp.float32),
        jnp.zeros((b, num_heads, tq), jnp.float32),
        jnp.zeros((b, tq, num_heads, dh), jnp.float32),
    )
    (_, l, acc), _ = jax.lax.scan(step, init, (buffer, depth_ok))
    l = jnp.moveaxis(l, 1, 2)[..., None]  # [B, Tq, H, 1]
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
    return out.reshape(b, tq, d)


def depth_only_attention(q: Array, buffer: Array, depth_ok: Array, num_heads: int, eps: float) -> Array:
    """attend="depth" (Kimi's Attention Residuals): token t attends to its own states at the
    boundaries only. q [B, 1 or T, D] -> [B, T, D] float32."""
    n1, b, t, d = buffer.shape
    dh = d // num_heads
    qh = jnp.broadcast_to(q, (b, t, d)).reshape(b, t, num_heads, dh) * (dh**-0.5)
    k = rms_normalize(buffer, eps).reshape(n1, b, t, num_heads, dh)
    s = jnp.einsum("bthd,nbthd->bthn", qh, k)
    p = safe_softmax(s, depth_ok, axis=-1)
    v = buffer.astype(jnp.float32).reshape(n1, b, t, num_heads, dh)
    return jnp.einsum("bthn,nbthd->bthd", p, v).reshape(b, t, d)


# ----------------------------------------------------------------------------- linear-memory reads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def read_memory(read, q: Array, buffer: Array, shadow: Array, aux: tuple) -> tuple[Array, Array]:
    """read(q, buffer, *aux) with a backward that saves no buffer: (output, shadow).

    `read` must ignore the buffer entries past the current boundary (they are masked), so that
    the final buffer, which the backward receives as the cotangent of `shadow`, gives the same
    result. `aux` holds non-differentiable arrays (masks)."""
    return read(q, buffer, *aux), shadow


def _read_memory_fwd(read, q, buffer, shadow, aux):
    return (read(q, buffer, *aux), shadow), (q, aux)


def _read_memory_bwd(read, residuals, cotangents):
    q, aux = residuals
    g_out, final_buffer = cotangents  # the shadow's cotangent is the final buffer (attach_memory)
    _, vjp = jax.vjp(lambda q, buffer: read(q, buffer, *aux), q, final_buffer)
    g_q, g_buffer = vjp(g_out)
    return g_q, g_buffer, final_buffer, jax.tree.map(lambda _: None, aux)


read_memory.defvjp(_read_memory_fwd, _read_memory_bwd)


@jax.custom_vjp
def attach_memory(h: Array, shadow: Array, buffer: Array) -> Array:
    """Identity on h; its backward hands the final buffer to the shadow carry (read_memory)."""
    return h


def _attach_memory_fwd(h, shadow, buffer):
    return h, buffer


def _attach_memory_bwd(buffer, g):
    return g, buffer, None


attach_memory.defvjp(_attach_memory_fwd, _attach_memory_bwd)


# ----------------------------------------------------------------------------- modules


def _iada_var(module: nn.Module, name: str, init):
    """A variable in the `iada` collection; `init(key)` runs only when it is created.

    Its key comes from the "iada" rng stream, which the block scan does not split: the
    variables are broadcast to every boundary, so their init must not depend on the loop."""
    return module.variable(COLLECTION, name, lambda: init(module.make_rng(COLLECTION))).value


class QueryProjection(nn.Module):
    """The query of one stream: adaptive (low-rank or full-rank map of its source) or fixed.

    Init: W_down ~ N(0, 1/d), W_up = 0, biases 0, fixed query 0; so q = 0 at step 0.
    """

    kind: str  # "adaptive" | "fixed"
    rank: int | None
    bottleneck: str
    features: int

    @nn.compact
    def __call__(self, source: Array) -> Array:
        d = self.features
        zeros = lambda shape: (lambda key: jnp.zeros(shape, jnp.float32))  # noqa: E731
        if self.kind == "fixed":
            return _iada_var(self, "query", zeros((d,)))
        if self.rank is None:
            w, bias = _iada_var(self, "kernel", zeros((d, d))), _iada_var(self, "bias", zeros((d,)))
            return source @ w + bias
        down = _iada_var(self, "down_kernel", lambda key: jax.random.normal(key, (d, self.rank), jnp.float32) / np.sqrt(d))
        z = source @ down + _iada_var(self, "down_bias", zeros((self.rank,)))
        if self.bottleneck == "gelu":
            z = nn.gelu(z, approximate=False)
        return z @ _iada_var(self, "up_kernel", zeros((self.rank, d))) + _iada_var(self, "up_bias", zeros((d,)))


class DepthAggregation(nn.Module):
    """IADA at one block boundary. (h [B, T, D], buffer [N+1, B, T, D], n) -> (h', buffer').

    `block_index` is 0-based, so this boundary's buffer entry is block_index + 1. Parameters
    are broadcast by the block scan: one set for all boundaries (per-block gates aside).
    With `shadow` (the block scan passes it) the reads save no buffer for the backward
    (`read_memory`) and the result is (h', buffer', shadow').
    """

    cfg: IadaConfig
    hidden_size: int
    num_heads: int
    num_blocks: int
    eps: float = 1e-6
    return_vectors: bool = False  # also return each stream's injected vector g * a [M, B, D] (decode cache)

    @nn.compact
    def __call__(self, h: Array, buffer: Array, block_index: Array, masks: TokenMasks, shadow: Array | None = None):
        c, d = self.cfg, self.hidden_size
        entry = block_index + 1
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, h.astype(buffer.dtype), entry, axis=0)
        depth = jnp.arange(self.num_blocks + 1)
        depth_ok = (depth <= entry) if c.include_current else (depth < entry)
        if not c.include_embedding:
            depth_ok = depth_ok & (depth >= 1)

        causal = c.scope == "causal"
        scope = masks.prompt if c.scope == "prompt" else masks.valid
        streams = c.streams
        inject = {m: stream_mask(masks, m) for m in streams}
        readable = {m: inject[m] & scope for m in streams}
        samples = sample_masks(masks)  # [B, T, K]
        starts = sample_starts(masks) if causal else None
        per_token = causal or c.granularity == "token"  # queries per position, else one per sample
        same = same_sample(masks) if per_token and c.attend != "depth" else None

        h32 = h.astype(jnp.float32)
        contexts = {}  # [B, K, D] per sample, or [B, T, D] per position (causal)
        for m in streams:
            if c.pooling == "attention":
                u = _iada_var(self, f"pool_{m}", lambda key: jnp.zeros((d,), jnp.float32))
                contexts[m] = attention_pool(h32, readable[m], u, causal, samples, starts)
            else:
                contexts[m] = mean_pool(h32, readable[m], causal, samples, starts)

        gates = self._gates(contexts, block_index)
        shared = None
        if c.shared_projection:
            shared = QueryProjection("adaptive", c.rank, c.bottleneck, d, name="query_shared")
        delta = jnp.zeros_like(h32)
        vectors = []
        to_tokens = lambda x: jnp.einsum("bkd,btk->btd", x, samples.astype(jnp.float32))  # noqa: E731
        for i, m in enumerate(streams):
            kind = c.stream_query(m)
            proj = shared or QueryProjection(kind, c.rank, c.bottleneck, d, name=f"query_{m}")
            if c.granularity == "token":
                source = h32  # [B, T, D]: each token's own state
            elif c.routing == "cross_modal":
                source = contexts[streams[1 - i]]
            else:
                source = contexts[m]
            q = proj(source)  # [D] (fixed), [B, K, D] per sample or [B, T, D] per position
            if q.ndim == 1:
                q = jnp.broadcast_to(q, (h.shape[0], h.shape[1] if per_token else samples.shape[2], d))
            if c.attend == "depth":
                if not per_token:
                    q = to_tokens(q)  # each token reads its own states with its sample's query
                read = functools.partial(depth_only_attention, num_heads=self.num_heads, eps=self.eps)
                aux = (depth_ok,)
            else:
                if per_token:  # position i reads its sample's readable tokens (<= i when causal)
                    allowed = readable[m][:, None, :] if same is None else same & readable[m][:, None, :]
                    if causal:
                        allowed = allowed & jnp.tril(jnp.ones((h.shape[1],) * 2, bool))[None]
                else:  # sample k reads its readable tokens
                    allowed = jnp.moveaxis(samples, 2, 1) & readable[m][:, None, :]
                read = functools.partial(cross_depth_attention, num_heads=self.num_heads, eps=self.eps)
                aux = (depth_ok, allowed)
            if shadow is None:
                a = read(q, buffer, *aux)
            else:  # the streams' reads are chained on the shadow: each receives the final buffer
                a, shadow = read_memory(read, q, buffer, shadow, aux)
            g = gates[i]  # a scalar, [B, K] per sample, or [B, T] per position (causal)
            if not per_token and c.attend != "depth":  # one vector per sample: a [B, K, D]
                ga = (g[..., None] if g.ndim else g) * a
                if self.return_vectors:
                    if ga.shape[1] != 1:
                        raise ValueError("return_vectors needs one sample per row")
                    vectors.append(ga[:, 0])
                ga = to_tokens(ga)  # each token gets its own sample's
            else:  # one vector per token: a [B, T, D]
                if self.return_vectors:
                    raise ValueError("return_vectors needs one injected vector per sequence (prompt scope, "
                                     "sequence granularity, attention over tokens)")
                if g.ndim and g.shape[1] != a.shape[1]:  # a sample's gate, to its tokens
                    g = jnp.einsum("bk,btk->bt", g, samples.astype(jnp.float32))
                ga = (g[..., None] if g.ndim else g) * a
            delta = delta + jnp.where(inject[m][..., None], ga, 0.0)
        out = (h + delta.astype(h.dtype), buffer) + (() if shadow is None else (shadow,))
        return out + (jnp.stack(vectors),) if self.return_vectors else out

    def _gates(self, contexts: dict, block_index: Array) -> list[Array]:
        """One gate per stream: a scalar, this boundary's scalar, or tanh(w . c + b) per sample
        [B, K] (per position [B, T] under the causal scope). All start at exactly 0."""
        c = self.cfg
        streams = c.streams
        zeros = lambda shape: (lambda key: jnp.zeros(shape, jnp.float32))  # noqa: E731
        if c.gate == "global":
            g = _iada_var(self, "gate", zeros((len(streams),)))
            return [g[i] for i in range(len(streams))]
        if c.gate == "per_block":
            g = _iada_var(self, "gate", zeros((self.num_blocks, len(streams))))[block_index]
            return [g[i] for i in range(len(streams))]
        w = _iada_var(self, "gate_kernel", zeros((len(streams), self.hidden_size)))
        bias = _iada_var(self, "gate_bias", zeros((len(streams),)))
        return [jnp.tanh(contexts[m] @ w[i] + bias[i]) for i, m in enumerate(streams)]


def init_iada_variables(key: Array, cfg: IadaConfig, hidden_size: int, num_heads: int, num_layers: int,
                        eps: float = 1e-6) -> dict:
    """Fresh IADA variables (the `iada` collection, shared by all boundaries): the operator
    alone is initialised on a 2-token input, so no decoder layer is traced for it."""
    num_blocks = num_layers // cfg.block_size
    module = DepthAggregation(cfg, hidden_size, num_heads, num_blocks, eps)
    h = jnp.zeros((1, 2, hidden_size), jnp.float32)
    buffer = jnp.zeros((num_blocks + 1, 1, 2, hidden_size), jnp.float32)
    every = jnp.ones((1, 2), bool)
    masks = TokenMasks(valid=every, visual=jnp.asarray([[True, False]]), prompt=every)
    _, new = module.apply({}, h, buffer, jnp.zeros((), jnp.int32), masks, rngs={COLLECTION: key},
                          mutable=[COLLECTION])
    return new[COLLECTION]
