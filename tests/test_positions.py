"""iada_jax.positions.get_rope_index vs. HF Qwen3VLModel.get_rope_index (the spec)."""

import numpy as np
import pytest
import torch

from iada_jax.positions import get_rope_index

IMG, VID, VS, VE = 290, 291, 292, 293
MERGE = 2
KW = dict(image_token_id=IMG, video_token_id=VID, spatial_merge_size=MERGE)


@pytest.fixture(scope="module")
def hf():
    from transformers import Qwen3VLConfig, Qwen3VLModel

    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 4, 4], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
    )
    assert cfg.vision_config.spatial_merge_size == MERGE
    return Qwen3VLModel(cfg).eval()


# --- sequence builders, mimicking the HF processor -------------------------------------

def text(rng, n):
    return [int(x) for x in rng.integers(0, 280, n)]


def image(t, h, w):
    return [VS] + [IMG] * (t * h * w // MERGE**2) + [VE]


def video(rng, t, h, w):
    # Qwen3-VL processor: per frame, timestamp text then <vs> frame tokens <ve>.
    out = []
    for _ in range(t):
        out += text(rng, 3) + [VS] + [VID] * (h * w // MERGE**2) + [VE]
    return out


def pad_batch(seqs, side):
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    return ids, mask


def grids(g):
    return None if not g else np.asarray(g, np.int64)


def hf_ref(hf, ids, mask, img, vid):
    tt = lambda a: None if a is None else torch.as_tensor(a)
    mm = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    with torch.no_grad():
        pos, delta = hf.get_rope_index(
            torch.as_tensor(ids), mm_token_type_ids=torch.as_tensor(mm), image_grid_thw=tt(img),
            video_grid_thw=tt(vid), attention_mask=tt(mask),
        )
    return pos.numpy(), delta.numpy()


def check(hf, seqs, img=(), vid=(), side="right"):
    ids, mask = pad_batch(seqs, side)
    img, vid = grids(img), grids(vid)
    pos, delta = get_rope_index(ids, mask, img, vid, **KW)
    assert pos.dtype == np.int32 and pos.shape == (3, *ids.shape)
    assert delta.dtype == np.int32 and delta.shape == (len(seqs), 1)
    ref_pos, ref_delta = hf_ref(hf, ids, mask, img, vid)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], ref_pos[:, valid])
    np.testing.assert_array_equal(delta, ref_delta)
    np.testing.assert_array_equal(pos[:, ~valid], 0)  # padding is 0, as in HF v5
    return pos, delta


# --- parity with HF ---------------------------------------------------------------------

def test_text_only(hf):
    rng = np.random.default_rng(0)
    pos, delta = check(hf, [text(rng, 9)])
    np.testing.assert_array_equal(pos[:, 0], np.tile(np.arange(9), (3, 1)))
    assert delta[0, 0] == 0


def test_single_image(hf):
    rng = np.random.default_rng(1)
    check(hf, [text(rng, 4) + image(1, 4, 6) + text(rng, 3)], img=[(1, 4, 6)])


def test_two_images_different_grids(hf):
    rng = np.random.default_rng(2)
    seq = text(rng, 2) + image(1, 4, 6) + text(rng, 3) + image(1, 6, 2) + text(rng, 2)
    check(hf, [seq], img=[(1, 4, 6), (1, 6, 2)])


def test_video_three_frames(hf):
    rng = np.random.default_rng(3)
    check(hf, [text(rng, 3) + video(rng, 3, 4, 4) + text(rng, 2)], vid=[(3, 4, 4)])


def test_image_and_video(hf):
    rng = np.random.default_rng(4)
    seq = text(rng, 2) + image(1, 2, 4) + text(rng, 2) + video(rng, 2, 4, 6) + text(rng, 1)
    check(hf, [seq], img=[(1, 2, 4)], vid=[(2, 4, 6)])


