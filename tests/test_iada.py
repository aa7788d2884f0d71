"""IADA: the operator against a literal reference, and the properties IADA_SPEC.md requires
of the model it is inserted in (identity at init, causality, padding, gradients, one scan)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from iada_reference import reference_boundary

import iada_jax
from iada_jax.config import ConfigError, ForwardConfig, IadaConfig, LoraConfig
from iada_jax.data.batch import Batch
from iada_jax.experiments import EXPERIMENTS, get_experiment
from iada_jax.iada import DepthAggregation, TokenMasks, token_masks
from iada_jax.model.qwen3_vl import forward, init_adapters

# ----------------------------------------------------------------------------- the operator

D, HEADS, N_BLOCKS, EPS = 16, 4, 3, 1e-6

OPERATOR_VARIANTS = {e.name: e.iada for e in EXPERIMENTS.values() if e.iada is not None}
OPERATOR_VARIANTS.update({
    "no_embedding_in_memory": IadaConfig(include_embedding=False),
    "no_current_in_memory": IadaConfig(include_current=False),
    "causal_attention_pooling": IadaConfig(scope="causal", pooling="attention"),
    "causal_token_level": IadaConfig(scope="causal", granularity="token"),
    "causal_adaptive_gate_cross_modal": IadaConfig(scope="causal", gate="adaptive", routing="cross_modal"),
    "full_scope_depth_attend": IadaConfig(scope="full", attend="depth"),
    "prompt_scope_fixed_per_block": IadaConfig(query="fixed", gate="per_block", routing="shared"),
    "causal_fixed_query": IadaConfig(scope="causal", query="fixed", routing="shared"),
})


def operator_inputs(seed=0):
    """3 samples of 10 tokens: visual tokens and a prompt/answer split; one with right padding
    and no visual token; one left-padded with no answer (inference-like)."""
    rng = np.random.default_rng(seed)
    B, T = 3, 10
    valid = np.ones((B, T), bool)
    valid[1, 8:] = False
    valid[2, :3] = False
    visual = np.zeros((B, T), bool)
    visual[0, 2:6] = True
    visual[2, 4:7] = True
    prompt = valid.copy()
    prompt[0, 7:] = False
    prompt[1, 5:] = False
    masks = {"valid": valid, "visual": visual, "prompt": prompt}
    states = rng.normal(size=(N_BLOCKS + 1, B, T, D)).astype(np.float32)
    return masks, states


def random_iada_params(cfg, seed=0):
    module = DepthAggregation(cfg, D, HEADS, N_BLOCKS, EPS)
    masks, states = operator_inputs()
    tm = TokenMasks(**{k: jnp.asarray(v) for k, v in masks.items()})
    variables = module.init({"iada": jax.random.PRNGKey(seed)}, jnp.asarray(states[1]), jnp.asarray(states),
                            jnp.asarray(0), tm)
    rng = np.random.default_rng(seed + 1)
    # Nonzero everywhere (gates and W_up included), so every path shows in the output.
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.5), variables["iada"])


# Boundary 3 of 3 for every variant; boundary 1 (memory = H_0, H_S) for the depth switches.
REFERENCE_CASES = [(name, 2) for name in OPERATOR_VARIANTS] + [
    (name, 0) for name in ("D_iada_lora", "no_embedding_in_memory", "no_current_in_memory", "D_causal_scope")
]


@pytest.mark.parametrize("name, block", REFERENCE_CASES)
def test_operator_matches_literal_reference(name, block):
    cfg = OPERATOR_VARIANTS[name]
    params = random_iada_params(cfg)
    masks, states = operator_inputs()
    n = block + 1
    buffer = states.copy()
    buffer[n + 1:] = 0.0  # entries past the current boundary are not written yet
    tm = TokenMasks(**{k: jnp.asarray(v) for k, v in masks.items()})
    module = DepthAggregation(cfg, D, HEADS, N_BLOCKS, EPS)
    h_in = jnp.asarray(states[n])
    buffer_in = jnp.asarray(buffer).at[n].set(0.0)  # the module itself stores the current state
    out, new_buffer = module.apply({"iada": params}, h_in, buffer_in, jnp.asarray(block), tm)
    np.testing.assert_array_equal(np.asarray(new_buffer[n]), states[n])
    ref = reference_boundary(jax.tree.map(np.asarray, params), cfg, list(states[: n + 1]), n, masks,
                             HEADS, EPS, N_BLOCKS)
    out = np.asarray(out)
    valid = masks["valid"]
    err = np.abs(out[valid] - ref[valid]).max()
    assert err < 2e-5, f"{name} at boundary {n}: max abs diff to the reference {err:.2e}"
    assert np.abs(ref - states[n])[valid].max() > 1e-2, "the variant should change the state"
    np.testing.assert_array_equal(out[~valid], states[n][~valid])  # padding untouched


# ----------------------------------------------------------------------------- in the model



@pytest.fixture(scope="module")
def model(tiny_hf):
    path, _ = tiny_hf("tied_gqa", seed=0, layers=4, heads=4, kv_heads=2, head_dim=24, mrope=(4, 4, 4), tied=True)
    return iada_jax.load_pretrained(path, fwd=ForwardConfig(block_size=2))


def make_batch(model, rows, loss_from=None, pad_to=None, side="right"):
    """Batch from token rows (lists of ids; 'IMG' = image placeholder), padded to `pad_to`.
    loss_from[b]: index (within the row) of the first supervised token, or None."""
    img = model.config.image_token_id
    T = pad_to or max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    loss = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        row = [img if t == "IMG" else t for t in row]
        off = T - len(row) if side == "left" else 0
        ids[b, off:off + len(row)] = row
        mask[b, off:off + len(row)] = 1
        if loss_from is not None and loss_from[b] is not None:
            loss[b, off + loss_from[b]:off + len(row)] = 1
    pos = np.broadcast_to(np.maximum(np.cumsum(mask, 1) - 1, 0), (3,) + ids.shape).astype(np.int32)
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
                 loss_mask=None if loss_from is None else jnp.asarray(loss))


ROW_A = [5, 6, "IMG", "IMG", "IMG", "IMG", 7, 8, 9, 10, 11, 12, 13]  # prompt = first 8 tokens
ROW_B = [14, 15, 16, 17, 18, 19, 20, 21]  # text only
ROW_C = [22, "IMG", "IMG", 23, 24, 25]


@functools.lru_cache(maxsize=None)
def _fresh_adapters(model, lora, iada):
    return init_adapters(jax.random.PRNGKey(0), model.params, cfg=model.config, fwd=model.fwd, lora=lora, iada=iada)


def live_adapters(model, exp, seed=0, scale=0.3):
    """Adapters with every leaf random and nonzero (gates included)."""
    # Scope, attend, granularity and bottleneck do not change the parameter shapes: share one init.
    shape_key = None if exp.iada is None else dataclasses.replace(
        exp.iada, scope="prompt", attend="sequence", granularity="sequence", bottleneck="linear")
    adapters = _fresh_adapters(model, exp.lora, shape_key)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * scale), adapters)


_forward = jax.jit(forward, static_argnames=("cfg", "fwd", "keep_hidden", "lora", "iada"))


def run(model, exp, adapters, batch):
    logits, _ = _forward(model.params, batch, cfg=model.config, fwd=model.fwd, lora=exp.lora, iada=exp.iada,
                         adapters=adapters)
    return np.asarray(logits)


def assert_float32_identical(a, b):
    """Equal up to float32 rounding: a different program (adapter terms of exactly 0 added)
    may fuse differently; a live adapter would move logits by ~1e-2 or more."""
    a, b = np.asarray(a), np.asarray(b)
    err = np.abs(a - b).max()
    assert err <= 1e-6 * max(1.0, np.abs(b).max()), f"max abs diff {err:.2e}"


def _exp(name):
    return get_experiment(name, block_size=2)


@pytest.mark.parametrize("name", [n for n, e in EXPERIMENTS.items() if e.trains])
def test_fresh_adapters_give_the_base_model_logits(model, name):
    exp = _exp(name)
    batch = make_batch(model, [ROW_A, ROW_B, ROW_C], loss_from=[8, 3, None])
    adapters = init_adapters(jax.random.PRNGKey(0), model.params, cfg=model.config, fwd=model.fwd,
                             lora=exp.lora, iada=exp.iada)
    base = run(model, dataclasses.replace(exp, lora=None, iada=None), None, batch)
    assert_float32_identical(run(model, exp, adapters, batch), base)


CAUSALITY_VARIANTS = ["D_iada_lora", "D_causal_scope", "token_level", "attention_pooling", "adaptive_gate",
                      "cross_modal", "D_attend_depth", "adaptive_no_split", "C_attnres_lora", "text_only_adaptive"]


@pytest.mark.parametrize("scope", ["prompt", "causal", "full"])
@pytest.mark.parametrize("name", CAUSALITY_VARIANTS)
def test_changing_an_answer_token_leaves_earlier_logits_alone(model, name, scope):
    exp = _exp(name)
    exp = dataclasses.replace(exp, iada=dataclasses.replace(exp.iada, scope=scope))
    adapters = live_adapters(model, exp)
    t = 10  # an answer token of ROW_A (answer starts at 8)
    changed = list(ROW_A)
    changed[t] = 99
    batch = make_batch(model, [ROW_A, ROW_A], loss_from=[8, 8])
    batch2 = make_batch(model, [ROW_A, changed], loss_from=[8, 8])
    a, b = run(model, exp, adapters, batch), run(model, exp, adapters, batch2)
    np.testing.assert_array_equal(a[0], b[0])  # the unchanged sample is unaffected
    earlier = np.abs(a[1, :t] - b[1, :t]).max()
    later = np.abs(a[1, t:] - b[1, t:]).max()
    assert later > 1e-3, "the change must show from position t on"
    if scope == "full":
        assert earlier > 1e-4, f"full scope leaks the answer backwards: expected a change, got {earlier:.2e}"
    else:
        assert earlier == 0.0, f"{scope} scope: logits before the changed token moved by {earlier:.2e}"


# Every routing variant, every scope, and the switches that change what a token reads.
PADDING_VARIANTS = ["D_iada_lora", "adaptive_no_split", "cross_modal", "text_only_adaptive", "vision_only_adaptive",
                    "token_level", "attention_pooling", "adaptive_gate", "fixed_modality_aware_per_block_gate",
                    "D_causal_scope", "D_full_scope", "D_attend_depth"]


@pytest.mark.parametrize("name", PADDING_VARIANTS)
def test_padding_never_changes_a_sample(model, name):
    exp = _exp(name)
    adapters = live_adapters(model, exp)
    rows, loss_from = [ROW_A, ROW_B, ROW_C], [8, 3, None]
    alone = [run(model, exp, adapters, make_batch(model, [r], loss_from=[lf])) for r, lf in zip(rows, loss_from)]
    for side in ("right", "left"):
        batch = make_batch(model, rows, loss_from=loss_from, pad_to=16, side=side)
        out = run(model, exp, adapters, batch)
        assert np.isfinite(out).all(), f"{side} padding: non-finite logits"
        mask = np.asarray(batch.attention_mask).astype(bool)
        for b, ref in enumerate(alone):
            # Float32 rounding differs with the padded length (sums over more, masked, terms).
            err = np.abs(out[b][mask[b]] - ref[0]).max() / np.abs(ref[0]).max()
            assert err < 1e-5, f"{name}, {side} padding, sample {b}: max relative diff {err:.2e}"


def test_text_only_batch_has_no_nan_in_value_or_gradient(model):
    exp = _exp("D_iada_lora")
    adapters = live_adapters(model, exp)
    batch = make_batch(model, [ROW_B, ROW_B[:5]], loss_from=[3, 0])  # no image; sample 1 has no prompt

    def loss(ad):
        return jnp.sum(jnp.asarray(forward(model.params, batch, cfg=model.config, fwd=model.fwd, lora=exp.lora,
                                           iada=exp.iada, adapters=ad)[0]) ** 2) * 1e-4

    value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["D_iada_lora", "attention_pooling", "adaptive_gate", "D_causal_scope",
                                  "gelu_bottleneck", "token_level", "C_attnres_lora"])
def test_iada_gradient_matches_finite_differences(model, name):
    """Directional derivative of a logit loss along a random direction in IADA's parameters,
    autodiff against a central difference (float32, step 1e-3; agreement to 1%)."""
    exp = dataclasses.replace(_exp(name), lora=None)
    adapters = live_adapters(model, exp, scale=0.5)
    batch = make_batch(model, [ROW_A, ROW_C], loss_from=[8, None])
    vocab = model.config.text.vocab_size
    probe = jnp.asarray(np.random.default_rng(5).normal(size=(2, batch.input_ids.shape[1], vocab)).astype(np.float32))

    @jax.jit
    def f(iada):
        logits, _ = forward(model.params, batch, cfg=model.config, fwd=model.fwd, iada=exp.iada,
                            adapters={"iada": iada})
        return jnp.sum(logits * probe) / 100.0

    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), adapters["iada"])
    grads = jax.grad(f)(adapters["iada"])
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shift = lambda s: jax.tree.map(lambda x, v: x + s * v, adapters["iada"], direction)  # noqa: E731
    numeric = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    assert abs(analytic) > 1e-3, "the probe should depend on IADA's parameters"
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric) + 1e-3, f"{name}: autodiff {analytic:.6f} vs FD {numeric:.6f}"


# ----------------------------------------------------------------------------- program structure


def _scans(jaxpr):
    """(length, body) of every scan primitive, outermost first."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append((eqn.params["length"], eqn.params["jaxpr"].jaxpr))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
            out.extend(_scans(sub))
    return out


