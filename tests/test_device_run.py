"""bench/device_run.sh, the one prepared GPU run, at tiny dimensions on CPU: every case runs
to a row, failures and a short budget are recorded rather than fatal, and the report reads
what the rows say. (Speed is never asserted: the numbers of a CPU run mean nothing.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import device_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_run")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    # The budget is generous on purpose: this checks that every case of the plan gives a good row,
    # and a loaded CI machine (another pytest worker beside it) must not turn a slow case into a
    # timeout row. Skipping for lack of budget is tested on its own below.
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_run.sh"), "--cpu", "--budget-s", "900"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return proc, out, json.load(open(out / "results.json"))


@pytest.mark.slow  # about 3 minutes: `make test-slow` (run it before a GPU run)
def test_every_case_of_the_cpu_plan_gives_a_good_row(cpu_run):
    proc, out, results = cpu_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = {r["case"]: r for r in results["rows"]}
    assert set(rows) == {c.name for c in device_run.plan(cpu=True)}
    for name, row in rows.items():
        want = "partial" if name == "attention" else "ok"  # no cuDNN on a CPU
        assert row["status"] == want, (name, row)
        assert row["versions"]["jax"] and row["device"] == "cpu"
    steps = [r for r in results["rows"] if r["kind"] == "step"]
    assert {(r["stack"], r["exp"], r["images"], r["batch"]) for r in steps} == {
        ("jax", "D_iada_lora", 1, 2), ("torch", "B_lora", 1, 2)}
    jax_row = next(r for r in steps if r["stack"] == "jax")
    assert jax_row["compile_s"] > 0 and jax_row["compiled_total_gib"] > 0 and jax_row["tokens_per_s"] > 0
    assert jax_row["command"].startswith("python -m bench.train_step --stack jax")
    parity = [r for r in results["rows"] if r["kind"] == "parity"]
    assert [r["dtype"] for r in parity] == ["float32", "bfloat16"] and parity[0]["max_abs_diff"] < 1e-4
    attention = rows["attention"]
    assert attention["xla_padded_rows_finite"] and attention["xla_grads_finite"]
    train = rows["train.py"]
    # train.py ran on a random checkpoint and generated data until SIGTERM, then exited cleanly.
    assert train["optimizer_steps"] >= 3 and train["returncode"] == 0 and train["padded_tokens_per_s"] > 0
    assert "random-init --preset tiny" in train["command"] and "train.py" in train["command"]
    decode = rows["decode"]
    # Float32 on the CPU: our KV-cache generation makes transformers' greedy tokens exactly.
    assert decode["kind"] == "decode" and decode["dtype"] == "float32" and decode["agree_tokens"] == 8
    assert decode["first_tokens_equal_fraction"] == 1.0 and decode["mean_common_prefix"] == 8.0
    for stack in ("jax", "torch"):
        assert decode[stack]["generated_tokens"] == decode["batch"] * decode["new"] == 16
        assert decode[stack]["tokens_per_s"] > 0 and decode[stack]["first_call_s"] > 0
    assert decode["jax"]["compile_s"] > 0 and decode["speedup"] > 0
    assert decode["command"].startswith("python -m bench.decode_speed --tiny")
    packing = rows["packing"]
    # The same llava-like samples, packed (rows of 256) and bucketed (b4 in buckets of 64 and 128).
    assert packing["kind"] == "layouts" and packing["exp"] == "D_iada_lora" and packing["seq"] == 256
    packed, bucketed = packing["packed"], packing["bucketed"]
    assert packed["lengths"] == {"256": packed["batches"]} and packed["programs"] == 1
    assert set(bucketed["lengths"]) == {"64", "128"} and bucketed["programs"] == 2
    assert packed["real_tokens_per_step"] * packed["batches"] == bucketed["real_tokens_per_step"] * bucketed["batches"]
    assert packed["real_fraction"] > bucketed["real_fraction"] and 1 < packed["samples_per_row"] <= 16
    assert packed["untimed_batches"] == 0  # one row a batch: no batch is completed with empty rows
    assert packing["samples"] == bucketed["batches"] * bucketed["batch_rows"] <= packing["samples_drawn"]
    for layout in (packed, bucketed):
        assert layout["compile_s"] > 0 and layout["step_s"] > 0 and layout["compiled_total_gib"] > 0
        assert layout["token_slots_per_s"] > layout["real_tokens_per_s"] > 0 and layout["images_per_batch"] > 0
    assert packing["ratio"] == pytest.approx(packed["real_tokens_per_s"] / bucketed["real_tokens_per_s"])
    assert packing["command"].startswith("python -m bench.train_step --stack jax --exp D_iada_lora --lengths llava "
                                         "--pack --tiny")


@pytest.mark.slow  # about 3 minutes: `make test-slow` (run it before a GPU run)
def test_the_report_has_the_table_ratios_and_logs(cpu_run):
    _, out, results = cpu_run
    assert any(k.startswith("D_iada_lora / torch B_lora tokens/s") for k in results["ratios"])
    md = (out / "results.md").read_text()
    assert "| device | stack | exp |" in md and "x |" in md  # our tokens/s over PyTorch's, as N.NNx
    assert "python -m bench.train_step --stack torch" in md
    assert any(k.startswith("ours / transformers generated tokens/s, float32 b2") for k in results["ratios"])
    assert "| device | generation | dtype |" in md and "| cpu | transformers | float32 | 2 | 48 | 8 |" in md
    assert "packed / bucketed real tokens/s, D_iada_lora float32 seq 256 (packed 1 x 256, bucketed b4)" in results["ratios"]
    assert "| device | layout | exp |" in md and "| cpu | packed | D_iada_lora | float32 | 1 x 256 | 1 |" in md
    assert "| cpu | bucketed | D_iada_lora | float32 | b4 (64: " in md
    log = (out / "cases.log").read_text()
    assert "===== parity" in log and "===== train.py" in log


def _fake_step(stack, exp, batch, tokens_per_s, step_s, images=0, attention=None):
    attention = attention or ("sdpa" if stack == "torch" else "cudnn")  # what a GPU run records by default
    return dict(kind="step", status="ok", stack=stack, exp=exp, seq=2048, images=images, batch=batch,
                attention=attention, remat="full", tokens_per_s=tokens_per_s, step_s=step_s, model_tflops=1.0,
                device="H200")


def test_ratios_compare_same_shapes_only():
    rows = [_fake_step("jax", "D_iada_lora", 8, 3000, 1.03), _fake_step("jax", "B_lora", 8, 3100, 1.0),
            _fake_step("torch", "B_lora", 8, 2000, 1.5), _fake_step("jax", "D_iada_lora", 16, 3000, 2.0),
            _fake_step("jax", "D_iada_lora", 8, 1800, 1.7, attention="xla")]
    r = device_run.ratios(rows)
    assert r["D_iada_lora / torch B_lora tokens/s, seq 2048 img 0 b8 cudnn"] == pytest.approx(1.5)
    assert r["B_lora / torch B_lora tokens/s, seq 2048 img 0 b8 cudnn"] == pytest.approx(1.55)
    assert r["D_iada_lora step time over B_lora - 1 (IADA's share), seq 2048 img 0 b8 cudnn"] == pytest.approx(0.03)
    # the XLA-attention row is compared with the PyTorch step, never with the cuDNN B_lora row
    assert r["D_iada_lora / torch B_lora tokens/s, seq 2048 img 0 b8"] == pytest.approx(0.9)
    assert not any("b8" in k and "IADA's share" in k and "cudnn" not in k for k in r)
    assert not any("b16" in k for k in r)  # no baseline at micro-batch 16
    md = device_run.markdown(rows, 510, cpu=False)
    assert "| H200 | jax | D_iada_lora | 2048 | 0 | 8 | cudnn | full | 1.030 | 3000 | 1.50x |" in md
    assert "| H200 | torch | B_lora | 2048 | 0 | 8 | sdpa | full |" in md


def test_train_py_is_compared_with_the_bare_step_of_its_own_shapes():
    """train.py's padded tokens/s against the bare step's at the same batch, sequence and images,
    with the real fraction in the label (the second GPU run compared 2048-token buckets 89%
    padding, which cuDNN skips, with full rows)."""
    bare = dict(_fake_step("jax", "D_iada_lora", 32, 40000, 0.2048, images=1), seq=256)
    other = _fake_step("jax", "D_iada_lora", 8, 35000, 0.47, images=1)  # seq 2048: not train.py's shape
    train = dict(kind="train_py", status="ok", exp="D_iada_lora", seq=256, images=1, batch=32, attention="cudnn",
                 padded_tokens_per_s=38000.0, real_tokens_per_s=34960.0)
    r = device_run.ratios([bare, other, train])
    assert r == {"train.py padded tokens/s over the bare step's, b32 seq 256 (real fraction 92%)": pytest.approx(0.95)}


def test_decode_rows_give_the_generation_table_and_ratio():
    def stack(tokens_per_s, compile_s=None):
        return dict(device="H200", generate_s=1024 / tokens_per_s, tokens_per_s=tokens_per_s, first_call_s=40.0,
                    compile_s=compile_s, peak_gib=9.5, generated_tokens=1024)

    row = dict(kind="decode", status="ok", case="decode", dtype="bfloat16", batch=16, prompt=1024, image_tokens=196,
               new=64, jax=stack(3200, 38.0), torch=stack(1000), speedup=3.2, agree_tokens=8,
               first_tokens_equal_fraction=0.75, mean_common_prefix=11.5)
    assert device_run.ratios([row]) == {"ours / transformers generated tokens/s, bfloat16 b16 prompt 1024 new 64": 3.2}
    md = device_run.markdown([row], 510, cpu=False)
    assert "| H200 | ours | bfloat16 | 16 | 1024 | 64 | 0.320 | 3200 | 3.20x | 40.0 | 38.0 | 9.5 |" in md
    assert "| H200 | transformers | bfloat16 | 16 | 1024 | 64 | 1.024 | 1000 |  | 40.0 | n/a | 9.5 |" in md
    assert "3.20x (target 3x); first 8 tokens equal in 75% of samples" in md


def test_the_gpu_plan_runs_the_default_attention_first_then_packing_and_train_py():
    """After the first GPU run: the step rows use train.py's default attention ("auto", cuDNN on
    the GPU) and come first, with B beside D for IADA's share; packing and train.py follow the
    image row; one XLA row is kept for reference."""
    plan = device_run.plan(cpu=False)
    names = [c.name for c in plan]
    assert names[3:7] == ["step-D-b8-text", "step-B-b8-text", "step-torch-B-b8-text", "step-D-b8-img1"]
    assert names[7:10] == ["packing", "step-D-b32-s256-img1", "train.py"]
    bare = " ".join(plan[8].args)  # train.py's shapes (device_run.Runner._train_py), compared in ratios()
    assert "--batch 32 --images 1" in bare and "--seq 256" in bare
    assert not any("--attention" in c.args for c in plan if c.name != "step-D-b8-text-xla")
    xla = next(c for c in plan if c.name == "step-D-b8-text-xla").args
    assert xla[xla.index("--attention") + 1] == "xla"
    args = " ".join(next(c for c in device_run.plan(cpu=False) if c.name == "packing").args)
    assert "--exp D_iada_lora --lengths llava --pack --seq 2048 --batch 16 --pack-batch 4" in args
    assert "--tiny" not in args and "--dtype bfloat16" in args


def test_layouts_rows_give_the_packing_table_and_ratio():
    def layout(rows, lengths, step_s, real, slots, programs):
        batches = sum(lengths.values())
        return dict(batches=batches, batch_rows=rows, lengths=lengths, programs=programs, compile_s=70.0,
                    step_s=step_s, real_tokens_per_s=real * batches / (step_s * batches),
                    token_slots_per_s=slots / step_s, real_fraction=real / slots, real_tokens_per_step=real,
                    compiled_total_gib=30.0)

    row = dict(kind="layouts", status="ok", case="packing", device="H200", exp="D_iada_lora", dtype="bfloat16",
               seq=2048, samples=240, passes=2, visual_tokens_per_sample=271.2,
               packed=layout(4, {"2048": 15}, 1.0, 7200, 8192, 1),
               bucketed=layout(16, {"512": 12, "1024": 3}, 1.2, 6750, 9830, 2))
    row["ratio"] = row["packed"]["real_tokens_per_s"] / row["bucketed"]["real_tokens_per_s"]
    assert device_run.ratios([row]) == {
        "packed / bucketed real tokens/s, D_iada_lora bfloat16 seq 2048 (packed 4 x 2048, bucketed b16)": 1.28}
    md = device_run.markdown([row], 510, cpu=False)
    assert ("| H200 | packed | D_iada_lora | bfloat16 | 4 x 2048 | 1 | 1.000 | 7200 | 8192 | 87.9% | 7200 | 1.28x | 70 "
            "| 30.0 |") in md
    assert ("| H200 | bucketed | D_iada_lora | bfloat16 | b16 (512: 12, 1024: 3) | 2 | 1.200 | 5625 | 8192 | 68.7% | "
            "6750 |  | 70 | 30.0 |") in md
    assert "steps 2 time(s) through its full batches of the same 240 samples (llava-like lengths, 271 visual" in md
    assert "1.28x (target 1.3x)" in device_run.summary_line(row)


def test_agreement_counts_rows_whose_first_tokens_are_equal():
    from bench.decode_speed import agreement

    ours = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    theirs = np.array([[1, 2, 3, 4], [1, 2, 9, 4], [0, 6, 7, 8]])
    assert agreement(ours, theirs, k=2) == {"agree_tokens": 2, "first_tokens_equal_fraction": 2 / 3,
                                            "mean_common_prefix": (4 + 2 + 0) / 3}
    assert agreement(ours, theirs, k=8)["agree_tokens"] == 4  # no more than were generated


def test_a_failing_case_and_an_exhausted_budget_are_rows_not_crashes(tmp_path):
    runner = device_run.Runner(str(tmp_path), budget_s=60, cpu=True)
    bad = device_run.CaseSpec("step-bad", "step", 0, 60, ("--tiny", "--exp", "no_such_experiment"))
    late = device_run.CaseSpec("step-late", "step", 1e9, 60, ("--tiny",))
    runner.run_all([device_run.CaseSpec("env", "env", 0, 30), bad, late], jobs=1)
    rows = {r["case"]: r for r in runner.results()}
    assert rows["step-bad"]["status"] == "failed" and "no_such_experiment" in rows["step-bad"]["output"]
    assert rows["step-late"]["status"] == "skipped" and "budget left" in rows["step-late"]["reason"]
    saved = json.load(open(tmp_path / "results.json"))
    assert [r["case"] for r in saved["rows"]] == ["env", "step-bad", "step-late"]
