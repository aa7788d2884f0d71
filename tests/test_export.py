"""Export to PyTorch and import back: PEFT adapters + the PyTorch IADA module give our logits
(text and image inputs, every routing variant, generate with the KV cache), merged checkpoints
load with plain from_pretrained, a PEFT-made adapter imports to the same logits, and bad input
is refused with nothing half-written."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from test_iada import live_adapters
from test_lora import peft_model

import iada_jax
from convert.__main__ import main as convert_main
from convert.export import ExportError, export_merged, export_peft
from convert.import_hf import import_hf
from convert.import_peft import PeftImportError, import_peft
from iada_jax.adapters import AdapterError, load_adapters
from iada_jax.checkpoint import save_params
from iada_jax.config import ForwardConfig, LoraConfig
from iada_jax.evaluation.generate import GenerationConfig, generate
from iada_jax.experiments import get_experiment
from iada_jax.model.qwen3_vl import forward
from iada_jax.embedded.tiny_hf import SPECIAL_IDS, TEXT_VOCAB
from iada_jax.torch_iada import attach_iada

TOL = 1e-4  # max abs logit difference (logits are O(40) on these random models)
# Adapter weights of std 0.1 move the logits by several units (a tested lower bound is 1e-2). At
# 0.2 the model is so far from the base that float32 rounding grows past 1e-4 (measured 3e-4 in
# both directions of the comparison; LoRA alone 8e-5).
IMG = SPECIAL_IDS["image_token_id"]
VISION = [SPECIAL_IDS["vision_start_token_id"]] + [IMG] * 4 + [SPECIAL_IDS["vision_end_token_id"]]
# Decoding picks text tokens only: a generated image/video placeholder id would need pixels.
SUPPRESS = list(range(TEXT_VOCAB, 300))


@pytest.fixture(scope="module")
def base(tiny_hf, tmp_path_factory):
    """A tiny random Qwen3-VL (vision, DeepStack, 4 layers) as an HF folder and converted."""
    path, hf = tiny_hf("vision_merge2", seed=7, layers=4, vision_depth=2, deepstack=(0, 1), merge=2, tied=True)
    ckpt = str(tmp_path_factory.mktemp("export_base") / "ckpt")
    import_hf(path, ckpt, dtype="float32", verbose=False)
    vlm = iada_jax.load_pretrained(ckpt, fwd=ForwardConfig(block_size=2))
    return types.SimpleNamespace(hf_dir=path, hf=hf, ckpt=ckpt, vlm=vlm)


def make_run(folder, ckpt, exp, adapters) -> str:
    """A run directory as train.py leaves it (config.json + final/), for given adapters."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"train": {"model": ckpt}, "lora": dataclasses.asdict(exp.lora) if exp.lora else None,
                   "iada": dataclasses.asdict(exp.iada) if exp.iada else None}, f)
    save_params(os.path.join(folder, "final"), jax.tree.map(np.asarray, adapters))
    return str(folder)


# ----------------------------------------------------------------------------- inputs


def inputs(with_image=True, answer=3):
    """Two left-padded samples (as generate wants them): an image question and a text one, the
    last `answer` tokens of each supervised. Returns HF-style numpy inputs and the loss mask."""
    rows = [[3, 4] + VISION + [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]
    if not with_image:
        rows[0] = [3, 4, 20, 21, 22, 23, 5, 6, 7, 8, 9]
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros_like(ids)
    loss = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, t - len(r):], mask[b, t - len(r):] = r, 1
        if answer:
            loss[b, t - answer:] = 1
    # 16 patches of 3 channels x 2 frames x 4 x 4 pixels: a 1x4x4 grid, 4 merged tokens.
    pv = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32) if with_image else None
    grid = np.asarray([[1, 4, 4]]) if with_image else None
    return dict(ids=ids, mask=mask, loss=loss, pv=pv, grid=grid)


_forward = jax.jit(forward, static_argnames=("cfg", "fwd", "keep_hidden", "lora", "iada"))