def test_image_with_several_temporal_patches(hf):
    # HF quirk: T runs start..start+t-1 but the cursor only advances by max(h, w)/merge.
    rng = np.random.default_rng(7)
    check(hf, [text(rng, 2) + image(3, 4, 4) + text(rng, 2)], img=[(3, 4, 4)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(hf, side):
    rng = np.random.default_rng(5)
    seqs = [
        text(rng, 5),
        text(rng, 2) + image(1, 4, 4) + text(rng, 2),
        text(rng, 1) + image(1, 4, 6) + text(rng, 1) + image(1, 2, 2) + text(rng, 3),
    ]
    check(hf, seqs, img=[(1, 4, 4), (1, 4, 6), (1, 2, 2)], side=side)


def test_no_attention_mask_means_all_valid(hf):
    rng = np.random.default_rng(6)
    ids = np.asarray([text(rng, 3) + image(1, 4, 4) + text(rng, 2)])
    pos, delta = get_rope_index(ids, None, grids([(1, 4, 4)]), None, **KW)
    ref_pos, ref_delta = hf_ref(hf, ids, None, grids([(1, 4, 4)]), None)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)


# --- worked example and extensions ------------------------------------------------------

def test_worked_example():
    ids = np.asarray([[1, 2, 3, VS] + [IMG] * 6 + [VE, 4, 5]])
    pos, delta = get_rope_index(ids, None, grids([(1, 4, 6)]), None, **KW)
    np.testing.assert_array_equal(pos[:, 0], [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9],
    ])
    assert delta[0, 0] == -3


def test_padding_positions_are_zero():
    ids = np.asarray([[0, 0, 7, VS, IMG, VE, 8], [7, 8, 9, 10, 11, 0, 0]])
    mask = np.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    pos, delta = get_rope_index(ids, mask, grids([(1, 2, 2)]), None, **KW)
    np.testing.assert_array_equal(pos[:, 0, :2], 0)
    np.testing.assert_array_equal(pos[:, 1, 5:], 0)
    np.testing.assert_array_equal(pos[:, 1, :5], np.tile(np.arange(5), (3, 1)))
    np.testing.assert_array_equal(delta, [[0], [0]])


def test_consecutive_images_in_one_run():
    # HF would give the whole run one grid; we split it: (1,4,4) -> 2x2, then (1,2,2) -> 1x1.
    ids = np.asarray([[5] + [IMG] * 4 + [IMG] + [6]])
    pos, delta = get_rope_index(ids, None, grids([(1, 4, 4), (1, 2, 2)]), None, **KW)
    np.testing.assert_array_equal(pos[:, 0], [
        [0, 1, 1, 1, 1, 3, 4],
        [0, 1, 1, 2, 2, 3, 4],
        [0, 1, 2, 1, 2, 3, 4],
    ])
    assert delta[0, 0] == 4 + 1 - 7


# --- errors: the bad sample is at index 1 -----------------------------------------------

def _two(good, bad):
    return pad_batch([good, bad], "right")


@pytest.mark.parametrize("case", ["more_placeholders", "grids_left_over", "run_too_short",
                                  "run_too_long", "video_left_over", "not_divisible"])
def test_errors_name_the_sample(case):
    good = [1, 2] + image(1, 4, 4) + [3]
    img, vid = [(1, 4, 4), (1, 4, 4)], None
    if case == "more_placeholders":
        bad, img = [4] + image(1, 4, 4) + [5], [(1, 4, 4)]
    elif case == "grids_left_over":
        bad = [4, 5, 6]
    elif case == "run_too_short":
        bad = [4, VS] + [IMG] * 3 + [VE]
    elif case == "run_too_long":
        bad = [4, VS] + [IMG] * 5 + [VE]
    elif case == "video_left_over":
        bad, img, vid = [4, 5], [(1, 4, 4)], [(2, 4, 4)]
    else:
        bad, img = [4] + [VS, IMG, IMG, IMG, VE], [(1, 4, 4), (1, 2, 3)]
    ids, mask = _two(good, bad)
    with pytest.raises(ValueError, match="sample 1") as err:
        get_rope_index(ids, mask, grids(img), grids(vid), **KW)
    assert EXPECTED[case] in str(err.value)


EXPECTED = {
    "more_placeholders": "no image grid left",
    "grids_left_over": "image grid(s) left unused",
    "run_too_short": "the run length does not match",
    "run_too_long": "no image grid left",
    "video_left_over": "video grid(s) (counted per frame) left unused",
    "not_divisible": "not divisible by spatial_merge_size",
}
