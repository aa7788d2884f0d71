"""Batched generation with a KV cache, and log-likelihood scoring of answer options.

`generate` runs a jitted prefill over the left-padded prompts that fills the KV cache, then a
jitted `lax.while_loop` of one-token decode steps that stops when every sample has hit a stop
token. The cache starts with room for SEGMENT (1024) new tokens and doubles, up to
max_new_tokens, only while an answer is still going (a host sync per segment): memory and
per-step attention follow the answers' lengths, not the budget.
Positions: the prompt's M-RoPE positions come from `get_rope_index` on the host; generated
tokens are text, so token i of sample b sits at max(prompt positions of b) + 1 + i in all
three components (HF's `rope_deltas`), known before decoding starts.

IADA: under scope="prompt" with one query per sequence and attention over tokens (the paper's
D and most ablations) the prefill stores each boundary's injected vector per stream in the
cache and decode steps add them, exactly what the full forward computes (the prompt is the
prefill; generated tokens are answer tokens). Every other setting (scope "full" or "causal",
token-level queries, depth-only attention) decodes by recomputing the full forward over the
static [B, prompt + max_new_tokens] buffer at every step: correct, and slow (documented).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iada_jax.config import IadaConfig, LoraConfig
from iada_jax.data.batch import Batch
from iada_jax.model.kv_cache import init_cache, iada_caches_vectors
from iada_jax.model.qwen3_vl import forward, forward_cached

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0  # fills the output after a sample stopped
    suppress_token_ids: tuple[int, ...] = ()  # never generated (e.g. image placeholders)
    seed: int = 0


def decode_positions(position_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> np.ndarray:
    """[3, B, steps] positions of the generated tokens: one past the prompt's largest, then +1."""
    pos = np.where(attention_mask[None] > 0, position_ids, -1)
    start = pos.max(axis=(0, 2)) + 1  # [B]
    return np.broadcast_to(start[None, :, None] + np.arange(steps)[None, None, :], (3,) + (len(start), steps)).astype(np.int32)


def _select(logits: Array, key: Array, cfg: GenerationConfig) -> Array:
    """The next token [B] from float32 logits [B, V]: argmax, or temperature / top-k / top-p sampling."""
    if cfg.suppress_token_ids:
        logits = logits.at[:, jnp.asarray(cfg.suppress_token_ids)].set(-jnp.inf)
    if cfg.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < cfg.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _is_stop(tokens: Array, cfg: GenerationConfig) -> Array:
    if not cfg.stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(cfg.stop_token_ids, tokens.dtype))


# The KV cache starts with room for this many new tokens and doubles (up to max_new_tokens)
# only while some answer is still going: a 16384-token budget (MathVista) whose answers end after
# a few hundred tokens neither allocates nor attends over 16384 slots per step.
SEGMENT = 1024


def cache_schedule(max_new_tokens: int, segment: int | None = None) -> list[int]:
    """The new-token room of the cache in each decoding segment: segment (default SEGMENT),
    2 x segment, ..., max_new_tokens (one segment when the budget fits)."""
    sizes, size = [], min(segment or SEGMENT, max_new_tokens)
    while True:
        sizes.append(size)
        if size >= max_new_tokens:
            return sizes
        size = min(2 * size, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model_cfg", "fwd", "lora", "iada", "gen", "room"))
def _prefill(params, adapters, batch: Batch, *, model_cfg, fwd, lora, iada, gen, room):
    """The prompt into a fresh cache with room for `room` new tokens; the first new token."""
    b, t = batch.input_ids.shape
    cache = init_cache(model_cfg, b, t + room, jnp.dtype(fwd.dtype), iada, fwd.block_size)
    logits, cache = forward_cached(params, batch, cache, cfg=model_cfg, fwd=fwd, lora=lora, iada=iada,
                                   adapters=adapters, decode=False)
    logits = logits[:, -1].astype(jnp.float32)
    first = _select(logits, jax.random.fold_in(jax.random.PRNGKey(gen.seed), 0), gen)
    return first, logits, cache


@functools.partial(jax.jit, static_argnames=("length",))
def _grow(cache, *, length):
    """The cache with empty slots appended up to `length` (mask 0: never attended)."""
    extra = length - cache.mask.shape[1]
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])  # noqa: E731
    return dataclasses.replace(cache, k=pad(cache.k, 2), v=pad(cache.v, 2), mask=pad(cache.mask, 1))


