"""Our `lora` collection <-> a PEFT LoRA adapter (peft 0.21.2 format), and the IADA files.

PEFT (QWEN3VL_REFERENCE.md §4): keys `base_model.model.<module path>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r], the adapter name stripped; scaling = lora_alpha / r (or / sqrt(r)
with use_rslora) stays in adapter_config.json. Ours: A [L, in, r] and B [L, r, out] stacked
under model/language_model/layers/<self_attn|mlp>/<module>. So A_peft = A[i].T, B_peft = B[i].T.

A wrong prefix makes PEFT load nothing (a silent no-op adapter), so the key format lives here
once and both directions use it.
"""

from __future__ import annotations

import re

import numpy as np

from iada_jax.config import LORA_ALL_LINEAR, IadaConfig, LoraConfig, Qwen3VLConfig
from iada_jax.lora import peft_target_modules

PEFT_PREFIX = "base_model.model."
LAYER_KEY = "model.language_model.layers.{i}.{group}.{module}"
KEY_RE = re.compile(
    r"base_model\.model\.model\.language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(lora_A|lora_B)\.weight"
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
IADA_CONFIG = "iada_config.json"
IADA_WEIGHTS = "iada.safetensors"
IADA_FORMAT = "iada-jax-iada"


def module_group(module: str) -> str:
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def lora_shapes(cfg: Qwen3VLConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA-adaptable module of the language stack."""
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return {"q_proj": (t.hidden_size, q), "k_proj": (t.hidden_size, kv), "v_proj": (t.hidden_size, kv),
            "o_proj": (q, t.hidden_size), "gate_proj": (t.hidden_size, t.intermediate_size),
            "up_proj": (t.hidden_size, t.intermediate_size), "down_proj": (t.intermediate_size, t.hidden_size)}


def check_lora(lora_vars: dict, lora: LoraConfig, cfg: Qwen3VLConfig, where: str) -> None:
    """Every module the config targets is there, with this base model's shapes; else one error
    listing every problem."""
    problems = []
    layers = lora_vars.get("model", {}).get("language_model", {}).get("layers", {})
    L, shapes = cfg.text.num_hidden_layers, lora_shapes(cfg)
    for module in lora.modules:
        factors = layers.get(module_group(module), {}).get(module)
        if factors is None:
            problems.append(f"no LoRA factors for {module}")
            continue
        fan_in, fan_out = shapes[module]
        for name, want in (("lora_A", (L, fan_in, lora.r)), ("lora_B", (L, lora.r, fan_out))):
            got = tuple(np.shape(factors.get(name)))
            if got != want:
                problems.append(f"{module}.{name} has shape {list(got)}, the base model needs {list(want)} "
                                f"({L} layers, r={lora.r})")
    if problems:
        raise ValueError(f"{where}: the LoRA adapter does not fit the base model: " + "; ".join(problems))


def to_peft_state_dict(lora_vars: dict, lora: LoraConfig) -> dict[str, np.ndarray]:
    """Our stacked factors -> PEFT's on-disk tensors (float32, contiguous)."""
    layers = lora_vars["model"]["language_model"]["layers"]
    out = {}
    for module in lora.modules:
        group = module_group(module)
        factors = layers[group][module]
        for name in ("lora_A", "lora_B"):
            stacked = np.asarray(factors[name], np.float32)
            for i in range(stacked.shape[0]):
                key = PEFT_PREFIX + LAYER_KEY.format(i=i, group=group, module=module) + f".{name}.weight"
                out[key] = np.ascontiguousarray(stacked[i].T)
    return out


def to_peft_config(lora: LoraConfig, base_model: str | None) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields, target_modules as the regex that selects
    exactly our modules (PEFT's "all-linear" would also adapt the vision tower)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
        "target_modules": peft_target_modules(lora), "exclude_modules": None, "bias": "none",
        "use_rslora": lora.use_rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "init_lora_weights": lora.init_lora_weights, "lora_bias": False,
    }


def from_peft(config: dict, tensors: dict[str, np.ndarray], cfg: Qwen3VLConfig, where: str) -> tuple[LoraConfig, dict]:
    """A PEFT adapter -> (LoraConfig, our storage-layout `lora` collection).

    Modules PEFT adapted in only some layers get zero factors in the others (a zero update that
    also stays zero under training: both gradients vanish). Anything we cannot represent
    (DoRA, per-module ranks or alphas, biases, modules outside the language stack's linear
    layers, saved full modules) is refused, listing every such key.
    """
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for field, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if config.get(field, ok) not in (ok, None):
            problems.append(f"{field}={config.get(field)!r} is not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            problems.append(f"{field} {config.get(field)} (per-module ranks/alphas) is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config.get('modules_to_save')} (full trained modules) is not supported")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        problems.append(f"r={r!r} is not a positive integer")
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in sorted(tensors.items()):
        m = KEY_RE.fullmatch(key)
        if m is None or m.group(3) not in LORA_ALL_LINEAR or module_group(m.group(3)) != m.group(2):
            problems.append(f"tensor {key!r} is not a LoRA factor of the language stack's linear layers")
            continue
        layer, module, name = int(m.group(1)), m.group(3), m.group(4)
        found.setdefault(module, {}).setdefault(layer, {})[name] = value
    if not found and not problems:
        problems.append("no LoRA tensors (expected keys like "
                        "'base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight')")
    L, shapes = cfg.text.num_hidden_layers, lora_shapes(cfg)
    layers: dict = {}
    if not problems:
        for module, per_layer in sorted(found.items()):
            fan_in, fan_out = shapes[module]
            a = np.zeros((L, fan_in, r), np.float32)
            b = np.zeros((L, r, fan_out), np.float32)
            for i, factors in sorted(per_layer.items()):
                if i >= L:
                    problems.append(f"{module} in layer {i}, but the base model has {L} layers")
                    continue
                for name, want, target in (("lora_A", (r, fan_in), a), ("lora_B", (fan_out, r), b)):
                    value = factors.get(name)
                    key = PEFT_PREFIX + LAYER_KEY.format(i=i, group=module_group(module), module=module) + f".{name}.weight"
                    if value is None:
                        problems.append(f"missing tensor {key!r}")
                    elif tuple(value.shape) != want:
                        problems.append(f"tensor {key!r} has shape {list(value.shape)}, the base model and "
                                        f"r={r} need {list(want)}")
                    else:
                        target[i] = np.asarray(value, np.float32).T
            layers.setdefault(module_group(module), {})[module] = {"lora_A": a, "lora_B": b}
    if problems:
        raise ValueError(f"{where}: cannot import the adapter: {len(problems)} problem(s)\n"
                         + "\n".join(f"  - {p}" for p in problems))
    modules = tuple(m for m in LORA_ALL_LINEAR if m in found)
    init = config.get("init_lora_weights", True)
    lora = LoraConfig(r=r, lora_alpha=float(config.get("lora_alpha", 8)), lora_dropout=float(config.get("lora_dropout") or 0.0),
                      target_modules="all-linear" if modules == LORA_ALL_LINEAR else modules,
                      use_rslora=bool(config.get("use_rslora", False)),
                      init_lora_weights="gaussian" if init == "gaussian" else True)
    return lora, {"model": {"language_model": {"layers": layers}}}


# ----------------------------------------------------------------------------- IADA files


def iada_config_json(iada: IadaConfig, cfg: Qwen3VLConfig) -> dict:
    """iada_config.json: the switches plus what the PyTorch module needs of the base model."""
    import dataclasses

    t = cfg.text
    return {
        "format": IADA_FORMAT, "version": 1, "iada": dataclasses.asdict(iada),
        "model": {"hidden_size": t.hidden_size, "num_attention_heads": t.num_attention_heads,
                  "num_hidden_layers": t.num_hidden_layers, "rms_norm_eps": t.rms_norm_eps,
                  "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id},
    }


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"query_visual": {"down_kernel": x}} -> {"query_visual.down_kernel": x} (the PyTorch
    module's state_dict names)."""
    from flax.traverse_util import flatten_dict

    return {prefix + k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten_dict(tree, sep=".").items()}
