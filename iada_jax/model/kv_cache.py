"""The decoding cache: keys and values of every layer, which slots hold tokens, and IADA's
per-boundary vectors computed at prefill.

Layout [L, B, S, Hkv, hd] (stacked like the layers; the block scan reshapes it to
[N, S_layers, ...] as it does the parameters). S = prompt + max_new_tokens, static. A forward
over T new tokens writes slots index .. index + T - 1; query t attends to the filled slots
s <= index + t (left padding: slots whose `mask` is 0 are never read).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from iada_jax.config import IadaConfig, Qwen3VLConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KVCache:
    k: Array  # [L, B, S, Hkv, hd]
    v: Array  # [L, B, S, Hkv, hd]
    mask: Array  # [B, S] int32: 1 where a real token is stored
    index: Array  # [] int32: the slot the next token goes to
    iada: Array | None = None  # [N, M, B, D] float32: boundary n's injected vector for stream m


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "mask", "index", "iada"], meta_fields=[])


def iada_caches_vectors(iada: IadaConfig) -> bool:
    """Whether decode steps can add vectors computed once at prefill: nothing in the injection
    depends on the new token (prompt scope, one query per sequence, attention over tokens)."""
    return iada.scope == "prompt" and iada.granularity == "sequence" and iada.attend == "sequence"


def init_cache(cfg: Qwen3VLConfig, batch: int, length: int, dtype, iada: IadaConfig | None = None,
               block_size: int = 1) -> KVCache:
    t = cfg.text
    shape = (t.num_hidden_layers, batch, length, t.num_key_value_heads, t.head_dim)
    vectors = None
    if iada is not None:
        if not iada_caches_vectors(iada):
            raise ValueError(f"IADA scope={iada.scope!r}, granularity={iada.granularity!r}, attend={iada.attend!r} "
                             "cannot be decoded from cached vectors; recompute the full forward per step")
        vectors = jnp.zeros((t.num_hidden_layers // block_size, len(iada.streams), batch, t.hidden_size), jnp.float32)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32), iada=vectors)
