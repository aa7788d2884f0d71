"""float32 parity of the language stack with transformers on tiny random Qwen3-VL models."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import hf_logits, pad_batch, random_ids

import iada_jax
from iada_jax.config import ForwardConfig
from iada_jax.model.qwen3_vl import forward

TOL = 1e-4

# Each config varies what a port can get wrong: head tying, GQA grouping (MQA, GQA, MHA),
# head_dim != hidden / heads, the M-RoPE sections, attention biases, depth / block size.
CONFIGS = {
    "tied_gqa": dict(layers=4, heads=4, kv_heads=2, head_dim=24, mrope=(4, 4, 4), tied=True),
    "untied_mqa_bias": dict(layers=6, heads=4, kv_heads=1, head_dim=16, mrope=(2, 3, 3), tied=False,
                            attention_bias=True),
    "untied_mha": dict(layers=2, hidden=48, heads=3, kv_heads=3, head_dim=32, mrope=(8, 4, 4), tied=False),
}


@pytest.fixture(scope="module")
def models(tiny_hf):
    out = {}
    for i, (name, kw) in enumerate(CONFIGS.items()):
        path, hf = tiny_hf(name, seed=i, **kw)
        out[name] = (iada_jax.load_pretrained(path), hf)
    return out


def valid(x, mask):
    """Values at real tokens only (padding positions are meaningless in HF and here)."""
    return x[mask.astype(bool)]


@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_hidden_states_match_transformers(models, name, side):
    ours, hf = models[name]
    rng = np.random.default_rng(1)
    lengths = [11, 11, 11] if side == "none" else [11, 7, 3]
    ids, mask = pad_batch(rng, lengths, "right" if side == "none" else side)
    ref_logits, ref_hidden = hf_logits(hf, ids, mask)
    logits = ours.logits(ids, mask)
    err = np.abs(valid(logits, mask) - valid(ref_logits, mask)).max()
    assert err <= TOL, f"{name}/{side}: max abs logit diff {err:.2e}"
    assert np.abs(valid(ref_logits, mask)).max() > 1.0, "logits too small for the comparison to mean much"

    hidden = ours.hidden_states(ids, mask)
    L = ours.config.text.num_hidden_layers
    assert hidden.shape[0] == len(ref_hidden) == L + 1
    # HF's last hidden state is taken after the final norm; ours is the raw layer output.
    for layer in range(L):
        err = np.abs(valid(hidden[layer], mask) - valid(ref_hidden[layer], mask)).max()
        assert err <= TOL, f"{name}/{side}: hidden state {layer} differs by {err:.2e}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_samples_logits(models, side):
    ours, _ = models["tied_gqa"]
    rng = np.random.default_rng(2)
    ids, mask = pad_batch(rng, [9, 5], side)
    batched = ours.logits(ids, mask)
    short = ids[1][mask[1] == 1][None]
    alone = ours.logits(short)
    # float32 through 4 layers in two batch shapes (different XLA CPU matmul tilings): CI saw
    # 1.7e-5 on a logit of -22.06 (7.8e-7 relative) and 1.1e-5 on one of 0.0997.
    np.testing.assert_allclose(valid(batched[1:], mask[1:]), alone[0], atol=2e-5, rtol=1e-6)


def test_block_size_does_not_change_logits(models, tiny_hf):
    ours, _ = models["untied_mqa_bias"]  # 6 layers
    ids = random_ids(np.random.default_rng(3), 2, 8)
    ref = ours.logits(ids)
    for s in (1, 2, 3, 6):
        other = iada_jax.Qwen3VL(ours.config, ours.params, ForwardConfig(block_size=s))
        np.testing.assert_allclose(other.logits(ids), ref, atol=1e-5, err_msg=f"block_size={s}")
    with pytest.raises(ValueError, match="block_size=4 does not divide num_hidden_layers=6"):
        iada_jax.Qwen3VL(ours.config, ours.params, ForwardConfig(block_size=4))


@pytest.mark.parametrize("policy", ["full", "qkv", "proj", "dots", "dots_no_batch"])
def test_remat_policies_keep_values_and_gradients(models, policy):
    ours, _ = models["tied_gqa"]
    batch = ours.make_batch(random_ids(np.random.default_rng(4), 2, 6))

    def loss(params, fwd):
        logits, _ = forward(params, batch, cfg=ours.config, fwd=fwd)
        return (logits**2).mean()

    base = ForwardConfig(block_size=2)
    ref_val, ref_grad = jax.value_and_grad(loss)(ours.params, base)
    val, grad = jax.value_and_grad(loss)(ours.params, dataclasses.replace(base, remat=policy))
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad)):
        # Recomputation reorders float32 sums: compare relative to each gradient's magnitude.
        np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max(), err_msg=jax.tree_util.keystr(path))


def test_bfloat16_run_stays_close(models, tiny_hf, capsys):
    """bf16 parameters and activations against the float32 HF reference: reported, loosely bounded."""
    path, hf = tiny_hf("tied_gqa")
    ours = iada_jax.load_pretrained(path, dtype="bfloat16")
    ids, mask = pad_batch(np.random.default_rng(5), [12, 8], "left")
    ref, _ = hf_logits(hf, ids, mask)
    err = np.abs(valid(ours.logits(ids, mask), mask) - valid(ref, mask))
    scale = np.abs(valid(ref, mask)).max()
    with capsys.disabled():
        print(f"\n[bf16 vs HF float32] max abs logit diff {err.max():.3e}, mean {err.mean():.3e}, "
              f"logit scale {scale:.2f}")
    assert err.max() < 0.1 * scale


def _count_primitives(jaxpr, name):
    """Occurrences of a primitive in a jaxpr, counted once per appearance (not per iteration)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += _count_primitives(sub, name)
    return total


