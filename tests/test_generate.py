"""Generation with the KV cache: greedy decoding equals transformers' generate token for token
(text and images, left padding), cached decode logits equal full-forward logits, IADA's cached
vectors equal recomputing the full forward, stop tokens and sampling behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import iada_jax
from iada_jax.config import ForwardConfig
from iada_jax.evaluation.generate import GenerationConfig, generate
from iada_jax.experiments import get_experiment
from iada_jax.embedded.tiny_hf import SPECIAL_IDS, TEXT_VOCAB

IMG = SPECIAL_IDS["image_token_id"]
VISION = [SPECIAL_IDS["vision_start_token_id"]] + [IMG] * 4 + [SPECIAL_IDS["vision_end_token_id"]]
SUPPRESS = tuple(range(TEXT_VOCAB, 300))  # special ids: a generated placeholder would need pixels
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    path, hf = tiny_hf("vision_merge2", seed=7, layers=4, vision_depth=2, deepstack=(0, 1), merge=2, tied=True)
    return iada_jax.load_pretrained(path, fwd=ForwardConfig(block_size=2)), hf


def prompts(with_image: bool):
    rows = [[3, 4] + (VISION if with_image else [40, 41]) + [5, 6, 7], [11, 12, 13, 14]]
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, t - len(r):], mask[b, t - len(r):] = r, 1
    pv = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32) if with_image else None
    grid = np.asarray([[1, 4, 4]]) if with_image else None
    return ids, mask, pv, grid


def hf_generate(hf, ids, mask, pv, grid, steps=STEPS):
    kw = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    if pv is not None:
        kw.update(pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid),
                  mm_token_type_ids=torch.as_tensor((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          suppress_tokens=list(SUPPRESS), return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).numpy()


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_decode_equals_transformers_generate(tiny, with_image):
    model, hf = tiny
    ids, mask, pv, grid = prompts(with_image)
    tokens, logits = generate(model, ids, mask, pv, grid, return_logits=True,
                              config=GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS))
    ref_tokens, ref_logits = hf_generate(hf, ids, mask, pv, grid)
    np.testing.assert_array_equal(tokens, ref_tokens)
    err = np.abs(logits - ref_logits).max()
    print(f"[generate] image={with_image}: tokens equal, max |logits - HF| = {err:.2e}")
    assert err < 1e-4


def test_cached_decode_logits_equal_full_forward_logits(tiny):
    model, _ = tiny
    ids, mask, pv, grid = prompts(True)
    tokens, logits = generate(model, ids, mask, pv, grid, return_logits=True,
                              config=GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS))
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    full = model.logits(full_ids, full_mask, pv, grid)[:, ids.shape[1] - 1:-1]
    assert np.abs(full - logits).max() < 1e-4


@pytest.mark.parametrize("name", ["D_iada_lora", "adaptive_gate", "adaptive_no_split"])
def test_iada_cached_vectors_equal_recomputing_the_full_forward(tiny, name):
    from test_iada import live_adapters

    model, _ = tiny
    exp = get_experiment(name, block_size=2)
    adapters = live_adapters(model, exp, seed=2, scale=0.1)
    ids, mask, pv, grid = prompts(True)
    cfg = GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS)
    kw = dict(config=cfg, lora=exp.lora, iada=exp.iada, adapters=adapters, return_logits=True)
    tokens, logits = generate(model, ids, mask, pv, grid, **kw)
    ref_tokens, ref_logits = generate(model, ids, mask, pv, grid, recompute=True, **kw)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert np.abs(logits - ref_logits).max() < 1e-4
    plain = generate(model, ids, mask, pv, grid, config=cfg, return_logits=True)[1]
    assert np.abs(plain[:, 0] - logits[:, 0]).max() > 1e-2


@pytest.mark.parametrize("name", ["D_causal_scope", "token_level", "D_full_scope"])
def test_iada_settings_without_cached_vectors_decode_by_recomputing(tiny, name):
    """No KV shortcut for these: generate recomputes, and equals a Python loop of full forwards."""
    import jax.numpy as jnp
    from test_iada import live_adapters

    from iada_jax.model.qwen3_vl import forward

    model, _ = tiny
    exp = get_experiment(name, block_size=2)
    adapters = live_adapters(model, exp, seed=2, scale=0.1)
    ids, mask, pv, grid = prompts(False)
    tokens = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=3, suppress_token_ids=SUPPRESS),
                      lora=exp.lora, iada=exp.iada, adapters=adapters)
    cur_ids, cur_mask = ids, mask
    for _ in range(3):
        batch = model.make_batch(cur_ids, cur_mask)
        loss = np.zeros_like(cur_ids)
        loss[:, ids.shape[1]:] = 1
        logits, _ = forward(model.params, batch.replace(loss_mask=jnp.asarray(loss, jnp.int32)), cfg=model.config,
                            fwd=model.fwd, lora=exp.lora, iada=exp.iada, adapters=adapters)
        nxt = np.asarray(logits)[:, -1, :TEXT_VOCAB].argmax(-1)
        cur_ids = np.concatenate([cur_ids, nxt[:, None]], 1)
        cur_mask = np.concatenate([cur_mask, np.ones_like(nxt)[:, None]], 1)
    np.testing.assert_array_equal(tokens, cur_ids[:, ids.shape[1]:])


def test_stop_tokens_end_a_sample_and_the_rest_go_on(tiny):
    model, _ = tiny
    ids, mask, _, _ = prompts(False)
    free = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS))
    stop = int(free[0, 0])  # sample 0 stops at once; sample 1 never makes this token
    assert stop not in free[1].tolist()
    out = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS,
                                                             stop_token_ids=(stop,), pad_token_id=-1))
    for row, ref in zip(out.tolist(), free.tolist()):
        cut = ref.index(stop) + 1 if stop in ref else STEPS  # the stop token is kept, then padding
        assert row == ref[:cut] + [-1] * (STEPS - cut)
    assert (out[0, 1:] == -1).all() and (out[1] != -1).all()
    both = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS,
                                                              stop_token_ids=(stop, int(free[1, 0])), pad_token_id=-1))
    assert both[:, 0].tolist() == free[:, 0].tolist() and (both[:, 1:] == -1).all()


def test_sampling_is_seeded_and_its_limits_are_greedy(tiny):
    model, _ = tiny
    ids, mask, _, _ = prompts(False)
    greedy = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS))
    hot = dict(max_new_tokens=STEPS, suppress_token_ids=SUPPRESS, temperature=1.0)
    a = generate(model, ids, mask, config=GenerationConfig(**hot, seed=1))
    b = generate(model, ids, mask, config=GenerationConfig(**hot, seed=1))
    c = generate(model, ids, mask, config=GenerationConfig(**dict(hot, temperature=5.0), seed=2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(generate(model, ids, mask, config=GenerationConfig(**hot, top_k=1)), greedy)
    np.testing.assert_array_equal(generate(model, ids, mask, config=GenerationConfig(**hot, top_p=1e-6)), greedy)


def test_right_padded_prompts_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, np.array([[3, 4, 0]]), np.array([[1, 1, 0]]))


def test_cache_schedule_doubles_up_to_the_budget():
    from iada_jax.evaluation.generate import cache_schedule

    assert cache_schedule(16) == [16] and cache_schedule(1024) == [1024]
    assert cache_schedule(16384) == [1024, 2048, 4096, 8192, 16384]
    assert cache_schedule(3000) == [1024, 2048, 3000] and cache_schedule(7, segment=2) == [2, 4, 7]


def test_a_growing_cache_decodes_as_one_sized_for_the_whole_budget(tiny, monkeypatch):
    """Segments of 2 new tokens (the cache grown 2 -> 4 -> 7) give the tokens and logits of one
    cache of 7; when every row has stopped the cache is not grown again."""
    from iada_jax.evaluation import generate as gen_module

    model, _ = tiny
    ids, mask, pv, grid = prompts(True)
    cfg = GenerationConfig(max_new_tokens=7, suppress_token_ids=SUPPRESS)
    whole_tokens, whole_logits = generate(model, ids, mask, pv, grid, config=cfg, return_logits=True)
    grown = []
    grow = gen_module._grow
    monkeypatch.setattr(gen_module, "SEGMENT", 2)
    monkeypatch.setattr(gen_module, "_grow", lambda cache, length: grown.append(length) or grow(cache, length=length))
    tokens, logits = generate(model, ids, mask, pv, grid, config=cfg, return_logits=True)
    np.testing.assert_array_equal(tokens, whole_tokens)
    assert np.abs(logits - whole_logits).max() < 1e-5
    assert grown == [ids.shape[1] + n for n in (4, 7)]
    grown.clear()
    stop = (int(whole_tokens[0, 1]), int(whole_tokens[1, 1]))  # both rows stop at their second token
    out = generate(model, ids, mask, pv, grid, config=GenerationConfig(
        max_new_tokens=7, suppress_token_ids=SUPPRESS, stop_token_ids=stop, pad_token_id=-1))
    assert (out[:, 2:] == -1).all() and grown == []
