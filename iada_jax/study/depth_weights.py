"""What IADA retrieves: at each boundary and stream, the attention mass its query puts on each
stored depth (H_0 = the embeddings, H_S, H_2S, ...), averaged over heads and samples.

The retrieval (iada.cross_depth_attention) is a softmax over every (depth, token) pair of the
memory; a depth's weight is the sum of the probabilities of its tokens. Recomputed here from the
forward's per-layer states (`keep_hidden`: the states before injection, as the memory stores
them) with the module's own pooling, query projection and key normalisation; a test checks the
weights reproduce the operator's output. Covers the sequence-level, prompt-scope reads (the
paper's D and C); other variants raise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from iada_jax.config import ForwardConfig, IadaConfig, Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.iada import (
    COLLECTION, QueryProjection, mean_pool, rms_normalize, sample_masks, stream_mask, token_masks,
)
from iada_jax.model.qwen3_vl import forward


def check_supported(iada: IadaConfig) -> None:
    if iada.granularity != "sequence" or iada.attend != "sequence" or iada.scope != "prompt" \
            or iada.pooling != "mean" or iada.routing == "cross_modal":
        raise ValueError("depth weights are computed for sequence-level, prompt-scope reads with mean pooling and "
                         f"self-modal or shared routing (the paper's C and D); got {iada}")


def memory_states(hidden: jax.Array, block_size: int, num_layers: int) -> jax.Array:
    """[N + 1, B, T, D]: the embeddings and the state after each block (hidden: [L + 1, ...])."""
    return hidden[jnp.arange(0, num_layers + 1, block_size)]


def stream_depth_probabilities(q: jax.Array, memory: jax.Array, depth_ok: jax.Array, readable: jax.Array,
                               num_heads: int, eps: float) -> jax.Array:
    """q [B, D] one query per sample, memory [N + 1, B, T, D], depth_ok [N + 1], readable [B, T]
    -> probabilities [B, H, N + 1, T] of the softmax over all readable (depth, token) pairs
    (0 everywhere for a sample with nothing to read), as iada.cross_depth_attention takes it."""
    n1, b, t, d = memory.shape
    dh = d // num_heads
    qh = q.reshape(b, num_heads, dh) * dh**-0.5
    k = rms_normalize(memory, eps).reshape(n1, b, t, num_heads, dh)
    s = jnp.einsum("bhd,nbthd->bhnt", qh, k)
    ok = depth_ok[None, None, :, None] & readable[:, None, None, :]
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=(2, 3), keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    z = p.sum(axis=(2, 3), keepdims=True)
    return jnp.where(z > 0, p / jnp.where(z > 0, z, 1.0), 0.0)


def depth_weights(params: dict, adapters: dict, batch: Batch, *, cfg: Qwen3VLConfig, fwd: ForwardConfig,
                  lora, iada: IadaConfig) -> dict[str, np.ndarray]:
    """{stream: [B, N, N + 1]}: for each sample, boundary n (1..N) and depth j, the mass the
    stream's query puts on depth j (columns past n are 0). Samples with no token of a stream
    have zero rows for it. The batch's loss_mask marks the answer (outside the prompt scope)."""
    check_supported(iada)
    t = cfg.text
    _, hidden = forward(params, batch, cfg=cfg, fwd=fwd, keep_hidden=True, lora=lora, iada=iada, adapters=adapters)
    memory = memory_states(hidden.astype(jnp.float32), fwd.block_size, t.num_hidden_layers)
    n_blocks = t.num_hidden_layers // fwd.block_size
    masks = token_masks(batch.input_ids, batch.attention_mask, batch.loss_mask,
                        (cfg.image_token_id, cfg.video_token_id))
    samples = sample_masks(masks)
    tree = adapters[COLLECTION]
    depth = jnp.arange(n_blocks + 1)
    out = {}
    for m in iada.streams:
        readable = stream_mask(masks, m) & masks.prompt
        proj = QueryProjection(iada.stream_query(m), iada.rank, iada.bottleneck, t.hidden_size)
        variables = {COLLECTION: tree["query_shared" if iada.shared_projection else f"query_{m}"]}
        rows = []
        for n in range(1, n_blocks + 1):
            depth_ok = depth <= n if iada.include_current else depth < n
            if not iada.include_embedding:
                depth_ok = depth_ok & (depth >= 1)
            context = mean_pool(memory[n], readable, False, samples, None)[:, 0]  # [B, D]
            q = jnp.broadcast_to(proj.apply(variables, context), context.shape)
            p = stream_depth_probabilities(q, memory, depth_ok, readable, t.num_attention_heads, t.rms_norm_eps)
            rows.append(p.sum(-1).mean(1))  # [B, N + 1]: over tokens, then heads
        out[m] = np.asarray(jnp.stack(rows, axis=1))
    return out
