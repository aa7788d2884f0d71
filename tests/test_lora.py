"""LoRA: PEFT semantics, checked against a PEFT-injected transformers model."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_logits, pad_batch

import iada_jax
from iada_jax.config import ConfigError, LoraConfig
from iada_jax.lora import init_lora_a, peft_target_modules
from iada_jax.model.qwen3_vl import forward, init_adapters

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tiny_hf):
    path, hf = tiny_hf("tied_gqa", seed=0, layers=4, heads=4, kv_heads=2, head_dim=24, mrope=(4, 4, 4), tied=True)
    return iada_jax.load_pretrained(path), hf


def peft_model(hf, cfg: LoraConfig, seed: int):
    """The HF model with PEFT LoRA injected and every lora_A / lora_B set to random values."""
    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, use_rslora=cfg.use_rslora,
        target_modules=peft_target_modules(cfg),
    ))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def lora_from_peft(model, num_layers: int, cfg: LoraConfig) -> dict:
    """Our storage-layout `lora` collection from a PEFT model's weights (A = lora_A.T, B = lora_B.T)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k}
    layers = {}
    for module in cfg.modules:
        group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        stacked = {}
        for ab in ("lora_A", "lora_B"):
            stacked[ab] = jnp.asarray(np.stack([
                sd[f"base_model.model.model.language_model.layers.{i}.{group}.{module}.{ab}.default.weight"].T
                for i in range(num_layers)
            ]))
        layers.setdefault(group, {})[module] = stacked
    return {"lora": {"model": {"language_model": {"layers": layers}}}}


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, lora_alpha=8.0),
    LoraConfig(r=4, lora_alpha=8.0, use_rslora=True),
    LoraConfig(r=2, lora_alpha=3.0, target_modules=("q_proj", "v_proj", "down_proj")),
], ids=["all_linear", "rslora", "subset"])
def test_lora_logits_equal_peft(base, cfg):
    ours, hf = base
    L = ours.config.text.num_hidden_layers
    model = peft_model(hf, cfg, seed=3)
    ids, mask = pad_batch(np.random.default_rng(0), [9, 5], "right")
    ref, _ = hf_logits(model, ids, mask)
    plain, _ = hf_logits(hf, ids, mask)
    batch = ours.make_batch(ids, mask)
    logits, _ = forward(ours.params, batch, cfg=ours.config, fwd=ours.fwd, lora=cfg,
                        adapters=lora_from_peft(model, L, cfg))
    logits = np.asarray(logits)
    m = mask.astype(bool)
    err = np.abs(logits[m] - ref[m]).max()
    print(f"[LoRA vs PEFT] max abs logit diff {err:.2e}, logit scale {np.abs(ref[m]).max():.1f}")
    assert err <= TOL, f"max abs logit diff to PEFT {err:.2e}"
    assert np.abs(ref[m] - plain[m]).max() > 0.1, "the adapter should change the logits"


def test_fresh_lora_is_the_identity_and_differs_per_layer(base):
    ours, _ = base
    cfg = LoraConfig(r=4)
    adapters = init_adapters(jax.random.PRNGKey(0), ours.params, cfg=ours.config, fwd=ours.fwd, lora=cfg)
    q = adapters["lora"]["model"]["language_model"]["layers"]["self_attn"]["q_proj"]
    L, d = ours.config.text.num_hidden_layers, ours.config.text.hidden_size
    assert q["lora_A"].shape == (L, d, 4) and q["lora_B"].shape == (L, 4, ours.config.text.num_attention_heads * 24)
    assert not np.allclose(q["lora_A"][0], q["lora_A"][1]), "each layer needs its own random A"
    assert np.all(np.asarray(q["lora_B"]) == 0)
    ids, mask = pad_batch(np.random.default_rng(1), [7, 4], "left")
    batch = ours.make_batch(ids, mask)
    base_logits, _ = forward(ours.params, batch, cfg=ours.config, fwd=ours.fwd)
    logits, _ = forward(ours.params, batch, cfg=ours.config, fwd=ours.fwd, lora=cfg, adapters=adapters)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))


def test_lora_a_init_matches_peft_distribution():
    """PEFT: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in)); gaussian: N(0, 1/r)."""
    a = np.asarray(init_lora_a(jax.random.PRNGKey(0), (400, 64), LoraConfig(r=64)))
    assert np.abs(a).max() <= 1 / np.sqrt(400) and np.abs(a).max() > 0.95 / np.sqrt(400)
    torch_a = torch.empty(64, 400)
    torch.nn.init.kaiming_uniform_(torch_a, a=np.sqrt(5))
    assert abs(float(torch_a.abs().max()) - np.abs(a).max()) < 0.05 / np.sqrt(400)
    g = np.asarray(init_lora_a(jax.random.PRNGKey(0), (400, 64), LoraConfig(r=64, init_lora_weights="gaussian")))
    assert abs(g.std() - 1 / 64) < 0.05 / 64


def test_lora_dropout_only_with_a_dropout_rng(base):
    ours, _ = base
    cfg = LoraConfig(r=4, lora_dropout=0.5)
    adapters = init_adapters(jax.random.PRNGKey(0), ours.params, cfg=ours.config, fwd=ours.fwd, lora=cfg)
    adapters = jax.tree.map(lambda x: x + 0.3, adapters)  # make B nonzero so dropout shows
    batch = ours.make_batch(*pad_batch(np.random.default_rng(2), [6], "none"))
    run = lambda rng: np.asarray(forward(ours.params, batch, cfg=ours.config, fwd=ours.fwd, lora=cfg,  # noqa: E731
                                         adapters=adapters, dropout_rng=rng)[0])
    eval_a, eval_b = run(None), run(None)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, run(jax.random.PRNGKey(1)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "positive"),
    (dict(target_modules=("q_proj", "qkv")), "qkv"),
    (dict(target_modules="all"), "all-linear"),
    (dict(bias="all"), "bias"),
    (dict(lora_dropout=1.0), "lora_dropout"),
])
def test_bad_lora_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_peft_target_regex_selects_only_the_language_stack(base):
    _, hf = base
    import re
    pattern = peft_target_modules(LoraConfig())
    names = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
    assert len(names) == 7 * hf.config.text_config.num_hidden_layers
    assert all(n.startswith("model.language_model.layers.") for n in names)