def _count_eqns(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += _count_eqns(sub.jaxpr, name)
                elif hasattr(sub, "eqns"):
                    n += _count_eqns(sub, name)
    return n


def test_forward_is_one_scan_over_blocks_whatever_the_depth(tiny_hf):
    """The traced program does not grow with depth: same number of matmuls for 4 and 8 layers,
    and the top level holds one scan of length N = L / S."""
    counts = {}
    for layers in (4, 8):
        cfg = iada_jax.Qwen3VLConfig.tiny(num_hidden_layers=layers)
        fwd = ForwardConfig(block_size=2)
        exp = _exp("D_iada_lora")
        module = iada_jax.model.qwen3_vl.Qwen3VLForConditionalGeneration(cfg, fwd)
        ids = jnp.zeros((1, 6), jnp.int32)
        batch = Batch(input_ids=ids, attention_mask=jnp.ones_like(ids), position_ids=jnp.zeros((3, 1, 6), jnp.int32))
        params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), batch)["params"])
        from iada_jax.model.text import from_block_layout
        params = jax.eval_shape(lambda p: dict(p, model=dict(p["model"], language_model=from_block_layout(
            p["model"]["language_model"]))), params)
        adapters = jax.eval_shape(lambda p: init_adapters(jax.random.PRNGKey(0), p, cfg=cfg, fwd=fwd, lora=exp.lora,
                                                          iada=exp.iada), params)
        jaxpr = jax.make_jaxpr(lambda p, a, b: forward(p, b, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada,
                                                       adapters=a))(params, adapters, batch)
        top = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        assert [e.params["length"] for e in top] == [layers // 2], "one scan over the blocks at the top level"
        counts[layers] = _count_eqns(jaxpr.jaxpr, "dot_general")
    assert counts[4] == counts[8], f"matmuls in the traced program grow with depth: {counts}"


def test_two_experiments_compile_once_each(model):
    traces = []

    def fn(params, adapters, batch, exp_lora, exp_iada):
        traces.append((exp_lora, exp_iada))
        return forward(params, batch, cfg=model.config, fwd=model.fwd, lora=exp_lora, iada=exp_iada,
                       adapters=adapters)[0]

    step = jax.jit(fn, static_argnums=(3, 4))
    for name in ("D_iada_lora", "token_level"):
        exp = _exp(name)
        for seed in range(3):
            adapters = live_adapters(model, exp, seed=seed)
            batch = make_batch(model, [ROW_A, ROW_C], loss_from=[8, 2], pad_to=14)
            step(model.params, adapters, batch, exp.lora, exp.iada).block_until_ready()
    assert len(traces) == 2, f"expected one trace per experiment, got {len(traces)}"


# ----------------------------------------------------------------------------- block sizes, config


@pytest.mark.parametrize("block_size", [1, 4, 7, 14])
def test_every_block_size_of_a_28_layer_stack_runs(block_size):
    cfg = iada_jax.Qwen3VLConfig.tiny(num_hidden_layers=28, hidden_size=32, intermediate_size=48, head_dim=8,
                                      num_attention_heads=4, num_key_value_heads=2)
    fwd = ForwardConfig(block_size=block_size)
    exp = get_experiment("D_iada_lora", block_size=block_size)
    module = iada_jax.model.qwen3_vl.Qwen3VLForConditionalGeneration(cfg, fwd)
    ids = jnp.asarray([[1, 2, cfg.image_token_id, cfg.image_token_id, 3, 4]], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (3, 1, 6))
    batch = Batch(input_ids=ids, attention_mask=jnp.ones_like(ids), position_ids=pos,
                  loss_mask=jnp.asarray([[0, 0, 0, 0, 1, 1]], jnp.int32))
    from iada_jax.model.text import from_block_layout
    p = module.init(jax.random.PRNGKey(0), batch)["params"]
    params = dict(p, model=dict(p["model"], language_model=from_block_layout(p["model"]["language_model"])))
    adapters = init_adapters(jax.random.PRNGKey(1), params, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada)
    base, _ = forward(params, batch, cfg=cfg, fwd=fwd)
    same, _ = forward(params, batch, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada, adapters=adapters)
    assert_float32_identical(same, base)
    adapters["iada"]["gate"] = jnp.ones_like(adapters["iada"]["gate"])
    moved, _ = forward(params, batch, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada, adapters=adapters)
    assert np.isfinite(np.asarray(moved)).all() and np.abs(np.asarray(moved) - np.asarray(base)).max() > 1e-4


def test_block_size_mismatch_and_bad_switches_are_refused(model):
    exp = get_experiment("D_iada_lora", block_size=4)  # the model's forward scans blocks of 2
    batch = make_batch(model, [ROW_B])
    with pytest.raises(ConfigError, match="block_size=4"):
        forward(model.params, batch, cfg=model.config, fwd=model.fwd, iada=exp.iada, adapters={})
    with pytest.raises(ConfigError, match="routing"):
        IadaConfig(routing="sideways")
    with pytest.raises(ConfigError, match="query='fixed'"):
        IadaConfig(routing="text_only_adaptive", query="fixed")
    with pytest.raises(ConfigError, match="shared_projection"):
        IadaConfig(routing="shared", shared_projection=True)
    with pytest.raises(KeyError, match="D_iada_lora"):
        get_experiment("E_unknown")
    assert LoraConfig().r == 16 and IadaConfig().rank == 16


def test_iada_with_real_images_is_padding_invariant_and_reads_the_visual_stream(tiny_hf):
    """Vision features scattered into the placeholders, DeepStack on, IADA on: a sample's logits
    do not depend on its batch-mates or padding, and the visual stream is the placeholder span."""
    from iada_jax.embedded.tiny_hf import SPECIAL_IDS
    path, _ = tiny_hf("vision_merge2", seed=7, layers=4, vision_depth=2, deepstack=(0, 1), merge=2, tied=True)
    vlm = iada_jax.load_pretrained(path, fwd=ForwardConfig(block_size=2))
    exp = _exp("D_iada_lora")
    adapters = live_adapters(vlm, exp)
    rng = np.random.default_rng(0)
    patch_dim = vlm.config.vision.patch_dim
    grid = np.asarray([[1, 4, 4]])
    img = [SPECIAL_IDS["vision_start_token_id"]] + [vlm.config.image_token_id] * 4 + [SPECIAL_IDS["vision_end_token_id"]]
    sample_a = [3, 4] + img + [5, 6, 7, 8, 9]  # answer = the last 3 tokens
    sample_b = [10, 11, 12, 13, 14, 15]
    pv = rng.standard_normal((16, patch_dim)).astype(np.float32)

    def batch_of(rows, side, loss_from):
        t = max(len(r) for r in rows)
        ids = np.zeros((len(rows), t), np.int64)
        mask = np.zeros_like(ids)
        loss = np.zeros_like(ids)
        for b, r in enumerate(rows):
            off = t - len(r) if side == "left" else 0
            ids[b, off:off + len(r)], mask[b, off:off + len(r)] = r, 1
            loss[b, off + loss_from[b]:off + len(r)] = 1
        has_image = any(vlm.config.image_token_id in r for r in rows)
        batch = vlm.make_batch(ids, mask, pixel_values=pv if has_image else None,
                               image_grid_thw=grid if has_image else None)
        return batch.replace(loss_mask=jnp.asarray(loss, jnp.int32)), mask.astype(bool)

    alone_a, _ = batch_of([sample_a], "right", [len(sample_a) - 3])
    alone_b, _ = batch_of([sample_b], "right", [2])
    ref_a, ref_b = run(vlm, exp, adapters, alone_a)[0], run(vlm, exp, adapters, alone_b)[0]
    base_a = run(vlm, dataclasses.replace(exp, lora=None, iada=None), None, alone_a)[0]
    assert np.abs(ref_a - base_a).max() > 1e-2, "live IADA should change the image sample"
    for side in ("left", "right"):
        batch, mask = batch_of([sample_b, sample_a], side, [2, len(sample_a) - 3])
        masks = token_masks(batch.input_ids, batch.attention_mask, batch.loss_mask,
                            (vlm.config.image_token_id, vlm.config.video_token_id))
        assert np.asarray(masks.visual).sum(1).tolist() == [0, 4]
        assert np.asarray(masks.prompt).sum(1).tolist() == [2, len(sample_a) - 3]
        out = run(vlm, exp, adapters, batch)
        for got, ref, m in ((out[0], ref_b, mask[0]), (out[1], ref_a, mask[1])):
            err = np.abs(got[m] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, f"{side} padding: relative diff {err:.2e}"


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialised_forward_and_gradient_equal_the_plain_ones(model, remat):
    exp = _exp("D_iada_lora")
    adapters = live_adapters(model, exp)
    batch = make_batch(model, [ROW_A, ROW_C], loss_from=[8, 2])
    fwd_remat = dataclasses.replace(model.fwd, remat=remat)

    def loss(ad, fwd):
        logits, _ = forward(model.params, batch, cfg=model.config, fwd=fwd, lora=exp.lora, iada=exp.iada, adapters=ad)
        return jnp.mean(logits**2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (v0, g0), (v1, g1) = grad(adapters, model.fwd), grad(adapters, fwd_remat)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bfloat16_forward_with_iada_stays_close_to_float32(model):
    exp = _exp("D_iada_lora")
    adapters = live_adapters(model, exp)
    batch = make_batch(model, [ROW_A, ROW_C], loss_from=[8, 2])
    f32 = run(model, exp, adapters, batch)
    fwd16 = dataclasses.replace(model.fwd, dtype="bfloat16")
    bf16, _ = _forward(model.params, batch, cfg=model.config, fwd=fwd16, lora=exp.lora, iada=exp.iada, adapters=adapters)
    bf16 = np.asarray(bf16, np.float32)
    mask = np.asarray(batch.attention_mask).astype(bool)
    err = np.abs(bf16[mask] - f32[mask])
    print(f"[IADA bf16 vs f32] max {err.max():.3f}, mean {err.mean():.4f}, logit scale {np.abs(f32[mask]).max():.1f}")
    assert np.isfinite(bf16).all() and err.mean() < 0.02 * np.abs(f32[mask]).max()


# ----------------------------------------------------------------------------- memory


def _gradient_temp_states(exp_name: str, n_blocks: int) -> float:
    """XLA's compiled temporary memory of the loss gradient (full remat, float32), in units of
    one block state [B, T, D], for a model of n_blocks IADA boundaries (block size 1)."""
    from convert.random_init import random_params
    from iada_jax.train.loss import next_token_loss

    b, t = 2, 64
    cfg = iada_jax.Qwen3VLConfig.tiny(num_hidden_layers=n_blocks)
    fwd = ForwardConfig(block_size=1, remat="full")
    exp = get_experiment(exp_name, block_size=1)
    params = jax.eval_shape(lambda: random_params(cfg, "float32"))
    adapters = jax.eval_shape(lambda p: init_adapters(jax.random.PRNGKey(0), p, cfg=cfg, fwd=fwd, lora=exp.lora,
                                                      iada=exp.iada), params)
    ids = jnp.zeros((b, t), jnp.int32)
    batch = Batch(input_ids=ids, attention_mask=jnp.ones_like(ids), position_ids=jnp.zeros((3, b, t), jnp.int32),
                  loss_mask=jnp.ones_like(ids))

    def loss(a, p):
        return next_token_loss(forward(p, batch, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada, adapters=a)[0], batch)[0]

    compiled = jax.jit(jax.grad(loss)).lower(adapters, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (b * t * cfg.text.hidden_size * 4)


def test_stored_boundary_states_grow_linearly_with_depth():
    """IADA's extra gradient memory (over LoRA-only) at N = 2, 4, 8 boundaries: the buffer of
    N + 1 states, its shadow and its cotangent, about 3 (N + 1); never a buffer per boundary
    (before iada.read_memory: 11, 29 and 98 states, quadratic)."""
    extra = {n: _gradient_temp_states("D_iada_lora", n) - _gradient_temp_states("B_lora", n) for n in (2, 4, 8)}
    print("[iada memory] extra block states:", {n: round(v, 1) for n, v in extra.items()})
    for n, states in extra.items():
        assert states <= 3 * (n + 1), extra
    assert extra[8] - extra[4] <= 1.5 * 2 * (extra[4] - extra[2]) + 2, extra  # linear increments, not growing
