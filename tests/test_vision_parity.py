"""float32 parity of the vision tower, DeepStack and the multimodal forward with transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import iada_jax
from iada_jax.embedded.tiny_hf import SPECIAL_IDS, TEXT_VOCAB

TOL = 1e-4
VS, VE = SPECIAL_IDS["vision_start_token_id"], SPECIAL_IDS["vision_end_token_id"]
IMG, VID = SPECIAL_IDS["image_token_id"], SPECIAL_IDS["video_token_id"]
PATCH_DIM = 3 * 2 * 4 * 4

CONFIGS = {
    # merge 2, DeepStack after vision blocks 0 and 1, tied head, GQA
    "merge2": dict(layers=4, vision_depth=2, deepstack=(0, 1), merge=2, tied=True),
    # merge 3, a single DeepStack tap at block 1 of 3, untied head, MQA, 6 layers
    "merge3": dict(layers=6, vision_depth=3, deepstack=(1,), merge=3, tied=False, kv_heads=1, head_dim=16,
                   mrope=(2, 3, 3)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tiny_hf):
    path, hf = tiny_hf(f"vision_{request.param}", seed=7, **CONFIGS[request.param])
    return iada_jax.load_pretrained(path), hf, CONFIGS[request.param]["merge"]


def text(rng, n):
    return list(rng.integers(0, TEXT_VOCAB, n))


def image_tokens(grid, merge):
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // merge**2) + [VE]


def video_tokens(rng, grid, merge):
    """Per frame: timestamp text, then <vs> video pads <ve> (the Qwen3-VL processor's layout)."""
    t, h, w = grid
    out = []
    for _ in range(t):
        out += text(rng, 3) + [VS] + [VID] * (h * w // merge**2) + [VE]
    return out


def pixels(rng, grids):
    n = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)


def pad(samples, side):
    t = max(len(s) for s in samples)
    ids = np.zeros((len(samples), t), np.int64)
    mask = np.zeros_like(ids)
    for b, s in enumerate(samples):
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    return ids, mask


def hf_forward(hf, ids, mask=None, pv=None, grid=None, pvv=None, vgrid=None):
    tt = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    t = lambda x: None if x is None else torch.as_tensor(x)  # noqa: E731
    with torch.no_grad():
        return hf(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(pv), image_grid_thw=t(grid),
                  pixel_values_videos=t(pvv), video_grid_thw=t(vgrid), mm_token_type_ids=t(tt)).logits.numpy()


def assert_close(ours, ref, mask=None, tol=TOL):
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    err = np.abs(ours - ref).max()
    assert err <= tol, f"max abs diff {err:.2e}"
    return err


def grids_for(merge):
    m = merge
    return [(1, 2 * m, 3 * m), (1, 3 * m, m)]  # two images of different sizes and aspect


def test_vision_tower_and_each_deepstack_feature(pair):
    ours, hf, m = pair
    rng = np.random.default_rng(0)
    grid = np.array(grids_for(m) + [(2, m, 2 * m)])  # two images and a 2-frame video in one pack
    pv = pixels(rng, grid)
    merged, deepstack = ours.vision_features(pv, grid)
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.as_tensor(pv), torch.as_tensor(grid))
    assert_close(merged, torch.cat(ref.pooler_output).numpy())
    assert len(deepstack) == len(ref.deepstack_features) == len(hf.config.vision_config.deepstack_visual_indexes)
    for k, feat in enumerate(ref.deepstack_features):
        assert_close(deepstack[k], torch.cat(feat).numpy())


def test_one_image(pair):
    ours, hf, m = pair
    rng = np.random.default_rng(1)
    grid = np.array([grids_for(m)[0]])
    ids = np.array([text(rng, 3) + image_tokens(grid[0], m) + text(rng, 4)])
    pv = pixels(rng, grid)
    assert_close(ours.logits(ids, pixel_values=pv, image_grid_thw=grid), hf_forward(hf, ids, pv=pv, grid=grid))


