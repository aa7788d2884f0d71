"""The one prepared GPU run (bench/device_run.sh is its entry point): every measurement we need
from a GPU, in priority order, within a time budget, each case in its own process.

    bench/device_run.sh                 on the GPU machine, from the repository root (about 9 minutes)
    bench/device_run.sh --cpu           the same program at tiny dimensions on CPU (the suite runs it)
    bench/device_run.sh --only step     cases whose name contains "step"

Cases, most important first (a 2B step can take a minute or more to compile):
  env            GPU name and memory, package versions (no framework is initialised)
  attention      cuDNN against XLA attention, bf16, 2B shapes: right-padded and packed text
                 rows (causal), the vision tower's frames (not causal) (bench/parity.py)
  parity         our forward against transformers' with LoRA + IADA, float32 and bf16
  step-*         the training step at Qwen3-VL-2B dimensions, random weights, sequence 2048,
                 train.py's default attention ("auto": cuDNN on the GPU): ours D_iada_lora and
                 B_lora (IADA's share), transformers + PEFT B_lora (SDPA, gradient
                 checkpointing, bf16), micro-batch 8 text-only, then one 448x448 image per
                 sample (bench/train_step.py)
  packing        our D_iada_lora step, 2B dims, bf16, on the same 256 samples of
                 llava-instruct-mix-like lengths (one image each): packed, 4 rows of 2048 a
                 batch, against bucketed, 16 samples a batch in buckets of 512 / 1024; real
                 tokens/s of each and their ratio (bench/train_step.py --lengths llava --pack)
  train.py       train.py itself for about a minute on a random full-size checkpoint and
                 generated data (one image a row, 256-token buckets, 32 x 2 a step): the loop,
                 the loader and the host, against the bare step of the same shapes just before
  step-D-b16     micro-batch 16 (the paper's batch in one micro-batch)
  decode         generation speed, ours (jitted, KV cache) against transformers' generate on
                 the same random 2B weights: batch 16, one image per sample, 1024-token
                 prompts, 64 new tokens, greedy, bf16; tokens/s of each, our compile time, and
                 whether the first 8 tokens agree (bench/decode_speed.py)
  step-*-xla ... XLA attention for reference, then the remaining image and batch-16 rows

A case starts only if the budget has room for it (else it is skipped with the reason); a
case that fails or runs over its own limit is recorded with the end of its output, and the
run goes on. After every case $OUT/results.json and $OUT/results.md are rewritten (OUT
defaults to bench/results/); the full output of every case is in $OUT/cases.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import shutil
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    name: str
    kind: str  # env | attention | parity | step | decode | layouts | train_py
    needs_s: float  # do not start with less budget left than this
    limit_s: float  # stop it after this long
    args: tuple[str, ...] = ()  # arguments of bench.train_step (step, layouts) or bench.decode_speed (decode)


def _step(name, stack, exp, batch, images, needs, limit, *extra) -> CaseSpec:
    args = ("--stack", stack, "--exp", exp, "--batch", str(batch), "--images", str(images)) + extra
    return CaseSpec(name, "step", needs, limit, args)


def _layouts(needs, limit, *extra) -> CaseSpec:
    """Packed against bucketed, D_iada_lora, on the same llava-like samples."""
    args = ("--stack", "jax", "--exp", "D_iada_lora", "--lengths", "llava", "--pack") + extra
    return CaseSpec("packing", "layouts", needs, limit, args)


# train.py's case on the GPU (micro-batch, accumulation, bucket length): the embedded synthetic
# rows (one 448x448 image, about 235 tokens) fill a 256-token bucket. A bare step of the same
# shapes runs just before it, for ratios(); in 2048-token buckets (the second GPU run) 89% was
# padding that cuDNN skips, which made train.py look faster than the step.
TRAIN_PY_GPU = (32, 2, 256)


def plan(cpu: bool) -> list[CaseSpec]:
    if cpu:  # tiny dimensions, float32, few steps: the program, not the numbers; longest first (2 at a time)
        tiny = ("--tiny", "--seq", "64", "--dtype", "float32", "--block-size", "2", "--steps", "2", "--warmup", "1")
        return [
            CaseSpec("env", "env", 0, 30),
            CaseSpec("train.py", "train_py", 5, 150),
            CaseSpec("parity", "parity", 10, 120),
            _step("step-D-b2-img1", "jax", "D_iada_lora", 2, 1, 5, 120, *tiny),
            _layouts(5, 150, "--tiny", "--dtype", "float32", "--block-size", "2", "--seq", "256", "--batch", "4",
                     "--pack-batch", "1", "--samples", "32", "--passes", "1"),
            CaseSpec("attention", "attention", 5, 60),
            _step("step-torch-B-b2-img1", "torch", "B_lora", 2, 1, 5, 120, *tiny),
            CaseSpec("decode", "decode", 5, 120, ("--tiny", "--dtype", "float32", "--batch", "2", "--prompt", "48",
                                                  "--new", "8", "--repeats", "2")),
        ]
    # The step cases run train.py's default attention ("auto": cuDNN on the GPU); the first GPU
    # run (bench/RESULTS.md, 2026-11-30) measured XLA attention, which -xla keeps as a reference.
    return [
        CaseSpec("env", "env", 0, 30),
        CaseSpec("attention", "attention", 20, 90),
        CaseSpec("parity", "parity", 30, 120),
        _step("step-D-b8-text", "jax", "D_iada_lora", 8, 0, 60, 300),
        _step("step-B-b8-text", "jax", "B_lora", 8, 0, 60, 300),
        _step("step-torch-B-b8-text", "torch", "B_lora", 8, 0, 45, 240),
        _step("step-D-b8-img1", "jax", "D_iada_lora", 8, 1, 60, 300),
        _layouts(150, 420, "--seq", "2048", "--batch", "16", "--pack-batch", "4", "--samples", "256", "--passes", "2",
                 "--dtype", "bfloat16"),
        _step(f"step-D-b{TRAIN_PY_GPU[0]}-s{TRAIN_PY_GPU[2]}-img1", "jax", "D_iada_lora", TRAIN_PY_GPU[0], 1, 60, 200,
              "--seq", str(TRAIN_PY_GPU[2])),  # train.py's shapes, for ratios()
        CaseSpec("train.py", "train_py", 150, 300),
        _step("step-D-b16-text", "jax", "D_iada_lora", 16, 0, 60, 300),
        CaseSpec("decode", "decode", 90, 240, ("--batch", "16", "--prompt", "1024", "--new", "64", "--dtype", "bfloat16")),
        _step("step-D-b8-text-xla", "jax", "D_iada_lora", 8, 0, 60, 300, "--attention", "xla"),
        _step("step-torch-B-b8-img1", "torch", "B_lora", 8, 1, 45, 240),
        _step("step-B-b8-img1", "jax", "B_lora", 8, 1, 60, 300),
        _step("step-torch-B-b16-text", "torch", "B_lora", 16, 0, 45, 240),
        _step("step-B-b16-text", "jax", "B_lora", 16, 0, 60, 300),
    ]


# ----------------------------------------------------------------------------- environment


def env_row(cpu: bool) -> dict:
    from bench.train_step import versions

    row = {"kind": "env", "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "versions": versions(), "wheels": os.environ.get("IADA_WHEELS", "none")}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        row["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        row["gpus"] = []
    row["device"] = row["gpus"][0].split(",")[0] if row["gpus"] else "cpu"
    row["status"] = "ok"
    return row


# ----------------------------------------------------------------------------- running a case


class Runner:
    def __init__(self, out_dir: str, budget_s: float, cpu: bool):
        self.out_dir, self.budget_s, self.cpu = out_dir, budget_s, cpu
        self.t0 = time.monotonic()
        self.rows: list[tuple[int, int, dict]] = []  # (plan index, arrival, row)
        self.order: dict[str, int] = {}
        self.lock = threading.Lock()
        self.log_path = os.path.join(out_dir, "cases.log")
        open(self.log_path, "w").close()
        # Nothing may wait on a network the GPU machine does not have.
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1")
        if cpu:  # the suite's setting: compile fast, numerics unchanged
            self.env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
            self.env["JAX_PLATFORMS"] = "cpu"
        self.device = "cpu"
        self.versions: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def say(self, message: str) -> None:
        print(f"[device_run {time.monotonic() - self.t0:6.1f}s] {message}", flush=True)

    def command(self, argv: list[str], limit_s: float, log: list[str], stop_when=None):
        """Run argv from the repository root, its output appended to `log`. stop_when(): polled;
        once true the process gets SIGTERM (a graceful stop); at limit_s it is killed. Returns
        (returncode, or None if killed, seconds, the end of its output)."""
        start = time.monotonic()
        log.append(f"$ {shlex.join(argv)}\n")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        first = len(log)

        def pump():
            for line in proc.stdout:
                log.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        termed = False
        while proc.poll() is None:
            if stop_when is not None and not termed and stop_when():
                proc.send_signal(signal.SIGTERM)
                termed = True
            if time.monotonic() - start > limit_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                reader.join(5)
                return None, time.monotonic() - start, "".join(log[first:][-60:])
            time.sleep(0.2)
        reader.join(5)
        return proc.returncode, time.monotonic() - start, "".join(log[first:][-60:])

    def record(self, spec: CaseSpec, row: dict, log: list[str]) -> None:
        row = dict(row, case=spec.name)
        row.setdefault("device", self.device)
        row.setdefault("versions", self.versions)
        with self.lock:
            self.rows.append((self.order[spec.name], len(self.rows), row))
            self.rows.sort(key=lambda x: x[:2])
            rows = [r for _, _, r in self.rows]
            write_results(self.out_dir, rows, self.budget_s, self.cpu)
            if log:
                with open(self.log_path, "a") as f:
                    f.write(f"\n===== {spec.name}\n" + "".join(log))
                log.clear()

    def results(self) -> list[dict]:
        return [r for _, _, r in self.rows]

    def run_all(self, cases: list[CaseSpec], jobs: int) -> None:
        """The cases in order; with jobs > 1 (CPU only) that many at a time, each started in plan order."""
        self.order = {c.name: i for i, c in enumerate(cases)}
        first, rest = cases[:1], cases[1:]
        for spec in first:  # env: the device and versions every later row names
            self.run(spec)
        if jobs <= 1:
            for spec in rest:
                self.run(spec)
            return
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            list(pool.map(self.run, rest))

    def run(self, spec: CaseSpec) -> None:
        left = self.left()
        log: list[str] = []
        if left < spec.needs_s:
            reason = f"{left:.0f} s of the budget left, the case needs about {spec.needs_s:.0f} s"
            self.say(f"SKIP {spec.name}: {reason}")
            self.record(spec, {"kind": spec.kind, "status": "skipped", "reason": reason}, log)
            return
        self.say(f"START {spec.name} (up to {min(spec.limit_s, left):.0f} s)")
        try:
            row_or_rows = getattr(self, f"_{spec.kind}")(spec, min(spec.limit_s, left), log)
        except Exception as e:  # a bug of this driver must not lose the other cases
            import traceback

            tb = traceback.format_exc()
            print(tb, flush=True)
            row_or_rows = {"kind": spec.kind, "status": "failed", "error": f"{type(e).__name__}: {e}", "output": tb[-3000:]}
        for row in row_or_rows if isinstance(row_or_rows, list) else [row_or_rows]:
            self.record(spec, row, log)
            self.say(f"{row.get('status', '?').upper()} {spec.name}: {summary_line(row)}")
            if row.get("status") in ("failed", "timeout"):
                print(row.get("output", ""), flush=True)

    # ------------------------------------------------------------------ the kinds
    def _env(self, spec, limit, log):
        row = env_row(self.cpu)
        self.device, self.versions = row["device"], row["versions"]
        return row

    def _python_case(self, spec, limit, log, module_args: list[str], kind: str):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            argv = [sys.executable, "-m"] + module_args + ["--out", out]
            rc, seconds, tail = self.command(argv, limit, log)
            command = "python -m " + shlex.join(module_args)
            if rc is None:
                return {"kind": kind, "status": "timeout", "seconds": seconds, "command": command, "output": tail[-3000:]}
            if not os.path.exists(out):
                return {"kind": kind, "status": "failed", "returncode": rc, "seconds": seconds, "command": command,
                        "output": tail[-3000:]}
            with open(out) as f:
                rows = json.load(f)
        rows = rows if isinstance(rows, list) else [rows]
        return [dict(r, command=command, seconds=seconds, status=r.get("status", "ok")) for r in rows]

    def _attention(self, spec, limit, log):
        return self._python_case(spec, limit, log, ["bench.parity", "attention"] + (["--tiny"] if self.cpu else []), "attention")

    def _parity(self, spec, limit, log):
        return self._python_case(spec, limit, log, ["bench.parity", "forward"], "parity")

    def _step(self, spec, limit, log):
        return self._python_case(spec, limit, log, ["bench.train_step"] + list(spec.args), "step")

    def _layouts(self, spec, limit, log):
        return self._python_case(spec, limit, log, ["bench.train_step"] + list(spec.args), "layouts")

    def _decode(self, spec, limit, log):
        return self._python_case(spec, limit, log, ["bench.decode_speed"] + list(spec.args), "decode")

    def _train_py(self, spec, limit, log):
        """A random full-size checkpoint, generated data, then train.py until SIGTERM."""
        start = time.monotonic()
        work = tempfile.mkdtemp(prefix="device_run_train_")
        model, data, run = (os.path.join(work, n) for n in ("model", "data", "run"))
        preset, rows, size = ("tiny", 64, 64) if self.cpu else ("qwen3-vl-2b", 4096, 448)
        batch, accum, length = (2, 2, 128) if self.cpu else TRAIN_PY_GPU
        dtype = "float32" if self.cpu else "bfloat16"
        steps = [
            [sys.executable, "-m", "convert", "random-init", "--preset", preset, model, "--dtype", dtype],
            [sys.executable, "-m", "iada_jax.embedded.synthetic", data, "--rows", str(rows), "--image-size", str(size)],
        ]
        commands = []
        for argv in steps:
            commands.append(shlex.join(["python"] + argv[1:]))
            rc, seconds, tail = self.command(argv, limit - (time.monotonic() - start), log)
            if rc != 0:
                return {"kind": "train_py", "status": "failed" if rc is not None else "timeout", "command": commands[-1],
                        "output": tail[-3000:]}
        train = [sys.executable, "train.py", "--model", model, "--data", os.path.join(data, "train.parquet"),
                 "--out", run, "--exp", "D_iada_lora", "--batch-size", str(batch), "--grad-accum", str(accum),
                 "--max-length", str(length), "--buckets", str(length), "--dtype", dtype, "--param-dtype", dtype,
                 "--steps", "100000", "--save-every", "100000", "--no-progress", "--mesh-data", "1"]
        if self.cpu:  # the tiny model's 64x64 images
            train += ["--block-size", "2", "--min-pixels", "1024", "--max-pixels", "4096"]
        commands.append(shlex.join(["python"] + train[1:]))
        from iada_jax.train.metrics import read_metrics

        # A minute of steps after start-up (loading, indexing, compiling; 3 steps on CPU), then
        # SIGTERM: train.py saves a checkpoint and exits 0, which is checked too.
        first_step: list[float] = []

        def enough():
            records = read_metrics(run)
            if records and not first_step:
                first_step.append(time.monotonic())
            return len(records) >= 3 and (self.cpu or time.monotonic() - first_step[0] > 60)

        rc, seconds, tail = self.command(train, limit - (time.monotonic() - start), log, stop_when=enough)
        records = read_metrics(run)
        try:  # the kernel train.py's "auto" attention chose
            with open(os.path.join(run, "config.json")) as f:
                attention = json.load(f).get("attention")
        except (OSError, ValueError):
            attention = None
        shutil.rmtree(work, ignore_errors=True)
        row = {"kind": "train_py", "command": " && ".join(commands).replace(work, "$WORK"), "seconds": time.monotonic() - start,
               "train_seconds": seconds, "returncode": rc, "batch": batch, "grad_accum": accum, "seq": length,
               "images": 1, "exp": "D_iada_lora", "attention": attention, "optimizer_steps": len(records)}
        steady = records[2:] if len(records) > 4 else records[1:]
        if not steady:
            return dict(row, status="failed", reason=f"{len(records)} optimizer step(s) logged", output=tail[-3000:])
        step_s = sorted(r["step_s"] for r in steady)[len(steady) // 2]
        row.update(step_s=step_s, micro_step_s=step_s / accum, real_tokens_per_s=sorted(
            r["tokens_per_s"] for r in steady)[len(steady) // 2], padded_tokens_per_s=batch * accum * length / step_s,
            status="ok" if rc == 0 else "failed")
        if rc != 0:
            row["output"] = tail[-3000:]
        return row


# ----------------------------------------------------------------------------- report


def summary_line(row: dict) -> str:
    kind = row.get("kind")
    if row.get("status") == "skipped":
        return row.get("reason", "")
    if row.get("status") in ("failed", "timeout"):
        return row.get("error") or row.get("reason") or f"returncode {row.get('returncode')}, see cases.log"
    if kind == "step":
        return (f"{row['stack']} {row['exp']} b{row['batch']} img{row['images']}: {row['tokens_per_s']:.0f} tokens/s, "
                f"step {row['step_s']:.3f} s, MFU {_fmt(row.get('mfu'), '.1%')}, peak {_fmt(row.get('peak_gib'), '.1f')} GiB")
    if kind == "decode":
        ours, theirs = row["jax"], row["torch"]
        return (f"{row['dtype']} b{row['batch']}, prompt {row['prompt']} ({row['image_tokens']} image tokens), "
                f"{row['new']} new: ours {ours['tokens_per_s']:.0f} tokens/s ({ours['generate_s']:.2f} s, compile "
                f"{ours['compile_s']:.0f} s), transformers {theirs['tokens_per_s']:.0f} tokens/s "
                f"({theirs['generate_s']:.2f} s): {row['speedup']:.2f}x (target 3x); first {row['agree_tokens']} "
                f"tokens equal in {row['first_tokens_equal_fraction']:.0%} of samples (mean common prefix "
                f"{row['mean_common_prefix']:.1f})")
    if kind == "layouts":
        parts = []
        for name in ("packed", "bucketed"):
            if name in row:
                r = row[name]
                parts.append(f"{name} {_layout_batch(row, name)}: {r['real_tokens_per_s']:.0f} real tokens/s (real "
                             f"fraction {r['real_fraction']:.0%}, step {r['step_s']:.3f} s, {r['programs']} program(s), "
                             f"compile {r['compile_s']:.0f} s)")
        ratio = f": {row['ratio']:.2f}x (target 1.3x)" if "ratio" in row else ""
        return f"{row['exp']} {row['dtype']} seq {row['seq']}, {row['samples']} samples: " + ", ".join(parts) + ratio
    if kind == "train_py":
        return f"{row['optimizer_steps']} steps, {row['padded_tokens_per_s']:.0f} padded tokens/s"
    if kind == "env":
        return f"{row['device']}; jax {row['versions'].get('jax')}, transformers {row['versions'].get('transformers')}"
    if kind == "parity":
        extra = (f", PyTorch bf16 itself {row['torch_bf16_max_abs_diff']:.3g}" if "torch_bf16_max_abs_diff" in row else "")
        return (f"{row['dtype']}: max |ours - transformers| = {row['max_abs_diff']:.3g} on logits of scale "
                f"{row['logit_scale']:.1f} (tolerance {row['tol']:.3g}{extra})")
    if kind == "attention":
        if "cudnn_max_abs_diff_valid" in row:
            return (f"{row['shape']}: cuDNN - XLA max abs {row['cudnn_max_abs_diff_valid']:.3g} on valid rows "
                    f"(output scale {row['output_scale']:.2f}), gradients {row['cudnn_grad_max_abs_diff']}; padded rows "
                    f"finite: cuDNN {row['cudnn_padded_rows_finite']}, XLA {row['xla_padded_rows_finite']}; "
                    f"gradients finite: {row['cudnn_grads_finite']}")
        return f"{row['shape']}: XLA padded rows finite {row['xla_padded_rows_finite']}; {row.get('reason', '')}"
    return json.dumps({k: v for k, v in row.items() if k not in ("versions", "what", "command", "output")})[:300]


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def _layout_batch(row: dict, name: str) -> str:
    """A layouts row's batch: "4 x 2048" packed rows, "b16 (512: 12, 1024: 3)" bucketed (length: batches)."""
    r = row[name]
    if name == "packed":
        return f"{r['batch_rows']} x {row['seq']}"
    return f"b{r['batch_rows']} (" + ", ".join(f"{k}: {v}" for k, v in r["lengths"].items()) + ")"