def jax_logits(vlm, exp, adapters, x, loss=None):
    batch = vlm.make_batch(x["ids"], x["mask"], pixel_values=x["pv"], image_grid_thw=x["grid"])
    loss = x["loss"] if loss is None else loss
    batch = batch.replace(loss_mask=jnp.asarray(loss, jnp.int32))
    logits, _ = _forward(vlm.params, batch, cfg=vlm.config, fwd=vlm.fwd, lora=exp.lora, iada=exp.iada,
                         adapters=adapters)
    return np.asarray(logits)


def torch_kwargs(x, labels=True):
    kw = dict(input_ids=torch.as_tensor(x["ids"]), attention_mask=torch.as_tensor(x["mask"]))
    if x["pv"] is not None:
        kw.update(pixel_values=torch.as_tensor(x["pv"]), image_grid_thw=torch.as_tensor(x["grid"]),
                  mm_token_type_ids=torch.as_tensor((x["ids"] == IMG).astype(np.int64)))
    if labels:
        kw["labels"] = torch.as_tensor(np.where(x["loss"] == 1, x["ids"], -100))
    return kw


def torch_logits(model, x):
    with torch.no_grad():
        return model(**torch_kwargs(x)).logits.numpy()


def max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def load_peft(base, out):
    """The HF model with the exported PEFT adapter; a key PEFT did not load is a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT only warns about missing adapter keys
        return peft.PeftModel.from_pretrained(copy.deepcopy(base.hf), out).eval()


# ----------------------------------------------------------------------------- PEFT + IADA round trip

ROUTING_VARIANTS = ["D_iada_lora", "adaptive_no_split", "cross_modal", "text_only_adaptive", "vision_only_adaptive",
                    "shared_projection", "C_attnres_lora"]
OTHER_VARIANTS = ["token_level", "attention_pooling", "adaptive_gate", "fixed_modality_aware_per_block_gate",
                  "gelu_bottleneck", "full_rank", "D_causal_scope", "D_full_scope", "D_attend_depth"]


@pytest.mark.parametrize("name", ROUTING_VARIANTS + OTHER_VARIANTS)
def test_exported_peft_and_iada_give_our_logits(base, tmp_path, name):
    exp = get_experiment(name, block_size=2)
    adapters = live_adapters(base.vlm, exp, seed=3, scale=0.1)
    out = export_peft(make_run(tmp_path / "run", base.ckpt, exp, adapters), str(tmp_path / "peft"))
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "iada.safetensors", "iada_config.json", "torch_iada.py"]
    model = load_peft(base, out)
    lora_only = dataclasses.replace(exp, iada=None)
    for with_image in (True, False):
        x = inputs(with_image)
        base_logits = torch_logits(base.hf, x)
        peft_logits = torch_logits(model, x)
        ours_lora = jax_logits(base.vlm, lora_only, {"lora": adapters["lora"]}, x)
        assert max_diff(peft_logits, ours_lora, x["mask"]) <= TOL
        handle = attach_iada(model, out)
        try:
            got = torch_logits(model, x)
        finally:
            handle.detach()
        ours = jax_logits(base.vlm, exp, adapters, x)
        err = max_diff(got, ours, x["mask"])
        assert err <= TOL, f"{name}, image={with_image}: max |torch - jax| = {err:.2e}"
        assert max_diff(got, peft_logits, x["mask"]) > 1e-2, "IADA must change the logits"
        assert max_diff(peft_logits, base_logits, x["mask"]) > 1e-2, "LoRA must change the logits"
        np.testing.assert_array_equal(torch_logits(model, x), peft_logits)  # detach() restores the model


# ----------------------------------------------------------------------------- generate with the KV cache


def jax_greedy(vlm, exp, adapters, x, steps):
    """Greedy decoding by full forwards: the generated tokens are the answer (loss_mask 1), so
    the prompt scope reads the prompt only, as the cached PyTorch decode does."""
    ids, mask = x["ids"], x["mask"]
    new_tokens, step_logits = [], []
    for _ in range(steps):
        loss = np.zeros_like(ids)
        loss[:, x["ids"].shape[1]:] = 1
        logits = jax_logits(vlm, exp, adapters, dict(x, ids=ids, mask=mask), loss=loss)[:, -1]
        token = logits[:, :TEXT_VOCAB].argmax(-1)
        new_tokens.append(token)
        step_logits.append(logits)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(token)[:, None]], axis=1)
    return np.stack(new_tokens, 1), np.stack(step_logits, 1)


@pytest.mark.parametrize("name", ["D_iada_lora", "adaptive_gate", "token_level", "D_attend_depth", "D_causal_scope"])
def test_greedy_generate_with_iada_equals_our_decode(base, tmp_path, name):
    exp = get_experiment(name, block_size=2)
    adapters = live_adapters(base.vlm, exp, seed=4, scale=0.1)
    out = export_peft(make_run(tmp_path / "run", base.ckpt, exp, adapters), str(tmp_path / "peft"))
    model = load_peft(base, out)
    handle = attach_iada(model, out)
    x = inputs(with_image=True, answer=0)
    steps = 5
    with torch.no_grad():
        gen = model.generate(**torch_kwargs(x, labels=False), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, suppress_tokens=SUPPRESS, return_dict_in_generate=True,
                             output_logits=True)
    assert handle._cache.length == x["ids"].shape[1] + steps - 1  # the steps decoded from the cache
    handle.detach()
    tokens, logits = jax_greedy(base.vlm, exp, adapters, x, steps)
    np.testing.assert_array_equal(gen.sequences[:, x["ids"].shape[1]:].numpy(), tokens)
    err = np.abs(torch.stack(gen.logits, 1).numpy() - logits).max()
    assert err <= TOL, f"{name}: per-step logits differ by {err:.2e}"
    # Our decoder (KV cache with IADA's cached vectors, or recomputation) gives the same tokens.
    ours = generate(base.vlm, x["ids"], x["mask"], x["pv"], x["grid"], lora=exp.lora, iada=exp.iada,
                    adapters=adapters, config=GenerationConfig(max_new_tokens=steps, suppress_token_ids=tuple(SUPPRESS)))
    np.testing.assert_array_equal(ours, tokens)


def test_full_scope_refuses_the_kv_cache_and_generates_without_it(base, tmp_path):
    exp = get_experiment("D_full_scope", block_size=2)
    adapters = live_adapters(base.vlm, exp, seed=5, scale=0.1)
    out = export_peft(make_run(tmp_path / "run", base.ckpt, exp, adapters), str(tmp_path / "peft"))
    model = load_peft(base, out)
    handle = attach_iada(model, out)
    x = inputs(with_image=False, answer=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="use_cache=False"):
        model.generate(**torch_kwargs(x, labels=False), max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        gen = model.generate(**torch_kwargs(x, labels=False), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             suppress_tokens=SUPPRESS, use_cache=False)
    handle.detach()
    # Paper-literal: every step recomputes the whole sequence, which all counts as read (no loss mask).
    ids, mask = x["ids"], x["mask"]
    for _ in range(3):
        logits = jax_logits(base.vlm, exp, adapters, dict(x, ids=ids, mask=mask), loss=np.zeros_like(ids))
        token = logits[:, -1, :TEXT_VOCAB].argmax(-1)
        ids = np.concatenate([ids, token[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(token)[:, None]], 1)
    np.testing.assert_array_equal(gen[:, x["ids"].shape[1]:].numpy(), ids[:, x["ids"].shape[1]:])


# ----------------------------------------------------------------------------- merged checkpoints


def test_merged_checkpoint_loads_with_from_pretrained_and_gives_the_lora_logits(base, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    exp = get_experiment("D_iada_lora", block_size=2)
    adapters = live_adapters(base.vlm, exp, seed=6, scale=0.1)
    run = make_run(tmp_path / "run", base.ckpt, exp, adapters)
    out = export_merged(run, str(tmp_path / "merged"), verbose=False, max_shard_bytes=200_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))  # sharded like save_pretrained
    assert {"config.json", "iada.safetensors", "iada_config.json", "torch_iada.py"} <= set(os.listdir(out))
    merged = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    x = inputs(True)
    lora_only = dataclasses.replace(exp, iada=None)
    err = max_diff(torch_logits(merged, x), jax_logits(base.vlm, lora_only, {"lora": adapters["lora"]}, x), x["mask"])
    assert err <= TOL, f"merged LoRA: {err:.2e}"
    assert max_diff(torch_logits(merged, x), torch_logits(base.hf, x), x["mask"]) > 1e-2
    attach_iada(merged, out)
    err = max_diff(torch_logits(merged, x), jax_logits(base.vlm, exp, adapters, x), x["mask"])
    assert err <= TOL, f"merged LoRA + IADA: {err:.2e}"


# ----------------------------------------------------------------------------- import from PEFT


def test_imported_peft_adapter_gives_the_peft_logits_and_exports_back(base, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    made = peft_model(base.hf, cfg, seed=2)
    made.save_pretrained(tmp_path / "peft")
    out = import_peft(str(tmp_path / "peft"), str(tmp_path / "adapters"), base.ckpt)
    imported = load_adapters(out)
    assert imported.lora == dataclasses.replace(cfg, lora_dropout=0.0)
    x = inputs(True)
    exp = dataclasses.replace(get_experiment("B_lora"), lora=imported.lora)
    ours = jax_logits(base.vlm, exp, imported.variables, x)
    err = max_diff(ours, torch_logits(made, x), x["mask"])
    assert err <= TOL, f"imported adapter: {err:.2e}"
    assert max_diff(ours, torch_logits(base.hf, x), x["mask"]) > 1e-2
    # And back: exporting the imported adapter gives PEFT's own tensors.
    back = export_peft(out, str(tmp_path / "back"), model=base.ckpt)
    from safetensors.numpy import load_file

    ref = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    got = load_file(os.path.join(back, "adapter_model.safetensors"))
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_adapter_of_some_layers_imports_with_zero_factors_elsewhere(base, tmp_path):
    model = peft.get_peft_model(copy.deepcopy(base.hf), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1, 3]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval().save_pretrained(tmp_path / "peft")
    imported = load_adapters(import_peft(str(tmp_path / "peft"), str(tmp_path / "adapters"), base.ckpt))
    q = imported.variables["lora"]["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["lora_B"]
    assert not q[0].any() and not q[2].any() and q[1].any() and q[3].any()
    x = inputs(True)
    exp = dataclasses.replace(get_experiment("B_lora"), lora=imported.lora)
    assert max_diff(jax_logits(base.vlm, exp, imported.variables, x), torch_logits(model, x), x["mask"]) <= TOL


# ----------------------------------------------------------------------------- bad input


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_bad_runs_and_adapters_are_refused_with_nothing_written(base, tmp_path, tiny_hf):
    exp = get_experiment("D_iada_lora", block_size=2)
    adapters = live_adapters(base.vlm, exp, seed=1)
    no_lora = dataclasses.replace(exp, lora=None)
    run = make_run(tmp_path / "iada_only", base.ckpt, no_lora, {"iada": adapters["iada"]})
    with pytest.raises(ExportError, match="no LoRA adapter"):
        export_peft(run, str(tmp_path / "out"))
    unfinished = tmp_path / "unfinished"
    make_run(unfinished, base.ckpt, exp, adapters)
    os.rename(unfinished / "final", unfinished / "elsewhere")
    with pytest.raises(AdapterError, match="no final/ adapters"):
        export_peft(str(unfinished), str(tmp_path / "out"))
    with pytest.raises(AdapterError, match="no checkpoint for step 7"):
        export_peft(run, str(tmp_path / "out"), step=7)
    good = make_run(tmp_path / "good", base.ckpt, exp, adapters)
    os.makedirs(tmp_path / "taken")
    with pytest.raises(ExportError, match="already exists"):
        export_merged(good, str(tmp_path / "taken"))
    # An adapter trained on another base: every mismatching tensor is named.
    other_dir, other = tiny_hf("wide_export", seed=1, layers=4, hidden=32, heads=2, kv_heads=1, head_dim=16,
                               vision_depth=1, deepstack=(0,))
    wrong = peft_model(other, LoraConfig(r=2, lora_alpha=4.0), seed=0)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(PeftImportError, match=r"q_proj.lora_A.weight' has shape \[2, 32\].*\[2, 64\]"):
        import_peft(str(tmp_path / "wrong"), str(tmp_path / "out"), base.ckpt)
    with pytest.raises(ExportError, match="does not fit the base model"):
        export_peft(good, str(tmp_path / "out"), model=other_dir)
    os.remove(tmp_path / "wrong" / "adapter_model.safetensors")
    with pytest.raises(PeftImportError, match="no adapter_model.safetensors"):
        import_peft(str(tmp_path / "wrong"), str(tmp_path / "out"), base.ckpt)
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)
    # The CLI says the same, with exit status 1.
    assert convert_main(["export-peft", run, str(tmp_path / "out")]) == 1
    assert not os.path.exists(tmp_path / "out")


def test_iada_weights_must_match_the_model(base, tmp_path, tiny_hf):
    exp = get_experiment("D_iada_lora", block_size=2)
    out = export_peft(make_run(tmp_path / "run", base.ckpt, exp, live_adapters(base.vlm, exp)), str(tmp_path / "p"))
    _, other = tiny_hf("wide_export", seed=1, layers=4, hidden=32, heads=2, kv_heads=1, head_dim=16,
                       vision_depth=1, deepstack=(0,))
    with pytest.raises(ValueError, match="hidden_size: model 32 vs IADA 64"):
        attach_iada(other, out)
    handle = attach_iada(base.hf, out)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_iada(base.hf, out)
    handle.detach()


def test_torch_iada_imports_without_jax(base, tmp_path):
    exp = get_experiment("D_iada_lora", block_size=2)
    out = export_peft(make_run(tmp_path / "run", base.ckpt, exp, live_adapters(base.vlm, exp)), str(tmp_path / "p"))
    code = ("import sys; sys.modules['jax'] = None; sys.modules['flax'] = None; "
            f"sys.path.insert(0, {out!r}); import torch_iada; from iada_jax import torch_iada as t2; "
            f"m = torch_iada.load_iada({out!r}); print(type(m).__name__, t2.IadaSettings.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DepthAggregation", "IadaSettings"]


def test_iada_on_a_bfloat16_model_stays_close_to_float32(base, tmp_path):
    """The module computes in float32 and injects in the model's dtype (as the JAX side)."""
    exp = get_experiment("D_iada_lora", block_size=2)
    adapters = live_adapters(base.vlm, exp, seed=8, scale=0.1)
    out = export_peft(make_run(tmp_path / "run", base.ckpt, exp, adapters), str(tmp_path / "peft"))
    x = inputs(True)
    model = load_peft(base, out)
    handle = attach_iada(model, out)
    ref = torch_logits(model, x)
    handle.detach()
    half = copy.deepcopy(model).to(torch.bfloat16)
    attach_iada(half, out)
    kw = torch_kwargs(x)
    kw["pixel_values"] = kw["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        got = half(**kw).logits.float().numpy()
    m = x["mask"].astype(bool)
    err = np.abs(got - ref)[m].mean()
    print(f"[export] bf16 vs f32 logits with LoRA + IADA: mean abs {err:.3f} on scale {np.abs(ref).max():.0f}")
    assert np.isfinite(got).all() and err < 0.05 * np.abs(ref).max()