def test_two_images_of_different_sizes_in_one_sample(pair):
    ours, hf, m = pair
    rng = np.random.default_rng(2)
    grid = np.array(grids_for(m))
    ids = np.array([text(rng, 2) + image_tokens(grid[0], m) + text(rng, 3) + image_tokens(grid[1], m) + text(rng, 2)])
    pv = pixels(rng, grid)
    assert_close(ours.logits(ids, pixel_values=pv, image_grid_thw=grid), hf_forward(hf, ids, pv=pv, grid=grid))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_mixing_image_two_images_and_text_only(pair, side):
    ours, hf, m = pair
    rng = np.random.default_rng(3)
    g = grids_for(m)
    samples = [
        text(rng, 2) + image_tokens(g[1], m) + text(rng, 5),
        text(rng, 1) + image_tokens(g[0], m) + text(rng, 2) + image_tokens(g[1], m) + text(rng, 1),
        text(rng, 6),
    ]
    grid = np.array([g[1], g[0], g[1]])
    ids, mask = pad(samples, side)
    pv = pixels(rng, grid)
    ref = hf_forward(hf, ids, mask, pv=pv, grid=grid)
    assert_close(ours.logits(ids, mask, pixel_values=pv, image_grid_thw=grid), ref, mask)


def test_video(pair):
    ours, hf, m = pair
    rng = np.random.default_rng(4)
    vgrid = np.array([(3, 2 * m, m)])
    ids = np.array([text(rng, 2) + video_tokens(rng, vgrid[0], m) + text(rng, 3)])
    pvv = pixels(rng, vgrid)
    assert_close(ours.logits(ids, pixel_values_videos=pvv, video_grid_thw=vgrid),
                 hf_forward(hf, ids, pvv=pvv, vgrid=vgrid))


def test_image_and_video_in_one_sample(pair):
    ours, hf, m = pair
    rng = np.random.default_rng(5)
    grid, vgrid = np.array([grids_for(m)[1]]), np.array([(2, m, 2 * m)])
    ids = np.array([text(rng, 2) + video_tokens(rng, vgrid[0], m) + text(rng, 1) + image_tokens(grid[0], m)
                    + text(rng, 2)])
    pv, pvv = pixels(rng, grid), pixels(rng, vgrid)
    assert_close(ours.logits(ids, pixel_values=pv, image_grid_thw=grid, pixel_values_videos=pvv, video_grid_thw=vgrid),
                 hf_forward(hf, ids, pv=pv, grid=grid, pvv=pvv, vgrid=vgrid))


def _image_case(m, seed=6):
    rng = np.random.default_rng(seed)
    grid = np.array(grids_for(m))
    ids = np.array([text(rng, 2) + image_tokens(grid[0], m) + text(rng, 2) + image_tokens(grid[1], m) + text(rng, 4)])
    return ids, pixels(rng, grid), grid


def test_deepstack_changes_the_logits_measurably(pair, monkeypatch):
    """Parity above would not catch a port without DeepStack unless DeepStack matters here."""
    ours, hf, m = pair
    ids, pv, grid = _image_case(m)
    ref = hf_forward(hf, ids, pv=pv, grid=grid)
    monkeypatch.setattr(type(hf.model.language_model), "_deepstack_process", lambda self, h, *_: h)
    without = hf_forward(hf, ids, pv=pv, grid=grid)
    assert np.abs(without - ref).max() > 1e-2, "DeepStack barely changes the tiny model's logits"
    assert_close(ours.logits(ids, pixel_values=pv, image_grid_thw=grid), ref)


def test_mrope_changes_the_logits_measurably(pair):
    """With 1-D positions (cumsum of the mask on all three rows) the logits must move away from HF."""
    ours, hf, m = pair
    ids, pv, grid = _image_case(m)
    ref = hf_forward(hf, ids, pv=pv, grid=grid)
    batch = ours.make_batch(ids, pixel_values=pv, image_grid_thw=grid)
    one_d = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), batch.position_ids.shape)
    logits_1d, _ = ours._jitted(ours.params, batch.replace(position_ids=one_d), cfg=ours.config, fwd=ours.fwd)
    assert np.abs(np.asarray(logits_1d) - ref).max() > 1e-2
    logits, _ = ours._jitted(ours.params, batch, cfg=ours.config, fwd=ours.fwd)
    assert_close(np.asarray(logits), ref)


def test_vision_tower_is_frozen(pair):
    """No gradient reaches the vision parameters (stop_gradient on the tower's outputs)."""
    from iada_jax.model.qwen3_vl import forward

    ours, _, m = pair
    ids, pv, grid = _image_case(m)
    batch = ours.make_batch(ids, pixel_values=pv, image_grid_thw=grid)
    grads = jax.grad(lambda p: forward(p, batch, cfg=ours.config, fwd=ours.fwd)[0].astype(jnp.float32).sum())(ours.params)
    assert all(float(abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["model"]["visual"]))
    assert float(abs(grads["model"]["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]).max()) > 0

