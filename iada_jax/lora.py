"""LoRA with PEFT semantics, as a pure addition to a frozen `Dense`.

Mirrors `peft.tuners.lora.layer.Linear` (peft 0.21.2):
    y = base(x) + lora_B(lora_A(dropout(x))) * scaling
with our Flax layout A [in, r], B [r, out] (PEFT stores the transposes, `lora_A.weight`
[r, in] and `lora_B.weight` [out, r]). The factors live in the `lora` collection, on the
`Dense` they adapt, so they are stacked with the scanned layers like the base kernels:
checkpoint path `model/language_model/layers/self_attn/q_proj/{lora_A,lora_B}` [L, ...].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from iada_jax.config import LORA_ALL_LINEAR, LoraConfig

Array = jax.Array

COLLECTION = "lora"
# A fixed number per module name, so each module's random A does not depend on which others are adapted.
LORA_MODULE_IDS = {name: i for i, name in enumerate(LORA_ALL_LINEAR)}


def init_lora_a(key: Array, shape: tuple[int, int], cfg: LoraConfig) -> Array:
    """Mirrors `LoraLayer.reset_lora_parameters`: kaiming_uniform_(a=sqrt(5)) on the [r, in]
    torch weight is U(-1/sqrt(in), 1/sqrt(in)); "gaussian" is N(0, 1/r)."""
    fan_in, r = shape
    if cfg.init_lora_weights == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / r
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_lora_variables(key: Array, layers: dict, cfg: LoraConfig) -> dict:
    """Fresh LoRA factors for the stacked decoder layers `layers` (checkpoint layout: every
    Dense kernel [L, in, out]): for each targeted Dense, lora_A [L, in, r] drawn per layer as
    PEFT does and lora_B [L, r, out] = 0, so a fresh adapter is the identity. Pure (works on
    abstract shapes under `jax.eval_shape`); no forward pass is traced."""
    out: dict = {}
    for group in sorted(layers):
        for name in sorted(layers[group]) if isinstance(layers[group], dict) else ():
            module = layers[group][name]
            if not (isinstance(module, dict) and "kernel" in module and cfg.targets(name)):
                continue
            n_layers, fan_in, features = module["kernel"].shape
            keys = jax.random.split(jax.random.fold_in(key, LORA_MODULE_IDS[name]), n_layers)
            a = jax.vmap(lambda k: init_lora_a(k, (fan_in, cfg.r), cfg))(keys)
            out.setdefault(group, {})[name] = {"lora_A": a, "lora_B": jnp.zeros((n_layers, cfg.r, features), jnp.float32)}
    return out


def _mix32(x: Array) -> Array:
    """A 32-bit integer hash with full avalanche (the "lowbias32" finaliser of C. Wellons)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(key: Array, shape: tuple[int, ...], rate: float) -> Array:
    """Bernoulli(1 - rate) keep mask, drawn once: one 32-bit seed from `key`, then a hash of
    (seed, element index). Inside a rematerialised layer the backward recomputes the mask as
    part of the elementwise multiply it feeds (a few integer operations per element, fused),
    with no second random-number kernel and no mask kept in memory."""
    seed = _mix32(jax.random.bits(key, (), jnp.uint32))
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):  # the flat element index, modulo 2^32
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    bits = _mix32(index * jnp.uint32(0x9E3779B9) + seed)
    return bits >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))


def lora_delta(module: nn.Module, x: Array, features: int, cfg: LoraConfig, deterministic: bool) -> Array:
    """The low-rank update of `module` (a Dense being built) for input x [..., in].

    Declares `lora_A` [in, r] and `lora_B` [r, out] in the `lora` collection of `module`.
    Computed in x's dtype, as PEFT casts the input to the adapter's dtype.
    """
    shape_a = (x.shape[-1], cfg.r)
    a = module.variable(COLLECTION, "lora_A", lambda: init_lora_a(module.make_rng("params"), shape_a, cfg)).value
    b = module.variable(COLLECTION, "lora_B", lambda: jnp.zeros((cfg.r, features), jnp.float32)).value
    if cfg.lora_dropout > 0.0 and not deterministic:
        keep = dropout_keep_mask(module.make_rng("dropout"), x.shape, cfg.lora_dropout)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
    low = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype))
    return jnp.einsum("...r,ro->...o", low, b.astype(x.dtype)) * jnp.asarray(cfg.scaling, x.dtype)


def peft_target_modules(cfg: LoraConfig) -> str:
    """PEFT `target_modules` selecting exactly the modules we adapt: a full-match regex over
    the language stack, since PEFT's own "all-linear" would also take the vision tower."""
    attn = [m[:-5] for m in cfg.modules if m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [m[:-5] for m in cfg.modules if m in ("gate_proj", "up_proj", "down_proj")]
    parts = []
    if attn:
        parts.append(rf"self_attn\.({'|'.join(attn)})_proj")
    if mlp:
        parts.append(rf"mlp\.({'|'.join(mlp)})_proj")
    return rf"model\.language_model\.layers\.\d+\.({'|'.join(parts)})"