def ratios(rows: list[dict]) -> dict[str, float]:
    """Our tokens/s over the PyTorch LoRA baseline's at the same shape (PyTorch has no trainable
    IADA: B_lora is the baseline of every experiment), and IADA's share (D over B, minus 1)."""
    def key(r):
        return (r["stack"], r["exp"], r["seq"], r["images"], r["batch"], r.get("attention", "xla"), r.get("remat", "full"))

    steps = {key(r): r for r in rows if r.get("kind") == "step" and r.get("status") == "ok"}
    out = {}
    for (stack, exp, seq, images, batch, attention, remat), r in steps.items():
        if stack != "jax":
            continue
        shape = (f"seq {seq} img {images} b{batch}" + ("" if attention == "xla" else f" {attention}")
                 + ("" if remat == "full" else f" remat {remat}"))
        torch_row = steps.get(("torch", "B_lora", seq, images, batch, "sdpa", "full"))
        if torch_row:
            out[f"{exp} / torch B_lora tokens/s, {shape}"] = r["tokens_per_s"] / torch_row["tokens_per_s"]
        lora = steps.get(("jax", "B_lora", seq, images, batch, attention, remat))
        if exp != "B_lora" and lora:
            out[f"{exp} step time over B_lora - 1 (IADA's share), {shape}"] = r["step_s"] / lora["step_s"] - 1
    for r in rows:
        if r.get("kind") == "decode" and r.get("status") == "ok":
            out[f"ours / transformers generated tokens/s, {r['dtype']} b{r['batch']} prompt {r['prompt']} "
                f"new {r['new']}"] = r["speedup"]
        if r.get("kind") == "layouts" and r.get("status") == "ok" and "ratio" in r:
            out[f"packed / bucketed real tokens/s, {r['exp']} {r['dtype']} seq {r['seq']} (packed "
                f"{r['packed']['batch_rows']} x {r['seq']}, bucketed b{r['bucketed']['batch_rows']})"] = r["ratio"]
        if r.get("kind") == "train_py" and r.get("status") == "ok":
            bare = steps.get(("jax", r["exp"], r["seq"], r["images"], r["batch"], r.get("attention") or "xla", "full"))
            if bare:
                out[f"train.py padded tokens/s over the bare step's, b{r['batch']} seq {r['seq']} "
                    f"(real fraction {r['real_tokens_per_s'] / r['padded_tokens_per_s']:.0%})"] = \
                    r["padded_tokens_per_s"] / bare["tokens_per_s"]
    return out


