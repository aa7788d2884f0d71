"""Sequence packing: a packed batch gives every sample the logits and the adapter gradients it
gets alone (float32, LoRA + IADA and its ablations, text and image samples, several samples a
row); a change to one sample reaches no other; the planner places every usable row exactly
once per epoch, deterministically; training with --pack resumes bit-identically."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iada_jax
from iada_jax.config import ForwardConfig
from iada_jax.data.loader import collate
from iada_jax.data.packing import collate_packed, pack, packing_stats
from iada_jax.data.sft import Example
from iada_jax.embedded.tiny_hf import SPECIAL_IDS, TEXT_VOCAB
from iada_jax.experiments import get_experiment
from iada_jax.model.qwen3_vl import forward
from iada_jax.train.loss import next_token_logprobs, supervised_weights

from test_iada import live_adapters

IMG = SPECIAL_IDS["image_token_id"]
VISION = [SPECIAL_IDS["vision_start_token_id"]] + [IMG] * 4 + [SPECIAL_IDS["vision_end_token_id"]]


@pytest.fixture(scope="module")
def model(tiny_hf):
    path, _ = tiny_hf("vision_merge2", seed=7, layers=4, vision_depth=2, deepstack=(0, 1), merge=2, tied=True)
    return iada_jax.load_pretrained(path, fwd=ForwardConfig(block_size=2))


def example(model, rng, before: int, images: int, after: int, answer: int) -> Example:
    """Random text, `images` 4-token images (16 patches of 4 x 4), more text; the last
    `answer` tokens supervised."""
    ids = list(rng.integers(3, TEXT_VOCAB, before))
    for _ in range(images):
        ids += VISION + list(rng.integers(3, TEXT_VOCAB, 2))
    ids += list(rng.integers(3, TEXT_VOCAB, after))
    loss = np.zeros(len(ids), np.int32)
    loss[-answer:] = 1
    pixels = grid = None
    if images:
        pixels = rng.standard_normal((16 * images, model.config.vision.patch_dim)).astype(np.float32)
        grid = np.asarray([[1, 4, 4]] * images)
    return Example(np.asarray(ids, np.int32), loss, pixels, grid)


@pytest.fixture(scope="module")
def samples(model):
    rng = np.random.default_rng(3)
    return [example(model, rng, 5, 1, 4, 3),   # image
            example(model, rng, 9, 0, 0, 4),   # text only
            example(model, rng, 3, 2, 3, 2),   # two images
            example(model, rng, 4, 0, 2, 5),   # text only
            example(model, rng, 2, 1, 1, 2)]   # image


ROWS = [[0, 1], [2, 3, 4]]  # the packed layout: two rows of 2 and 3 samples
PACKED_LENGTH, ALONE_LENGTH, K = 64, 32, 4


def alone_and_packed(model, samples):
    alone = collate(samples, ALONE_LENGTH, model.config, max_images=2)
    packed = collate_packed([[samples[i] for i in r] for r in ROWS], PACKED_LENGTH, model.config, K)
    return alone, packed


def spans():
    """(sample index, packed row, slice in that row)."""
    return [(i, r, k) for r, row in enumerate(ROWS) for k, i in enumerate(row)]


@functools.partial(jax.jit, static_argnames=("cfg", "fwd", "lora", "iada"))
def _logits(params, adapters, batch, *, cfg, fwd, lora, iada):
    return forward(params, batch, cfg=cfg, fwd=fwd, lora=lora, iada=iada, adapters=adapters)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "fwd", "lora", "iada"))
def _grads(params, adapters, batch, weights, *, cfg, fwd, lora, iada):
    """d/d adapters of the summed next-token NLL over `weights` [B, T - 1]."""
    def loss(ad):
        logits = forward(params, batch, cfg=cfg, fwd=fwd, lora=lora, iada=iada, adapters=ad)[0]
        return -(next_token_logprobs(logits, batch.input_ids) * weights).sum()
    return jax.grad(loss)(adapters)


def _run(model, exp, adapters, batch, fn=_logits, *args):
    return fn(model.params, adapters, jax.tree.map(jnp.asarray, batch), *args, cfg=model.config, fwd=model.fwd,
              lora=exp.lora, iada=exp.iada)


def _where(packed, r, k):
    seg = np.asarray(packed.segment_ids)[r]
    return np.flatnonzero(seg == k + 1)


# D and every per-sample path of the operator: the causal scope (restarting scans), token-level
# queries, depth-only attention, the adaptive gate, attention pooling, a fixed query (C). (The
# full scope and cross-modal routing change which mask or context feeds the same paths.)
EXPERIMENTS = ["D_iada_lora", "D_causal_scope", "token_level", "D_attend_depth", "adaptive_gate",
               "attention_pooling", "C_attnres_lora"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_packed_sample_gets_the_logits_it_gets_alone(model, samples, name):
    exp = get_experiment(name, block_size=2)
    adapters = live_adapters(model, exp, seed=2, scale=0.2)
    alone, packed = alone_and_packed(model, samples)
    got, ref = np.asarray(_run(model, exp, adapters, packed)), np.asarray(_run(model, exp, adapters, alone))
    base = np.asarray(_run(model, dataclasses.replace(exp, lora=None, iada=None), None, alone))
    for i, r, k in spans():
        n = len(samples[i].input_ids)
        where = _where(packed, r, k)
        assert len(where) == n
        err = np.abs(got[r, where] - ref[i, :n]).max() / np.abs(ref[i, :n]).max()
        assert err < 1e-5, f"{name}: sample {i} (row {r}) relative diff {err:.2e}"
    assert np.abs(ref - base).max() > 1e-2, "the adapters should change the logits"


@pytest.mark.parametrize("name", ["D_iada_lora", "D_causal_scope"])
def test_a_packed_sample_gets_the_adapter_gradients_it_gets_alone(model, samples, name):
    exp = get_experiment(name, block_size=2)
    adapters = live_adapters(model, exp, seed=2, scale=0.2)
    alone, packed = alone_and_packed(model, samples)
    alone_w = np.asarray(supervised_weights(jax.tree.map(jnp.asarray, alone)))
    packed_w = np.asarray(supervised_weights(jax.tree.map(jnp.asarray, packed)))
    seg = np.asarray(packed.segment_ids)[:, 1:]
    assert packed_w.sum() == alone_w.sum() == sum(int(s.loss_mask[1:].sum()) for s in samples)
    for i, r, k in spans():
        w_alone = np.zeros_like(alone_w)
        w_alone[i] = alone_w[i]
        w_packed = np.where((np.arange(len(ROWS))[:, None] == r) & (seg == k + 1), packed_w, 0.0)
        ref = _run(model, exp, adapters, alone, _grads, jnp.asarray(w_alone))
        got = _run(model, exp, adapters, packed, _grads, jnp.asarray(w_packed))
        scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(ref))
        err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                  zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
        assert scale > 0 and err / scale < 1e-5, f"{name}: sample {i} gradient relative diff {err / scale:.2e}"


def test_a_change_to_one_sample_reaches_no_other(model, samples):
    exp = get_experiment("D_iada_lora", block_size=2)
    adapters = live_adapters(model, exp, seed=2, scale=0.2)
    _, packed = alone_and_packed(model, samples)
    rng = np.random.default_rng(9)
    changed = list(samples)
    s = samples[3]
    changed[3] = dataclasses.replace(s, input_ids=rng.integers(3, TEXT_VOCAB, len(s.input_ids)).astype(np.int32))
    _, packed2 = alone_and_packed(model, changed)
    a, b = np.asarray(_run(model, exp, adapters, packed)), np.asarray(_run(model, exp, adapters, packed2))
    for i, r, k in spans():
        where = _where(packed, r, k)
        diff = np.abs(a[r, where] - b[r, where]).max()
        if i == 3:
            assert diff > 1e-2
        else:
            assert diff <= 1e-6 * np.abs(a[r, where]).max(), f"sample {i} moved by {diff:.2e}"


def test_packed_rows_hold_their_samples_positions_and_images(model, samples):
    _, packed = alone_and_packed(model, samples)
    lengths = np.asarray(packed.sample_lengths)
    assert lengths.tolist() == [[len(samples[i].input_ids) for i in r] + [0] * (K - len(r)) for r in ROWS]
    index = np.asarray(packed.visual_index)
    real = index[index < packed.input_ids.size]  # every visual token of every sample, none twice
    np.testing.assert_array_equal(np.sort(real), np.flatnonzero(np.asarray(packed.input_ids) == IMG))
    for i, r, k in spans():
        alone = collate([samples[i]], ALONE_LENGTH, model.config, max_images=2)
        where = _where(packed, r, k)
        n = len(where)
        np.testing.assert_array_equal(np.asarray(packed.position_ids)[:, r, where],
                                      np.asarray(alone.position_ids)[:, 0, :n])
    first = [where[0] for _, r, k in spans() for where in [_where(packed, r, k)]]
    w = np.asarray(supervised_weights(jax.tree.map(jnp.asarray, packed)))
    for (_, r, _), start in zip(spans(), first):
        if start > 0:
            assert w[r, start - 1] == 0  # a sample's first token is no one's target


# ----------------------------------------------------------------------------- planning
def test_pack_places_every_row_once_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 500, 1000)
    images = rng.integers(0, 2, 1000)
    order = rng.permutation(1000)
    plan = pack(order, lengths, images, capacity=1024, max_samples=8, max_images=4, window=256)
    flat = sorted(i for row in plan for i in row)
    assert flat == list(range(1000))
    assert all(lengths[row].sum() <= 1024 and len(row) <= 8 and images[row].sum() <= 4 for row in plan)
    assert plan == pack(order, lengths, images, 1024, 8, 4, 256)
    stats = packing_stats(plan, lengths, 1024)
    assert stats["real_fraction"] > 0.95, stats
    with pytest.raises(ValueError, match="row 3: 2000 tokens"):
        pack(np.asarray([3]), np.asarray([0, 0, 0, 2000]), np.zeros(4, int), 1024, 8, 4, 16)


# ----------------------------------------------------------------------------- the loader and train.py
def test_a_packed_epoch_visits_every_usable_row_exactly_once(embedded):
    from iada_jax.data.loader import DataConfig, SFTData
    from test_data import image_cfg

    _, data_path, tok, model = embedded
    cfg = DataConfig(path=data_path, max_length=256, batch_size=4, seed=3, pack=True, pack_samples=4, pack_window=16)
    data = SFTData(cfg, tok, image_cfg(), model.config, log=lambda *a: None)
    for epoch in (0, 1):
        plan = data.epoch_plan(epoch)
        assert plan == data.epoch_plan(epoch)
        rows = sorted(i for _, batch in plan for packed in batch for i in packed)
        assert rows == sorted(data.usable_rows.tolist())  # every usable row once, none dropped
        assert all(length == 256 and len(batch) == 4 for length, batch in plan)
        assert all(data.index.lengths[p].sum() <= 256 and len(p) <= 4 for _, b in plan for p in b if p)
    assert data.epoch_plan(0) != data.epoch_plan(1)
    (pos, batch), = [x for _, x in zip(range(1), data.iterate(start=(0, 1)))]
    length, packed = data.epoch_plan(0)[1]
    assert pos == (0, 1) and batch.input_ids.shape == (4, 256)
    assert np.asarray(batch.sample_lengths).sum(1).tolist() == [int(data.index.lengths[p].sum()) for p in packed]


def test_a_killed_packed_run_resumes_bit_identically(embedded, tmp_path):
    import os
    import shutil

    from test_train import config, quiet

    from iada_jax.train.loop import fit

    kw = dict(steps=4, batch_size=2, save_every=2, block_size=2, pack=True, pack_samples=4, max_length=256,
              buckets=())
    straight = fit(config(embedded, tmp_path / "straight", **kw), log=quiet)
    run = tmp_path / "killed"
    fit(config(embedded, run, stop_after=3, **kw), log=quiet)
    shutil.rmtree(run / "checkpoints" / "3")
    resumed = fit(config(embedded, run, resume=True, **kw), log=quiet)
    assert resumed["step"] == 4 and straight["losses"][2:] == resumed["losses"][-2:]
    for a, b in zip(jax.tree.leaves(straight["trainable"]), jax.tree.leaves(resumed["trainable"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isdir(run / "final")
