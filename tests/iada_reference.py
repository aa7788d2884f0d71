"""A literal, loop-based float64 reading of docs/IADA_SPEC.md, to check the vectorised
`iada.DepthAggregation` against. Per sample, per stream, per query position: gather the
stream's tokens, concatenate the memory over depth, pool, project, attend, inject.
"""

from __future__ import annotations

import math

import numpy as np


def _rms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _softmax(s):
    s = s - s.max()
    e = np.exp(s)
    return e / e.sum()


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _query(p, kind, cfg, source):
    if kind == "fixed":
        return p["query"]
    if cfg.rank is None:
        return source @ p["kernel"] + p["bias"]
    z = source @ p["down_kernel"] + p["down_bias"]
    if cfg.bottleneck == "gelu":
        z = _gelu(z)
    return z @ p["up_kernel"] + p["up_bias"]


def _pool(params, cfg, stream, h_rows):
    if len(h_rows) == 0:
        return np.zeros(h_rows.shape[-1])
    if cfg.pooling == "attention":
        w = _softmax(h_rows @ params[f"pool_{stream}"])
        return w @ h_rows
    return h_rows.mean(axis=0)


def _attend(q, mem, heads, eps):
    """Projection-free multi-head attention of one query [D] over memory rows [M, D]."""
    if len(mem) == 0:
        return np.zeros_like(q)
    d = q.shape[0]
    dh = d // heads
    k = _rms(mem, eps)
    out = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        p = _softmax(k[:, sl] @ q[sl] / math.sqrt(dh))
        out.append(p @ mem[:, sl])
    return np.concatenate(out)


def reference_boundary(params, cfg, states, n, masks, heads, eps, num_blocks):
    """states: list of the boundary states [B, T, D] H_0, H_S, ..., H_nS (the last is the
    current pre-injection state); n: this boundary (1-based); masks: dict of [B, T] bool
    (valid, visual, prompt). Returns the injected H_nS."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else {kk: np.asarray(vv, np.float64) for kk, vv in v.items()})
         for k, v in params.items()}
    states = [np.asarray(s, np.float64) for s in states]
    h = states[n]
    out = h.copy()
    depths = [d for d in range(n + 1) if (cfg.include_current or d < n) and (cfg.include_embedding or d >= 1)]
    streams = cfg.streams
    B, T, _ = h.shape
    for b in range(B):
        valid, visual, prompt = masks["valid"][b], masks["visual"][b], masks["prompt"][b]
        member = {"all": valid, "visual": visual, "text": valid & ~visual}
        scope = prompt if cfg.scope == "prompt" else valid

        def readable(m, t=None):
            idx = np.flatnonzero(member[m] & scope)
            return idx if t is None else idx[idx <= t]

        for i, m in enumerate(streams):
            proj = p["query_shared"] if cfg.shared_projection else p.get(f"query_{m}")
            kind = cfg.stream_query(m)
            cond = streams[1 - i] if cfg.routing == "cross_modal" else m
            for t in np.flatnonzero(member[m]):
                limit = t if cfg.scope == "causal" else None
                context = _pool(p, cfg, m, h[b, readable(m, limit)])
                if cfg.granularity == "token":
                    source = h[b, t]
                else:
                    source = _pool(p, cfg, cond, h[b, readable(cond, limit)])
                q = _query(proj, kind, cfg, source)
                if cfg.attend == "depth":
                    mem = np.stack([states[d][b, t] for d in depths]) if depths else np.zeros((0, h.shape[-1]))
                else:
                    idx = readable(m, limit)
                    mem = np.concatenate([states[d][b, idx] for d in depths]) if depths else np.zeros((0, h.shape[-1]))
                a = _attend(q, mem, heads, eps)
                if cfg.gate == "global":
                    g = p["gate"][i]
                elif cfg.gate == "per_block":
                    g = p["gate"][n - 1, i]
                else:
                    g = np.tanh(context @ p["gate_kernel"][i] + p["gate_bias"][i])
                out[b, t] = out[b, t] + g * a
    return out