def markdown(rows: list[dict], budget_s: float, cpu: bool) -> str:
    env = next((r for r in rows if r.get("kind") == "env"), {})
    device = env.get("device", "?")
    lines = [f"# bench/device_run.sh{' --cpu' if cpu else ''}: {device}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    if env:
        v = env.get("versions", {})
        lines.append(f"Device: {device} ({'; '.join(env.get('gpus', [])) or 'no GPU'}), python {env.get('python')}, "
                     + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; wheels: {env.get('wheels')}. "
                     f"Budget {budget_s:.0f} s.")
        lines.append("")
    steps = [r for r in rows if r.get("kind") == "step" and r.get("status") == "ok"]
    if steps:
        torch_by_shape = {(r["seq"], r["images"], r["batch"]): r for r in steps if r["stack"] == "torch"}
        lines += ["| device | stack | exp | seq | img | batch | attention | remat | step s | tokens/s | vs torch | "
                  "TFLOP/s | MFU | peak GiB | compiled GiB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            base = torch_by_shape.get((r["seq"], r["images"], r["batch"]))
            vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["stack"] == "jax" else ""
            lines.append(f"| {r['device']} | {r['stack']} | {r['exp']} | {r['seq']} | {r['images']} | {r['batch']} | "
                         f"{r.get('attention')} | {r.get('remat', 'full')} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {vs} | "
                         f"{r['model_tflops']:.1f} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('peak_gib'), '.1f')} | "
                         f"{_fmt(r.get('compiled_total_gib'), '.1f')} | {_fmt(r.get('compile_s'), '.0f')} |")
        lines.append("")
    decodes = [r for r in rows if r.get("kind") == "decode" and r.get("status") == "ok"]
    if decodes:
        lines += ["| device | generation | dtype | batch | prompt | new | wall s | generated tokens/s | vs transformers | "
                  "first call s | compile s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in decodes:
            for stack, name in (("jax", "ours"), ("torch", "transformers")):
                s = r[stack]
                lines.append(f"| {s['device']} | {name} | {r['dtype']} | {r['batch']} | {r['prompt']} | {r['new']} | "
                             f"{s['generate_s']:.3f} | {s['tokens_per_s']:.0f} | "
                             f"{format(r['speedup'], '.2f') + 'x' if stack == 'jax' else ''} | {s['first_call_s']:.1f} | "
                             f"{_fmt(s.get('compile_s'), '.1f')} | {_fmt(s.get('peak_gib'), '.1f')} |")
        lines.append("")
    layouts = [r for r in rows if r.get("kind") == "layouts" and r.get("status") == "ok"]
    if layouts:
        lines += ["| device | layout | exp | dtype | batch (length: batches) | programs | step s | real tokens/s | "
                  "token slots/s | real fraction | real tokens / step | vs bucketed | compile s | compiled GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in layouts:
            for name in ("packed", "bucketed"):
                if name not in r:
                    continue
                m = r[name]
                vs = f"{r['ratio']:.2f}x" if name == "packed" and "ratio" in r else ""
                lines.append(f"| {r['device']} | {name} | {r['exp']} | {r['dtype']} | {_layout_batch(r, name)} | "
                             f"{m['programs']} | {m['step_s']:.3f} | {m['real_tokens_per_s']:.0f} | "
                             f"{m['token_slots_per_s']:.0f} | {m['real_fraction']:.1%} | {m['real_tokens_per_step']:.0f} | "
                             f"{vs} | {m['compile_s']:.0f} | {_fmt(m.get('compiled_total_gib'), '.1f')} |")
        lines.append("")
        lines += [f"Rates per real token: each layout steps {r['passes']} time(s) through its full batches of the "
                  f"same {r['samples']} samples (llava-like lengths, {r['visual_tokens_per_sample']:.0f} visual tokens "
                  f"a sample; untimed: {r.get('packed', {}).get('untimed_batches', 0)} last packed batch completed "
                  f"with empty rows); step s is per batch." for r in layouts]
        lines.append("")
    for name, value in ratios(rows).items():
        lines.append(f"- {name}: " + (f"{value:+.1%}" if "share" in name else f"{value:.2f}x"))
    lines.append("")
    for r in rows:
        if r.get("kind") == "step" and r.get("status") == "ok":
            continue
        lines.append(f"- **{r.get('case')}** ({r.get('kind')}): {r.get('status')}. {summary_line(r)}"
                     + (f" Command: `{r['command']}`" if r.get("command") else ""))
    lines += ["", "Commands of the step rows (from the repository root):", ""]
    lines += [f"- `{r['command']}`" for r in steps if r.get("command")]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, rows: list[dict], budget_s: float, cpu: bool) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"cpu": cpu, "budget_s": budget_s, "rows": rows, "ratios": ratios(rows)}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows, budget_s, cpu))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/device_run.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny dimensions on CPU (the suite's check of this program)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all cases (default 510; --cpu 300)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="cases at a time (default 1; --cpu: 2, since XLA compiles on one core). Never above 1 on a GPU:"
                         " the timings and peak memory are each case's own")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (comma-separated)")
    args = ap.parse_args(argv)
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    budget = args.budget_s or (300.0 if args.cpu else 510.0)
    runner = Runner(out_dir, budget, args.cpu)
    cases = plan(args.cpu)
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in cases if c.kind == "env" or any(w in c.name for w in wanted)]
    jobs = args.jobs or (2 if args.cpu else 1)
    runner.say(f"{len(cases)} cases, budget {budget:.0f} s, {jobs} at a time, results in {out_dir}")
    runner.run_all(cases, jobs)
    rows = runner.results()
    bad = [r for r in rows if r.get("status") in ("failed", "timeout", "mismatch")]
    runner.say(f"done: {len(rows)} rows, {len(bad)} failed or mismatched; see {out_dir}/results.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
