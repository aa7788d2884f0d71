"""The one declarative table between Hugging Face Qwen3-VL tensors and our parameter tree.

Each `Rule` says: this HF key (with `{i}` for a stacked index) is this path in our tree,
via this transform, with this HF shape. Import applies `Transform.to_jax` and stacks the
indexed keys along a new leading axis; export applies `Transform.to_hf` to each slice.
The table is built from the config, so a shape check needs no tensor data.

Our layout: Linear weight [out, in] -> Dense kernel [in, out]; norms -> `scale` (+ `bias`
for LayerNorm); embeddings -> `embedding`; the Conv3d patch embedding -> a matmul kernel
[C*T*p*p, D] over flattened patches (the same (C, T, y, x) order as `pixel_values` rows);
text layers stacked [L, ...], vision blocks [depth, ...], DeepStack mergers [K, ...].
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from iada_jax.config import Qwen3VLConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # HF shape -> our shape, without data


IDENTITY = Transform("identity", lambda x: x, lambda x: x, lambda s: tuple(s))
TRANSPOSE = Transform(
    "transpose", lambda x: np.ascontiguousarray(x.T), lambda x: np.ascontiguousarray(x.T), lambda s: tuple(s[::-1])
)


def conv3d_as_dense(hf_shape: tuple[int, ...]) -> Transform:
    """Conv3d weight [D, C, T, p, p] (kernel == stride) <-> matmul kernel [C*T*p*p, D]."""
    return Transform(
        "conv3d_as_dense",
        lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T),
        lambda x: np.ascontiguousarray(x.T.reshape(hf_shape)),
        lambda s: (int(np.prod(s[1:])), s[0]),
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF key; "{i}" marks the stacked index
    jax: Path  # path in our parameter tree
    hf_shape: tuple[int, ...]  # shape of one HF tensor
    transform: Transform = IDENTITY
    count: int | None = None  # number of stacked HF tensors ({i} in 0..count-1), None if not stacked

    def hf_keys(self) -> list[str]:
        if self.count is None:
            return [self.hf]
        return [self.hf.format(i=i) for i in range(self.count)]

    @property
    def jax_shape(self) -> tuple[int, ...]:
        one = self.transform.shape(self.hf_shape)
        return one if self.count is None else (self.count,) + one


def _linear(hf: str, jax: Path, out_dim: int, in_dim: int, count: int | None, bias: bool) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", jax + ("kernel",), (out_dim, in_dim), TRANSPOSE, count)]
    if bias:
        rules.append(Rule(f"{hf}.bias", jax + ("bias",), (out_dim,), IDENTITY, count))
    return rules


def _layernorm(hf: str, jax: Path, dim: int, count: int | None) -> list[Rule]:
    return [
        Rule(f"{hf}.weight", jax + ("scale",), (dim,), IDENTITY, count),
        Rule(f"{hf}.bias", jax + ("bias",), (dim,), IDENTITY, count),
    ]


def text_rules(cfg: Qwen3VLConfig) -> list[Rule]:
    t = cfg.text
    L, D, hd = t.num_hidden_layers, t.hidden_size, t.head_dim
    q_dim, kv_dim = t.num_attention_heads * hd, t.num_key_value_heads * hd
    hf_lm, lm = "model.language_model", ("model", "language_model")
    layer, jl = f"{hf_lm}.layers.{{i}}", lm + ("layers",)
    rules = [Rule(f"{hf_lm}.embed_tokens.weight", lm + ("embed_tokens", "embedding"), (t.vocab_size, D))]
    rules += [
        Rule(f"{layer}.input_layernorm.weight", jl + ("input_layernorm", "scale"), (D,), IDENTITY, L),
        Rule(f"{layer}.post_attention_layernorm.weight", jl + ("post_attention_layernorm", "scale"), (D,), IDENTITY, L),
        Rule(f"{layer}.self_attn.q_norm.weight", jl + ("self_attn", "q_norm", "scale"), (hd,), IDENTITY, L),
        Rule(f"{layer}.self_attn.k_norm.weight", jl + ("self_attn", "k_norm", "scale"), (hd,), IDENTITY, L),
    ]
    attn, jattn = f"{layer}.self_attn", jl + ("self_attn",)
    for name, out_dim, in_dim in (("q_proj", q_dim, D), ("k_proj", kv_dim, D), ("v_proj", kv_dim, D), ("o_proj", D, q_dim)):
        rules += _linear(f"{attn}.{name}", jattn + (name,), out_dim, in_dim, L, t.attention_bias)
    for name, out_dim, in_dim in (("gate_proj", t.intermediate_size, D), ("up_proj", t.intermediate_size, D),
                                  ("down_proj", D, t.intermediate_size)):
        rules += _linear(f"{layer}.mlp.{name}", jl + ("mlp", name), out_dim, in_dim, L, False)
    rules.append(Rule(f"{hf_lm}.norm.weight", lm + ("norm", "scale"), (D,)))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), (t.vocab_size, D), TRANSPOSE))
    return rules


def vision_rules(cfg: Qwen3VLConfig) -> list[Rule]:
    v = cfg.vision
    D, I, depth, K = v.hidden_size, v.intermediate_size, v.depth, len(v.deepstack_visual_indexes)
    merged = D * v.spatial_merge_size**2
    hf_v, jv = "model.visual", ("model", "visual")
    conv_shape = (D, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    rules = [
        Rule(f"{hf_v}.patch_embed.proj.weight", jv + ("patch_embed", "proj", "kernel"), conv_shape, conv3d_as_dense(conv_shape)),
        Rule(f"{hf_v}.patch_embed.proj.bias", jv + ("patch_embed", "proj", "bias"), (D,)),
        Rule(f"{hf_v}.pos_embed.weight", jv + ("pos_embed", "embedding"), (v.num_position_embeddings, D)),
    ]
    blk, jb = f"{hf_v}.blocks.{{i}}", jv + ("blocks",)
    rules += _layernorm(f"{blk}.norm1", jb + ("norm1",), D, depth)
    rules += _layernorm(f"{blk}.norm2", jb + ("norm2",), D, depth)
    rules += _linear(f"{blk}.attn.qkv", jb + ("attn", "qkv"), 3 * D, D, depth, True)
    rules += _linear(f"{blk}.attn.proj", jb + ("attn", "proj"), D, D, depth, True)
    rules += _linear(f"{blk}.mlp.linear_fc1", jb + ("mlp", "linear_fc1"), I, D, depth, True)
    rules += _linear(f"{blk}.mlp.linear_fc2", jb + ("mlp", "linear_fc2"), D, I, depth, True)
    # The final merger normalises over D before the 2x2 shuffle, the DeepStack ones over 4D after it.
    for hf, jp, norm_dim, count in ((f"{hf_v}.merger", jv + ("merger",), D, None),
                                    (f"{hf_v}.deepstack_merger_list.{{i}}", jv + ("deepstack_merger_list",), merged, K)):
        if count == 0:
            continue
        rules += _layernorm(f"{hf}.norm", jp + ("norm",), norm_dim, count)
        rules += _linear(f"{hf}.linear_fc1", jp + ("linear_fc1",), merged, merged, count, True)
        rules += _linear(f"{hf}.linear_fc2", jp + ("linear_fc2",), v.out_hidden_size, merged, count, True)
    return rules


def mapping_table(cfg: Qwen3VLConfig) -> list[Rule]:
    """Every tensor of an HF `Qwen3VLForConditionalGeneration` checkpoint, exactly once."""
    rules = text_rules(cfg) + vision_rules(cfg)
    paths = [r.jax for r in rules]
    assert len(set(paths)) == len(paths), "mapping table maps two rules to one path"
    return rules


def get_path(tree: dict, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def export_to_hf(params: dict, cfg: Qwen3VLConfig):
    """Yield (hf_key, numpy tensor) for every rule: the inverse direction of the table."""
    for rule in mapping_table(cfg):
        value = np.asarray(get_path(params, rule.jax))
        if rule.count is None:
            yield rule.hf, rule.transform.to_hf(value)
        else:
            for i in range(rule.count):
                yield rule.hf.format(i=i), rule.transform.to_hf(value[i])


def hf_specs(cfg: Qwen3VLConfig, dtype) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(hf_key, dtype, hf_shape) of every tensor of the HF checkpoint, from the table alone."""
    return [(key, np.dtype(dtype), tuple(rule.hf_shape)) for rule in mapping_table(cfg) for key in rule.hf_keys()]


def hf_sources(cfg: Qwen3VLConfig) -> dict[str, tuple[Rule, int | None]]:
    """hf_key -> (rule, stacked index or None): where each HF tensor lives in our tree."""
    return {key: (rule, None if rule.count is None else i) for rule in mapping_table(cfg)
            for i, key in enumerate(rule.hf_keys())}


def hf_tensor(params: dict, cfg: Qwen3VLConfig, key: str, sources: dict | None = None) -> np.ndarray:
    """One HF tensor from our tree (a stacked parameter's slice read alone: on a memory-mapped
    checkpoint, only that slice is read)."""
    rule, i = (sources or hf_sources(cfg))[key]
    value = get_path(params, rule.jax)
    return rule.transform.to_hf(np.asarray(value if i is None else value[i]))
