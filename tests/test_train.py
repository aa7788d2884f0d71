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

from iada_jax.train.metrics import read_metrics
from iada_jax.train.loop import TrainConfig, TrainingError, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(embedded, out, **kw) -> TrainConfig:
    ckpt, data, _, _ = embedded
    base = dict(model=ckpt, data=data, out=str(out), dtype="float32", param_dtype="float32", remat="none",
                max_length=128, buckets=(128,), batch_size=8, grad_accum=1, steps=4, lora_lr=2e-3, iada_lr=1e-2,
                warmup_ratio=0.0, save_every=1000, progress=False, workers=1, prefetch=2, mesh_data=1,
                min_pixels=1024, max_pixels=4096)  # the tiny model's 64x64 images
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
    assert saved["train"]["attention"] == "auto" and saved["attention"] == "xla"  # what "auto" chose on a CPU


# Every value of every IADA switch trains, in five combinations (each compiles its own step, the
# cost of this test; one per named experiment took 17). All 27 named experiments are checked to
# build and start as the identity in test_iada.py, to export in test_export.py, and counted in
# test_params.py; train.py runs D (the default) in the tests above and below.
SWITCH_COMBINATIONS = [
    dict(routing="self_modal", shared_projection=True, bottleneck="gelu", pooling="attention", gate="adaptive",
         scope="causal"),
    dict(routing="shared", query="fixed", gate="per_block", attend="depth", scope="full"),
    dict(routing="cross_modal", rank=None, gate="global", scope="prompt"),
    dict(routing="text_only_adaptive", granularity="token", include_embedding=False),
    dict(routing="vision_only_adaptive", pooling="attention", attend="depth", gate="adaptive", include_current=False),
]


def test_the_combinations_cover_every_switch_value():
    from iada_jax.config import IADA_CHOICES, IadaConfig

    configs = [IadaConfig(**kw) for kw in SWITCH_COMBINATIONS]
    for switch, values in IADA_CHOICES.items():
        seen = {getattr(c, switch) for c in configs}
        assert seen == set(values), f"{switch}: {sorted(set(values) - seen)} never trained"
    assert {c.rank is None for c in configs} == {True, False} and any(c.shared_projection for c in configs)


@pytest.mark.parametrize("combination", range(len(SWITCH_COMBINATIONS)))
def test_every_iada_switch_value_trains(tiny_program_inputs, combination):
    """Two optimizer steps of the training program: finite losses, and every IADA parameter
    that the batch reaches moves (text and image tokens, a prompt and an answer per row)."""
    import dataclasses as dc

    from iada_jax.config import ForwardConfig, IadaConfig
    from iada_jax.experiments import get_experiment
    from iada_jax.train.optimizer import OptimizerConfig
    from iada_jax.train.step import TrainProgram

    model, batch = tiny_program_inputs
    exp = dc.replace(get_experiment("D_iada_lora", block_size=2),
                     iada=IadaConfig(block_size=2, **SWITCH_COMBINATIONS[combination]))
    program = TrainProgram(model.config, exp, ForwardConfig(block_size=2), OptimizerConfig(iada_lr=1e-2, warmup_ratio=0.0),
                           total_steps=2)
    frozen = {"params": model.params}
    start = program.new_adapters(jax.random.PRNGKey(0), model.params)
    state = program.init_state(start, frozen)
    for _ in range(2):
        state, metrics = program.step(state, frozen, batch, jax.random.PRNGKey(1))
        assert np.isfinite(float(metrics["nll_sum"])) and bool(metrics["applied"])
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(start["iada"]), jax.tree.leaves(state["trainable"]["iada"]))]
    assert max(moved) > 0 and all(np.isfinite(moved))


@pytest.fixture(scope="module")
def tiny_program_inputs(embedded):
    """The embedded model and one batch of 4 of its synthetic rows (images and answers)."""
    from iada_jax.data.image_processing import ImageProcessorConfig
    from iada_jax.data.loader import DataConfig, SFTData

    ckpt, data_path, tokenizer, model = embedded
    data = SFTData(DataConfig(path=data_path, max_length=128, batch_size=4, buckets=(128,)), tokenizer,
                   model.image_config or ImageProcessorConfig(), model.config, log=quiet)
    length, rows = data.epoch_plan(0)[0]
    return model, jax.tree.map(np.asarray, data.make_batch(length, rows))


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


# data x fsdp = 2 x 4 exercises both mesh axes: batch split 8 ways, the base split 4 ways.
@pytest.mark.parametrize("mesh", [(2, 4)], ids=["data2_fsdp4"])
def test_sharded_training_equals_one_device(embedded, tmp_path, one_device_run, mesh):
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    one = one_device_run
    many = fit(config(embedded, tmp_path / "many", mesh_data=mesh[0], mesh_fsdp=mesh[1], **SHARDING_RUN), log=quiet)
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(one["trainable"]), jax.tree.leaves(many["trainable"])):
        # Adam divides by sqrt(v): float32 reduction-order noise in a near-zero gradient moves
        # that coordinate by up to the learning rate (2e-3); seen: 2.5e-5 on one of 6,144, 3 steps.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=5e-5)


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
           "--remat", "none", "--max-length", "128", "--min-pixels", "1024", "--max-pixels", "4096", "--batch-size", "8", "--grad-accum", "1", "--block-size", "2",
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


def test_two_processes_train_as_one(embedded, tmp_path, one_device_run):
    """Multi-host data parallelism on one machine: two processes (one CPU device each, a
    localhost coordinator, gloo collectives) run train.py for 3 steps of batch 8 and end with
    the parameters of the one-process run."""
    import socket

    from iada_jax.adapters import load_adapters

    ckpt, data, _, _ = embedded
    one = one_device_run
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", ckpt, "--data", data, "--out", str(out),
           "--steps", "3", "--batch-size", "8", "--grad-accum", "1", "--block-size", "2", "--dtype", "float32",
           "--param-dtype", "float32", "--remat", "none", "--max-length", "128", "--buckets", "128",
           "--min-pixels", "1024", "--max-pixels", "4096",
           "--lora-lr", "2e-3", "--iada-lr", "1e-2", "--warmup-ratio", "0", "--workers", "1", "--no-progress"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    two = load_adapters(str(out))
    losses = [r["loss"] for r in read_metrics(str(out))]
    np.testing.assert_allclose(losses, one["losses"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(one["trainable"]), jax.tree.leaves(two.variables)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=5e-5)  # as the sharded test
