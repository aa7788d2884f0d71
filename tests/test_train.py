"""train.py end to end on the embedded tiny model: loss falls, every experiment trains,
resume is exact, sharded runs equal one device, SIGTERM and NaN are handled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from iada_jax.experiments import EXPERIMENTS
from iada_jax.train.metrics import read_metrics
from iada_jax.train.loop import TrainConfig, TrainingError, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(embedded, out, **kw) -> TrainConfig:
    ckpt, data, _, _ = embedded
    base = dict(model=ckpt, data=data, out=str(out), dtype="float32", param_dtype="float32", remat="none",
                max_length=128, buckets=(128,), batch_size=8, grad_accum=1, steps=4, lora_lr=2e-3, iada_lr=1e-2,
                warmup_ratio=0.0, save_every=1000, progress=False, workers=1, prefetch=2, mesh_data=1)
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args):
    pass


def test_loss_falls_and_the_run_leaves_its_outputs(embedded, tmp_path):
    cfg = config(embedded, tmp_path / "run", steps=40, block_size=2)
    summary = fit(cfg, log=quiet)
    losses = summary["losses"]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    print(f"[train] loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
    assert last < 0.5 * first, f"loss should fall: {first:.3f} -> {last:.3f}"
    records = read_metrics(cfg.out)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"loss", "grad_norm", "tokens_per_s", "lr_lora", "lr_iada", "iada_gate"} <= set(records[-1])
    assert any(f.startswith("events") for f in os.listdir(os.path.join(cfg.out, "tensorboard")))
    assert os.path.getsize(os.path.join(cfg.out, "loss.png")) > 1000
    assert os.path.isdir(os.path.join(cfg.out, "final"))
    saved = json.load(open(os.path.join(cfg.out, "config.json")))
    assert saved["iada"]["block_size"] == 2 and saved["total_steps"] == 40


# One experiment per distinct adapter structure and training path. The others differ from one
# of these only in a rank value (rank8/64/256, the r32 pair) or combine switches trained here
# separately (token_level_full_rank, gelu_bottleneck_rank64, attention_pooling_no_split,
# fixed_modality_aware); each compiles its own step (~12 s on 2 cores).
# All 27 are checked to build and start as the identity in test_iada.py, and counted in test_params.py.
TRAINED_HERE = ["B_lora", "C_attnres_lora", "D_iada_lora", "adaptive_no_split", "cross_modal", "text_only_adaptive",
                "vision_only_adaptive", "shared_projection", "full_rank", "token_level", "gelu_bottleneck", "attention_pooling",
                "adaptive_gate", "rank4", "fixed_modality_aware_per_block_gate", "D_full_scope", "D_causal_scope",
                "D_attend_depth"]


def test_the_trained_subset_covers_every_switch_value():
    from iada_jax.config import IADA_CHOICES

    trained = [EXPERIMENTS[n] for n in TRAINED_HERE]
    for switch, values in IADA_CHOICES.items():
        seen = {getattr(e.iada, switch) for e in trained if e.iada is not None}
        assert seen == set(values), f"{switch}: {sorted(set(values) - seen)} never trained"
    assert {e.iada.rank is None for e in trained if e.iada is not None} == {True, False}
    assert any(e.iada is not None and e.iada.shared_projection for e in trained)


@pytest.mark.parametrize("name", TRAINED_HERE)
def test_every_experiment_trains(embedded, tmp_path, name):
    summary = fit(config(embedded, tmp_path / name, exp=name, steps=2, block_size=2), log=quiet)
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"]))


def test_pretrained_baseline_is_refused_for_training(embedded, tmp_path):
    with pytest.raises(TrainingError, match="trains nothing"):
        fit(config(embedded, tmp_path / "a", exp="A_pretrained"), log=quiet)


def test_killed_and_resumed_run_ends_with_identical_parameters(embedded, tmp_path):
    """6 steps with gradient accumulation and LoRA dropout, straight vs stopped after step 3
    with the step-3 checkpoint lost (a kill between saves), resumed from step 2."""
    kw = dict(steps=6, grad_accum=2, batch_size=4, save_every=2, block_size=2)
    straight = fit(config(embedded, tmp_path / "straight", **kw), log=quiet)["trainable"]
    run = tmp_path / "killed"
    first = fit(config(embedded, run, stop_after=3, **kw), log=quiet)
    assert first["step"] == 3 and first.get("interrupted")
    steps = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    assert steps[-1] == 3
    import shutil

    shutil.rmtree(run / "checkpoints" / "3")  # the kill: only the step-2 checkpoint survives
    resumed = fit(config(embedded, run, resume=True, **kw), log=quiet)
    assert resumed["step"] == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed["trainable"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3, 4, 5, 6]


SHARDING_RUN = dict(steps=3, batch_size=8, block_size=2)


@pytest.fixture(scope="module")
def one_device_run(embedded, tmp_path_factory):
    return fit(config(embedded, tmp_path_factory.mktemp("one"), mesh_data=1, mesh_fsdp=1, **SHARDING_RUN), log=quiet)


@pytest.mark.parametrize("mesh", [(8, 1), (2, 4), (1, 8)], ids=["data8", "data2_fsdp4", "fsdp8"])
def test_sharded_training_equals_one_device(embedded, tmp_path, one_device_run, mesh):
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    one = one_device_run
    many = fit(config(embedded, tmp_path / "many", mesh_data=mesh[0], mesh_fsdp=mesh[1], **SHARDING_RUN), log=quiet)
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(one["trainable"]), jax.tree.leaves(many["trainable"])):
        # Adam divides by sqrt(v): float32 reduction-order noise in near-zero gradients shows
        # in the parameters at ~1e-6 absolute after a few steps.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-5)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(embedded, tmp_path):
    # Adam moves every coordinate by about lr: at 1e30 the next forward overflows to inf - inf.
    cfg = config(embedded, tmp_path / "nan", steps=20, lora_lr=1e30, iada_lr=1e30, save_every=1, max_grad_norm=None)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*last good checkpoint is step \d+"):
        fit(cfg, log=quiet)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(embedded, tmp_path):
    ckpt, data, _, _ = embedded
    out = tmp_path / "sig"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", ckpt, "--data", data, "--out", str(out),
           "--steps", "100000", "--save-every", "100000", "--dtype", "float32", "--param-dtype", "float32",
           "--remat", "none", "--max-length", "128", "--batch-size", "8", "--grad-accum", "1", "--block-size", "2",
           "--no-progress"]
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(str(out))) < 2:
        time.sleep(0.5)
    assert len(read_metrics(str(out))) >= 2, "training did not start"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    saved = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert saved and saved[-1] >= 2 and "continue with --resume" in output


def test_bf16_training_with_remat_runs_and_keeps_float32_adapters(embedded, tmp_path):
    """The production settings: bf16 base and compute, full remat; adapters and Adam in float32."""
    summary = fit(config(embedded, tmp_path / "bf16", steps=3, dtype="bfloat16", param_dtype="bfloat16",
                         remat="full", block_size=2), log=quiet)
    assert summary["step"] == 3 and all(np.isfinite(summary["losses"]))
    assert {np.asarray(x).dtype for x in jax.tree.leaves(summary["trainable"])} == {np.dtype("float32")}


def test_training_starts_from_exported_then_imported_adapters(embedded, tmp_path):
    """JAX run -> PEFT adapter -> import-peft -> train.py --init-adapters: the new run starts
    from those LoRA weights (learning rate 0 keeps them, bit for bit); a run directory also
    carries its IADA weights; mismatching starts are refused."""
    from convert.export import export_peft
    from convert.import_peft import import_peft
    from iada_jax.adapters import load_adapters

    fit(config(embedded, tmp_path / "a", steps=3, block_size=2, lora_r=4), log=quiet)
    peft_dir = export_peft(str(tmp_path / "a"), str(tmp_path / "peft"))
    imported = import_peft(peft_dir, str(tmp_path / "imported"), embedded[0])
    frozen_lr = dict(steps=1, block_size=2, lora_lr=0.0, iada_lr=0.0)
    fit(config(embedded, tmp_path / "b", init_adapters=imported, **frozen_lr), log=quiet)
    fit(config(embedded, tmp_path / "c", init_adapters=str(tmp_path / "a"), **frozen_lr), log=quiet)
    a, b, c = (load_adapters(str(tmp_path / n)) for n in "abc")
    assert b.lora.r == 4 and b.lora.lora_dropout == a.lora.lora_dropout
    for got in (b, c):
        jax.tree.map(np.testing.assert_array_equal, got.variables["lora"], a.variables["lora"])
    jax.tree.map(np.testing.assert_array_equal, c.variables["iada"], a.variables["iada"])
    assert np.abs(b.variables["iada"]["gate"]).max() == 0.0  # IADA starts fresh from a PEFT adapter
    with pytest.raises(TrainingError, match="IADA differs from experiment 'adaptive_no_split': routing="):
        fit(config(embedded, tmp_path / "d", exp="adaptive_no_split", init_adapters=str(tmp_path / "a"),
                   **frozen_lr), log=quiet)
    with pytest.raises(TrainingError, match="drop --lora-r"):
        fit(config(embedded, tmp_path / "e", init_adapters=imported, lora_r=8, **frozen_lr), log=quiet)
