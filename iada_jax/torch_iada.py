"""IADA in PyTorch: the mirror of iada_jax/iada.py, attached to a `transformers` Qwen3-VL model.

For adapters exported with `python -m convert export-peft` or `export-merged` (the folder
holds iada_config.json, iada.safetensors and a copy of this file). Needs torch and
safetensors only, no JAX:

    import sys, torch
    from transformers import Qwen3VLForConditionalGeneration
    from peft import PeftModel
    sys.path.insert(0, OUT_DIR)
    from torch_iada import attach_iada

    model = Qwen3VLForConditionalGeneration.from_pretrained(BASE, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, OUT_DIR)        # LoRA (export-peft)
    iada = attach_iada(model, OUT_DIR)                      # IADA at the block boundaries
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=64)    # KV cache: see "Generation"
    iada.detach()                                           # back to the plain model

How it attaches: forward pre-hooks. The input of decoder layer nS (n = 1..N-1) and of the
final norm is H_nS, the output of layer nS after its DeepStack addition (HF adds DeepStack
in the model's layer loop, after the layer), so a hook there sees exactly the state the JAX
block scan sees at boundary n, and returns it with IADA injected. The input of layer 0 is
H_0 (the embeddings with the visual features scattered in). A pre-hook on the
`Qwen3VLForConditionalGeneration` reads input_ids (the visual stream), attention_mask
(padding) and labels (the prompt: every token before the first label != -100; without
labels every token is prompt, as at inference).

Generation (`generate`, or a manual loop passing past_key_values): the first forward is the
prefill; later forwards see only the new tokens, which are answer tokens of the text stream.
- scope="prompt": the memory and context are the prompt's, so each boundary's injected
  vector per stream is computed at prefill and cached; decode steps add the cached vectors
  (for token-level queries or depth-only attention, the prompt's boundary states are cached
  instead and each new token's query reads them).
- scope="causal": every boundary state is cached, and a new token reads its own prefix.
- scope="full": a new token would change every earlier state (the answer leaks into the
  prompt), so a KV cache is invalid: decoding with a cache raises; use
  generate(..., use_cache=False), which recomputes the whole sequence per token.
Beam search reorders the KV cache but not these caches: use greedy or sampling.

All arithmetic is float32 (as in JAX); the injection is cast to the hidden states' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "iada-jax-iada"
VERSION = 1
CONFIG_FILE = "iada_config.json"
WEIGHTS_FILE = "iada.safetensors"

CHOICES = {  # mirrors iada_jax.config.IADA_CHOICES
    "query": ("adaptive", "fixed"),
    "routing": ("self_modal", "shared", "cross_modal", "text_only_adaptive", "vision_only_adaptive"),
    "bottleneck": ("linear", "gelu"),
    "pooling": ("mean", "attention"),
    "granularity": ("sequence", "token"),
    "gate": ("global", "per_block", "adaptive"),
    "attend": ("sequence", "depth"),
    "scope": ("prompt", "full", "causal"),
}


@dataclasses.dataclass(frozen=True)
class IadaSettings:
    """The IADA switches (iada_jax.config.IadaConfig) and what the operator needs of the base.

    A copy of IadaConfig's fields, not an import: this file must stand alone in an export
    folder. tests/test_torch_iada.py keeps the two (and CHOICES) in step."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    rms_norm_eps: float
    image_token_id: int
    video_token_id: int
    query: str = "adaptive"
    routing: str = "self_modal"
    shared_projection: bool = False
    rank: int | None = 16
    bottleneck: str = "linear"
    pooling: str = "mean"
    granularity: str = "sequence"
    gate: str = "global"
    attend: str = "sequence"
    scope: str = "prompt"
    include_embedding: bool = True
    include_current: bool = True
    block_size: int = 4

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"IADA {name}={getattr(self, name)!r}; choose one of {list(choices)}")
        if self.num_hidden_layers % self.block_size:
            raise ValueError(f"block_size={self.block_size} does not divide {self.num_hidden_layers} layers")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @classmethod
    def from_json(cls, path: str) -> "IadaSettings":
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{path}: describes {data.get('format')} v{data.get('version')}, this module reads "
                             f"{FORMAT} v{VERSION}")
        try:
            return cls(**data["model"], **data["iada"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: incomplete or unknown IADA settings ({e})") from None

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // self.block_size

    @property
    def streams(self) -> tuple[str, ...]:
        return ("all",) if self.routing == "shared" else ("visual", "text")

    def stream_query(self, stream: str) -> str:
        if self.routing == "text_only_adaptive":
            return "adaptive" if stream == "text" else "fixed"
        if self.routing == "vision_only_adaptive":
            return "adaptive" if stream == "visual" else "fixed"
        return self.query

    @property
    def caches_vectors(self) -> bool:
        """Decode steps can reuse per-stream vectors computed at prefill (nothing depends on the
        new token): prompt scope, one query per sequence, attention over tokens."""
        return self.scope == "prompt" and self.granularity == "sequence" and self.attend == "sequence"


# ----------------------------------------------------------------------------- the operator


def stream_mask(masks: dict, stream: str) -> torch.Tensor:
    """The tokens a stream injects into; masks hold valid / visual / prompt, [B, T] bool."""
    if stream == "all":
        return masks["valid"]
    if stream == "visual":
        return masks["visual"]
    return masks["valid"] & ~masks["visual"]


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def safe_softmax(s: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the masked entries; rows with none give 0 (mirrors iada.safe_softmax)."""
    s = torch.where(mask, s, float("-inf"))
    m = s.amax(dim=dim, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def mean_pool(h: torch.Tensor, mask: torch.Tensor, q_index: torch.Tensor | None) -> torch.Tensor:
    """Masked mean of h [B, T, D] over mask [B, T] -> [B, D]; with q_index [Tq] (causal) the
    prefix means at those positions, [B, Tq, D]. An empty set gives 0."""
    w = mask.float()
    if q_index is None:
        return torch.einsum("btd,bt->bd", h, w) / w.sum(1, keepdim=True).clamp_min(1.0)
    total = torch.cumsum(h * w[..., None], dim=1)[:, q_index]
    count = torch.cumsum(w, dim=1)[:, q_index, None]
    return total / count.clamp_min(1.0)


def attention_pool(h: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, q_index: torch.Tensor | None) -> torch.Tensor:
    """sum_t softmax_t(u . h_t) h_t over mask; with q_index, over tokens <= each position."""
    s = torch.einsum("btd,d->bt", h, u)
    if q_index is None:
        return torch.einsum("bt,btd->bd", safe_softmax(s, mask, dim=1), h)
    t = h.shape[1]
    allowed = mask[:, None, :] & (torch.arange(t, device=h.device)[None, :] <= q_index[:, None])[None]
    p = safe_softmax(s[:, None, :].expand(-1, len(q_index), -1), allowed, dim=-1)
    return torch.einsum("bqt,btd->bqd", p, h)


def cross_depth_attention(q: torch.Tensor, memory: list[torch.Tensor], readable: torch.Tensor,
                          q_index: torch.Tensor | None, num_heads: int, eps: float) -> torch.Tensor:
    """Projection-free multi-head attention of q [B, Tq, D] over every (depth, token) of the
    memory (a list of [B, T, D] states, the readable depths), keys RMS-normalised; q_index:
    query positions for a causal mask (None: no mask). Online softmax over the depths, float32.
    Returns [B, Tq, D]; 0 where nothing is readable."""
    b, tq, d = q.shape
    dh = d // num_heads
    qh = q.reshape(b, tq, num_heads, dh) * dh**-0.5
    t = readable.shape[1]
    allowed = readable[:, None, None, :]
    if q_index is not None:
        allowed = allowed & (torch.arange(t, device=q.device)[None, :] <= q_index[:, None])[None, None]
    m = torch.full((b, num_heads, tq), float("-inf"), device=q.device)
    l = torch.zeros((b, num_heads, tq), device=q.device)
    acc = torch.zeros((b, tq, num_heads, dh), device=q.device)
    for state in memory:
        k = rms_normalize(state, eps).reshape(b, t, num_heads, dh)
        v = state.float().reshape(b, t, num_heads, dh)
        s = torch.where(allowed, torch.einsum("bqhd,bkhd->bhqk", qh, k), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_safe[..., None])
        corr = torch.exp(m - m_safe)
        l = l * corr + p.sum(-1)
        acc = acc * corr.permute(0, 2, 1)[..., None] + torch.einsum("bhqk,bkhd->bqhd", p, v)
        m = m_new
    l = l.permute(0, 2, 1)[..., None]
    out = torch.where(l > 0, acc / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(acc))
    return out.reshape(b, tq, d)


def depth_only_attention(q: torch.Tensor, own_states: list[torch.Tensor], num_heads: int, eps: float) -> torch.Tensor:
    """attend="depth": each token attends to its own states at the readable depths only.
    q [B, 1 or Tq, D]; own_states: [B, Tq, D] per depth (at least one). Returns [B, Tq, D]."""
    b, tq, d = own_states[0].shape
    dh = d // num_heads
    qh = q.expand(b, tq, d).reshape(b, tq, num_heads, dh) * dh**-0.5
    k = torch.stack([rms_normalize(s, eps) for s in own_states]).reshape(-1, b, tq, num_heads, dh)
    v = torch.stack([s.float() for s in own_states]).reshape(-1, b, tq, num_heads, dh)
    p = torch.softmax(torch.einsum("bthd,nbthd->bthn", qh, k), dim=-1)
    return torch.einsum("bthn,nbthd->bthd", p, v).reshape(b, tq, d)


class QueryProjection(nn.Module):
    """Mirrors iada.QueryProjection (same parameter names and [in, out] layout)."""

    def __init__(self, kind: str, rank: int | None, bottleneck: str, features: int):
        super().__init__()
        self.kind, self.rank, self.bottleneck = kind, rank, bottleneck
        d = features
        if kind == "fixed":
            self.query = nn.Parameter(torch.zeros(d))
        elif rank is None:
            self.kernel = nn.Parameter(torch.zeros(d, d))
            self.bias = nn.Parameter(torch.zeros(d))
        else:
            self.down_kernel = nn.Parameter(torch.zeros(d, rank))
            self.down_bias = nn.Parameter(torch.zeros(rank))
            self.up_kernel = nn.Parameter(torch.zeros(rank, d))
            self.up_bias = nn.Parameter(torch.zeros(d))

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        if self.kind == "fixed":
            return self.query
        if self.rank is None:
            return source @ self.kernel + self.bias
        z = source @ self.down_kernel + self.down_bias
        if self.bottleneck == "gelu":
            z = F.gelu(z)  # exact (erf), as flax nn.gelu(approximate=False)
        return z @ self.up_kernel + self.up_bias


class DepthAggregation(nn.Module):
    """The IADA parameters (state_dict names = the flattened JAX `iada` collection) and the
    operator at one boundary."""

    def __init__(self, settings: IadaSettings):
        super().__init__()
        s = self.settings = settings
        d, streams = s.hidden_size, s.streams
        if s.shared_projection:
            self.query_shared = QueryProjection("adaptive", s.rank, s.bottleneck, d)
        else:
            for m in streams:
                self.add_module(f"query_{m}", QueryProjection(s.stream_query(m), s.rank, s.bottleneck, d))
        if s.pooling == "attention":
            for m in streams:
                self.register_parameter(f"pool_{m}", nn.Parameter(torch.zeros(d)))
        if s.gate == "global":
            self.gate = nn.Parameter(torch.zeros(len(streams)))
        elif s.gate == "per_block":
            self.gate = nn.Parameter(torch.zeros(s.num_blocks, len(streams)))
        else:
            self.gate_kernel = nn.Parameter(torch.zeros(len(streams), d))
            self.gate_bias = nn.Parameter(torch.zeros(len(streams)))

    def boundary(self, block_index: int, states: list[torch.Tensor], masks: dict, q_index: torch.Tensor):
        """The injection at boundary block_index + 1 for the tokens at positions q_index.

        states: H_0, H_S, ..., H_nS (pre-injection), each [B, T, D] over every position so far;
        masks: valid / visual / prompt [B, T] over the same positions. Returns (delta [B, Tq, D]
        float32, {stream: g * a [B, D]} when the injection is one vector per stream, else None).
        """
        s = self.settings
        entry = block_index + 1
        depths = [i for i in range(entry + 1)
                  if (i < entry or s.include_current) and (i >= 1 or s.include_embedding)]
        memory = [states[i] for i in depths]
        causal = s.scope == "causal"
        scope = masks["prompt"] if s.scope == "prompt" else masks["valid"]
        streams = s.streams
        inject = {m: stream_mask(masks, m) for m in streams}
        readable = {m: inject[m] & scope for m in streams}
        h32 = states[entry].float()
        pool_at = q_index if causal else None
        contexts = {}
        for m in streams:
            if s.pooling == "attention":
                contexts[m] = attention_pool(h32, readable[m], getattr(self, f"pool_{m}"), pool_at)
            else:
                contexts[m] = mean_pool(h32, readable[m], pool_at)
        gates = self._gates(contexts, block_index)
        b, tq = h32.shape[0], len(q_index)
        delta = torch.zeros((b, tq, s.hidden_size), device=h32.device)
        vectors = {} if s.caches_vectors else None
        for i, m in enumerate(streams):
            proj = self.query_shared if s.shared_projection else getattr(self, f"query_{m}")
            if s.granularity == "token":
                source = h32[:, q_index]
            elif s.routing == "cross_modal":
                source = contexts[streams[1 - i]]
            else:
                source = contexts[m]
            q = proj(source)
            if q.ndim == 1:
                q = q.expand(b, -1)
            if q.ndim == 2:
                q = q[:, None, :]
            if not memory:  # nothing readable at this boundary: a = 0 (as the masked JAX softmax)
                a = torch.zeros((b, 1, s.hidden_size), device=h32.device)
            elif s.attend == "depth":
                a = depth_only_attention(q, [x[:, q_index] for x in memory], s.num_attention_heads, s.rms_norm_eps)
            else:
                if causal:  # each position reads its own prefix (as the JAX operator)
                    q = q.expand(b, tq, -1)
                a = cross_depth_attention(q, memory, readable[m], q_index if causal else None,
                                          s.num_attention_heads, s.rms_norm_eps)
            g = gates[i]
            g = g.reshape(g.shape + (1,) * (3 - g.ndim)) if g.ndim else g
            if vectors is not None:
                vectors[m] = (g * a)[:, 0]
            delta = delta + torch.where(inject[m][:, q_index][..., None], g * a, torch.zeros((), device=h32.device))
        return delta, vectors

    def _gates(self, contexts: dict, block_index: int) -> list[torch.Tensor]:
        s = self.settings
        n = len(s.streams)
        if s.gate == "global":
            return [self.gate[i] for i in range(n)]
        if s.gate == "per_block":
            return [self.gate[block_index, i] for i in range(n)]
        return [torch.tanh(contexts[m] @ self.gate_kernel[i] + self.gate_bias[i]) for i, m in enumerate(s.streams)]


# ----------------------------------------------------------------------------- loading


def load_iada(folder: str) -> DepthAggregation:
    """The IADA module of an exported folder (iada_config.json + iada.safetensors), float32."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (export the run with `python -m convert export-peft`)")
    module = DepthAggregation(IadaSettings.from_json(config_path))
    weights = load_file(weights_path)
    expected = module.state_dict()
    problems = [f"missing {k} {list(v.shape)}" for k, v in expected.items() if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k} has shape {list(weights[k].shape)}, {CONFIG_FILE} implies {list(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise ValueError(f"{weights_path} does not match {config_path}: " + "; ".join(problems))
    module.load_state_dict({k: v.float() for k, v in weights.items()})
    return module.eval()


# ----------------------------------------------------------------------------- attaching


@dataclasses.dataclass
class _Call:
    """One forward of the model: its token masks and the boundary states seen so far."""

    decode: bool
    past: int
    masks: dict  # over every position (cached + new)
    new_masks: dict  # over the new positions
    q_index: torch.Tensor  # positions of the new tokens
    states: list  # per depth: the new tokens' pre-injection states [B, Tn, D]
    vectors: dict  # boundary -> {stream: [B, D]} (prefill, vector-caching settings)


@dataclasses.dataclass
class _Cache:
    """What a decode step reads: masks of every cached position, and the prefill's vectors or
    every boundary state."""

    length: int
    masks: dict
    vectors: dict | None
    states: list | None


def _find_qwen3_vl(model: nn.Module) -> nn.Module:
    from transformers import Qwen3VLForConditionalGeneration

    for module in [model, *model.modules()]:
        if isinstance(module, Qwen3VLForConditionalGeneration):
            return module
    raise TypeError(f"attach_iada needs a transformers Qwen3VLForConditionalGeneration (or a PeftModel around "
                    f"one); got {type(model).__name__}")


def _hidden(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _replace_hidden(args, kwargs, h):
    if "hidden_states" in kwargs:
        return args, dict(kwargs, hidden_states=h)
    return (h,) + tuple(args[1:]), kwargs


class AttachedIada:
    """IADA hooked into a Qwen3-VL model; `detach()` removes it. Built by `attach_iada`."""

    def __init__(self, model: nn.Module, module: DepthAggregation):
        self.model = _find_qwen3_vl(model)
        self.module = module
        s = self.settings = module.settings
        text_cfg = self.model.config.text_config
        wrong = [f"{name}: model {getattr(text_cfg, name)} vs IADA {getattr(s, name)}"
                 for name in ("hidden_size", "num_attention_heads", "num_hidden_layers")
                 if getattr(text_cfg, name) != getattr(s, name)]
        wrong += [f"{name}: model {getattr(self.model.config, name)} vs IADA {getattr(s, name)}"
                  for name in ("image_token_id", "video_token_id") if getattr(self.model.config, name) != getattr(s, name)]
        if wrong:
            raise ValueError("these IADA weights were trained on another base model: " + "; ".join(wrong))
        if getattr(self.model, "_iada_attached", None) is not None:
            raise RuntimeError("IADA is already attached to this model; detach() it first")
        text = self.model.model.language_model
        device = text.embed_tokens.weight.device
        module.to(device)
        self._call: _Call | None = None
        self._cache: _Cache | None = None
        hooks = [
            self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.model.register_forward_hook(self._on_return, always_call=True),
            text.layers[0].register_forward_pre_hook(self._on_embeddings, with_kwargs=True),
        ]
        for n in range(1, s.num_blocks):
            hooks.append(text.layers[n * s.block_size].register_forward_pre_hook(
                functools.partial(self._on_boundary, n), with_kwargs=True))
        hooks.append(text.norm.register_forward_pre_hook(functools.partial(self._on_boundary, s.num_blocks),
                                                         with_kwargs=True))
        self._hooks = hooks
        self.model._iada_attached = self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._cache = self._call = None
        self.model._iada_attached = None

    # ------------------------------------------------------------------ hooks
    def _on_call(self, module, args, kwargs):
        s = self.settings
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("IADA needs input_ids (its visual stream is the image/video placeholder tokens); "
                             "inputs_embeds alone is not supported")
        past_kv = kwargs.get("past_key_values")
        past = past_kv.get_seq_length() if past_kv is not None else 0
        b, tn = ids.shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones((b, past + tn), dtype=torch.long, device=ids.device)
        valid = mask[:, -tn:].bool()
        visual = valid & torch.isin(ids, torch.tensor([s.image_token_id, s.video_token_id], device=ids.device))
        q_index = torch.arange(past, past + tn, device=ids.device)
        if past == 0:
            labels = kwargs.get("labels")
            if labels is None:
                prompt = valid
            else:
                prompt = valid & (torch.cumsum((labels != -100).long(), dim=1) == 0)
            new = {"valid": valid, "visual": visual, "prompt": prompt}
            self._call = _Call(False, 0, new, new, q_index, [None] * (s.num_blocks + 1), {})
            return None
        cache = self._cache
        if s.scope == "full":
            raise RuntimeError("IADA scope='full' reads the whole sequence, answer included, so every new token "
                               "changes the earlier states and a KV cache is invalid: generate with use_cache=False")
        if cache is None or cache.length != past or cache.masks["valid"].shape[0] != b:
            raise RuntimeError(f"IADA has no prefill state for this KV cache ({past} cached tokens, batch {b}): run "
                               "the prompt through the model with IADA attached first (beam search is not supported)")
        new = {"valid": valid, "visual": visual, "prompt": torch.zeros_like(valid)}
        masks = {k: torch.cat([cache.masks[k], new[k]], dim=1) for k in new}
        self._call = _Call(True, past, masks, new, q_index, [None] * (s.num_blocks + 1), {})
        return None

    def _on_return(self, module, args, output):
        self._call = None

    def _current(self) -> _Call:
        if self._call is None:
            raise RuntimeError("IADA hooks ran outside a call of the Qwen3VLForConditionalGeneration they are "
                               "attached to (call the full model, not model.model or the language model)")
        return self._call

    def _on_embeddings(self, module, args, kwargs):
        self._current().states[0] = _hidden(args, kwargs)
        return None

    def _on_boundary(self, n, module, args, kwargs):
        s, call = self.settings, self._current()
        h = _hidden(args, kwargs)
        call.states[n] = h
        if call.decode and s.caches_vectors:
            delta = torch.zeros(h.shape, device=h.device)
            for m in s.streams:
                where = stream_mask(call.new_masks, m)[..., None]
                delta = delta + torch.where(where, self._cache.vectors[n][m][:, None, :], torch.zeros((), device=h.device))
        else:
            states = call.states[: n + 1]
            if call.decode:
                states = [torch.cat([old, new], dim=1) for old, new in zip(self._cache.states, states)]
            delta, vectors = self.module.boundary(n - 1, states, call.masks, call.q_index)
            call.vectors[n] = vectors
        if n == s.num_blocks:
            self._commit(call)
        return _replace_hidden(args, kwargs, h + delta.to(h.dtype))

    def _commit(self, call: _Call) -> None:
        """After the last boundary: keep what the next decode step reads."""
        s = self.settings
        length = call.past + call.q_index.numel()
        if s.caches_vectors:
            vectors = self._cache.vectors if call.decode else call.vectors
            self._cache = _Cache(length, call.masks, vectors, None)
        else:
            states = call.states
            if call.decode:
                states = [torch.cat([old, new], dim=1) for old, new in zip(self._cache.states, states)]
            self._cache = _Cache(length, call.masks, None, list(states))


def attach_iada(model: nn.Module, folder_or_module) -> AttachedIada:
    """Apply exported IADA weights (a folder, or a `DepthAggregation`) to a transformers
    Qwen3-VL model, bare or wrapped by PEFT. Returns the handle; `handle.detach()` undoes it."""
    module = folder_or_module if isinstance(folder_or_module, DepthAggregation) else load_iada(folder_or_module)
    return AttachedIada(model, module)