@functools.partial(jax.jit, static_argnames=("model_cfg", "fwd", "lora", "iada", "gen", "stop"),
                   donate_argnames=("cache", "tokens", "all_logits"))
def _decode(params, adapters, cache, tokens, all_logits, done, last, i, positions, *, model_cfg, fwd, lora, iada,
            gen, stop):
    """Decode steps i, i + 1, ... < stop (or until every row stopped): step i feeds token i - 1
    and writes token i."""
    b = tokens.shape[0]
    key = jax.random.PRNGKey(gen.seed)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < stop) & ~jnp.all(done)

    def body(state):
        i, cache, tokens, all_logits, done, last = state
        step_batch = Batch(input_ids=last[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                           position_ids=jax.lax.dynamic_slice_in_dim(positions, i - 1, 1, axis=2))
        logits, cache = forward_cached(params, step_batch, cache, cfg=model_cfg, fwd=fwd, lora=lora, iada=iada,
                                       adapters=adapters, decode=True)
        logits = logits[:, -1].astype(jnp.float32)
        token = _select(logits, jax.random.fold_in(key, i), gen)
        token = jnp.where(done, gen.pad_token_id, token)
        tokens = tokens.at[:, i].set(token)
        if all_logits is not None:
            all_logits = all_logits.at[:, i].set(logits)
        return i + 1, cache, tokens, all_logits, done | _is_stop(token, gen), token

    return jax.lax.while_loop(cond, body, (i, cache, tokens, all_logits, done, last))


def _generate_cached(params, adapters, batch: Batch, positions: Array, *, model_cfg, fwd, lora, iada, gen,
                     want_logits):
    """Prefill, then decode segments over a cache that grows (cache_schedule) while rows are
    still going: one host sync per segment (whether every row stopped)."""
    b, t = batch.input_ids.shape
    steps = gen.max_new_tokens
    statics = dict(model_cfg=model_cfg, fwd=fwd, lora=lora, iada=iada, gen=gen)
    schedule = cache_schedule(steps)
    first, first_logits, cache = _prefill(params, adapters, batch, room=schedule[0], **statics)
    tokens = jnp.full((b, steps), gen.pad_token_id, jnp.int32).at[:, 0].set(first)
    all_logits = (jnp.zeros((b, steps, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)
                  if want_logits else None)
    done, last, i = _is_stop(first, gen), first, jnp.asarray(1, jnp.int32)
    for k, room in enumerate(schedule):
        if k > 0:
            if bool(jnp.all(done)):
                break
            cache = _grow(cache, length=t + room)
        # room for `room` new tokens: tokens up to index room - 1 are fed, so steps i < room + 1
        i, cache, tokens, all_logits, done, last = _decode(params, adapters, cache, tokens, all_logits, done, last, i,
                                                           positions, stop=min(steps, room + 1), **statics)
    return tokens, all_logits


@functools.partial(jax.jit, static_argnames=("model_cfg", "fwd", "lora", "iada", "gen", "want_logits"))
def _generate_recompute(params, adapters, batch: Batch, positions: Array, *, model_cfg, fwd, lora, iada, gen,
                        want_logits):
    """Every step a full forward over [B, prompt + max_new]: future slots are right padding (the
    forward is padding invariant) and generated tokens carry loss_mask 1 (they are the answer)."""
    b, t = batch.input_ids.shape
    steps = gen.max_new_tokens
    pad = lambda x: jnp.pad(x, ((0, 0), (0, steps)))  # noqa: E731
    ids, mask = pad(batch.input_ids), pad(batch.attention_mask)
    full_positions = jnp.concatenate([batch.position_ids, positions], axis=2)
    key = jax.random.PRNGKey(gen.seed)
    vocab = model_cfg.text.vocab_size
    all_logits = jnp.zeros((b, steps, vocab), jnp.float32) if want_logits else None

    def cond(state):
        i, _, _, done, _ = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, ids, mask, done, all_logits = state
        loss = (jnp.arange(t + steps) >= t).astype(jnp.int32)[None].repeat(b, 0) * mask
        full = batch.replace(input_ids=ids, attention_mask=mask, position_ids=full_positions, loss_mask=loss)
        logits, _ = forward(params, full, cfg=model_cfg, fwd=fwd, lora=lora, iada=iada, adapters=adapters)
        logits = jax.lax.dynamic_index_in_dim(logits, t + i - 1, axis=1, keepdims=False).astype(jnp.float32)
        token = _select(logits, jax.random.fold_in(key, i), gen)
        token = jnp.where(done, gen.pad_token_id, token)
        ids = ids.at[:, t + i].set(token)
        mask = mask.at[:, t + i].set(jnp.where(done, 0, 1))
        if all_logits is not None:
            all_logits = all_logits.at[:, i].set(logits)
        return i + 1, ids, mask, done | _is_stop(token, gen), all_logits

    state = (jnp.asarray(0, jnp.int32), ids, mask, jnp.zeros((b,), bool), all_logits)
    _, ids, mask, _, all_logits = jax.lax.while_loop(cond, body, state)
    tokens = jnp.where(mask[:, t:] > 0, ids[:, t:], gen.pad_token_id)
    return tokens, all_logits


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             config: GenerationConfig = GenerationConfig(), lora: LoraConfig | None = None,
             iada: IadaConfig | None = None, adapters: dict | None = None, return_logits: bool = False,
             recompute: bool = False):
    """Generate up to `config.max_new_tokens` tokens after each left-padded prompt.

    model: a loaded `Qwen3VL`; adapters: trained LoRA / IADA variables (storage layout) with
    their configs. Returns tokens [B, max_new_tokens] (pad_token_id after a stop token, which is
    kept), and with return_logits the float32 logits of every step [B, max_new_tokens, V].
    recompute: decode by full forwards even where the KV cache applies (a reference; slow).
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    batch = model.make_batch(ids, mask, pixel_values, image_grid_thw)
    return generate_batch(model, batch, config=config, lora=lora, iada=iada, adapters=adapters,
                          return_logits=return_logits, recompute=recompute)


def generate_batch(model, batch: Batch, *, config: GenerationConfig = GenerationConfig(), lora=None, iada=None,
                   adapters=None, return_logits: bool = False, recompute: bool = False):
    """`generate` from a ready left-padded `Batch` (e.g. vision padded to a bucket, so batches
    of different images share one compiled program)."""
    mask = np.asarray(batch.attention_mask)
    if (mask[:, -1] == 0).any():
        raise ValueError("generate needs left-padded prompts (the last position of every row must be a real token)")
    batch = jax.tree.map(jnp.asarray, batch.replace(loss_mask=None))
    positions = decode_positions(np.asarray(batch.position_ids), mask, config.max_new_tokens)
    cached = not recompute and (iada is None or iada_caches_vectors(iada))
    run = _generate_cached if cached else _generate_recompute
    tokens, logits = run(model.params, adapters, batch, jnp.asarray(positions), model_cfg=model.config, fwd=model.fwd,
                         lora=lora, iada=iada, gen=config, want_logits=return_logits)
    tokens = np.asarray(tokens)
    return (tokens, np.asarray(logits)) if return_logits else tokens