def _scan_lengths(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"])
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _scan_lengths(sub)
    return found


def test_traced_forward_holds_a_nested_scan_not_a_copy_per_layer(tiny_hf):
    """The program size must not grow with depth: one traced decoder layer, in a scan of
    blocks holding a scan of layers."""
    counts = {}
    for layers in (4, 8):
        path, _ = tiny_hf(f"depth{layers}", layers=layers)
        m = iada_jax.load_pretrained(path)
        batch = m.make_batch(random_ids(np.random.default_rng(0), 1, 5))
        fwd = ForwardConfig(block_size=2)
        jaxpr = jax.make_jaxpr(lambda p, b: forward(p, b, cfg=m.config, fwd=fwd))(m.params, batch).jaxpr
        assert _scan_lengths(jaxpr) == [layers // 2, 2], _scan_lengths(jaxpr)
        counts[layers] = _count_primitives(jaxpr, "dot_general")
    assert counts[4] == counts[8], f"dot_general count grows with depth: {counts}"
    # q, k, v, o, gate, up, down, 2 in attention, 1 tied head.
    assert counts[4] == 10, counts


def test_module_init_matches_the_converter_layout():
    """Flax's own init of the module (tiny preset) has exactly the converter's text shapes:
    the checkpoint layout and the module layout cannot drift apart."""
    from convert.mapping import get_path, text_rules
    from iada_jax.data.batch import Batch
    from iada_jax.model.qwen3_vl import Qwen3VLForConditionalGeneration
    from iada_jax.model.text import from_block_layout

    cfg = iada_jax.Qwen3VLConfig.tiny()
    fwd = ForwardConfig(block_size=2)
    ids = np.zeros((1, 4), np.int32)
    batch = Batch(ids, np.ones_like(ids), np.zeros((3, 1, 4), np.int32))
    params = Qwen3VLForConditionalGeneration(cfg, fwd).init(jax.random.key(0), batch)["params"]
    params = dict(params, model=dict(params["model"], language_model=from_block_layout(params["model"]["language_model"])))
    rules = text_rules(cfg)
    assert len(jax.tree.leaves(params)) == len(rules)
    for rule in rules:
        assert get_path(params, rule.jax).shape == rule.jax_shape, rule.hf
    logits, _ = forward(params, batch, cfg=cfg, fwd=fwd)
    assert logits.shape == (1, 4, cfg.text.vocab_size) and np.isfinite(logits).all()
