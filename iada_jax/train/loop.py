"""The training run: load, shard, loop, checkpoint, resume, log. `train.py` is its CLI.

A run directory holds config.json (this run's settings), checkpoints/<step> (orbax: train
state + data position, asynchronous, the last K kept), metrics.jsonl, tensorboard/ and,
at the end, loss.png and final/ (the trainable collections only). A run that trains the base
(experiment `full`) also writes final/model/: the trained base as a converted checkpoint
(float32, with the --model folder's config, tokenizer and processor files), which
`load_pretrained`, `train.py --model` and `eval.py --model` read like any other.

Exact resume: the data plan is a pure function of (seed, epoch), the dropout key a pure
function of (seed, step, micro-batch), and checkpoints are taken at optimizer-step
boundaries, so a run stopped after step k and resumed continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from iada_jax.checkpoint import save_params, tree_specs, write_base_checkpoint, write_folder_atomically
from iada_jax.config import ForwardConfig
from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.loader import DataConfig, SFTData
from iada_jax.experiments import get_experiment
from iada_jax.model.layers import resolve_attention
from iada_jax.train.checkpoints import RunCheckpoints
from iada_jax.train.metrics import MetricsWriter, plot_loss
from iada_jax.train.optimizer import OptimizerConfig
from iada_jax.train.sharding import (
    initialize_distributed,
    make_mesh,
    param_shardings,
    place_batch,
    state_shardings,
    to_host,
)
from iada_jax.train.step import TrainProgram


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str  # converted checkpoint or HF folder (with tokenizer files)
    data: str  # data file / folder / cached data set name
    out: str  # run directory
    exp: str = "D_iada_lora"
    batch_size: int = 4  # per micro-batch, global
    grad_accum: int = 4  # micro-batches per optimizer step (paper: effective batch 16)
    max_length: int = 1024
    epochs: int = 1
    steps: int | None = None  # optimizer steps; overrides epochs
    lora_r: int | None = None  # override the experiment's LoRA rank (alpha scales with it)
    lora_lr: float = 2e-4
    iada_lr: float = 1e-3
    base_lr: float = 1e-4  # the base's own weights (experiment full)
    vision_lr: float | None = None  # experiment full: the vision tower's (None: base_lr; 0: kept as loaded)
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    dtype: str = "bfloat16"  # compute; trainable params and optimizer state stay float32
    param_dtype: str = "bfloat16"  # the frozen base (a trained base is a float32 master copy)
    remat: str = "full"  # rematerialisation policy of a decoder layer (config.REMAT_POLICIES)
    attention: str = "auto"  # "auto": cuDNN on an NVIDIA GPU with bf16 compute, else XLA (layers.resolve_attention)
    loss_chunk: int = 1024  # tokens per chunk of the loss head (logits [chunk, vocab] at a time)
    block_size: int | None = None  # IADA block size S (default: the experiment's, 4)
    mesh_data: int = -1
    mesh_fsdp: int = 1
    save_every: int = 200  # optimizer steps
    keep: int = 3
    resume: bool = False
    stop_after: int | None = None  # end this invocation (with a checkpoint) after N optimizer steps
    init_adapters: str | None = None  # start from these adapters (convert import-peft output, a run dir)
    max_images: int = 1
    buckets: tuple[int, ...] = ()
    # Image size limits (pixels after resizing; a 32x32-pixel square is one visual token at
    # Qwen3-VL's patch 16 and merge 2): lmms-eval 0.7.3's qwen3_vl model, so training sees
    # images as the paper's evaluation does (196 to 1568 visual tokens); README "Images".
    min_pixels: int = 200704
    max_pixels: int = 1605632
    messages_loss: str = "all"  # messages rows: "all" tokens (TRL's default) or "assistant" turns only
    index_cache: str | None = None  # folder of cached row indexes (default ~/.cache/iada_jax/index; "" none)
    index_only: bool = False  # build or load the index, print what it holds, exit
    pack: bool = False  # several samples per row of max_length tokens, kept apart (data/packing.py)
    pack_samples: int = 16  # at most this many samples in a packed row
    pack_window: int = 2048  # rows placed first-fit decreasing together (shuffled order)
    workers: int = 2
    prefetch: int = 4
    progress: bool = True


class TrainingError(RuntimeError):
    pass


def _experiment(cfg: TrainConfig):
    exp = get_experiment(cfg.exp, cfg.block_size)
    if cfg.lora_r is not None and exp.lora is not None:
        scale = exp.lora.lora_alpha / exp.lora.r
        exp = dataclasses.replace(exp, lora=dataclasses.replace(exp.lora, r=cfg.lora_r, lora_alpha=scale * cfg.lora_r))
    if not exp.trains:
        raise TrainingError(f"experiment {cfg.exp!r} trains nothing (it is the pre-trained baseline)")
    start = None
    if cfg.vision_lr is not None and not exp.base:  # before a model is loaded
        raise TrainingError(f"--vision-lr sets the vision tower's rate in full-parameter training (--exp full); "
                            f"experiment {exp.name!r} keeps the tower frozen")
    if cfg.init_adapters and exp.base:
        raise TrainingError(f"--init-adapters: experiment {exp.name!r} trains the base itself and has no adapters to "
                            "start from; to continue from a full run, pass its RUN/final/model as --model")
    if cfg.init_adapters:
        exp, start = _with_start(cfg, exp)
    return exp, start


def _with_start(cfg: TrainConfig, exp):
    """The experiment with the LoRA shape of the adapters it starts from (rank, alpha, targets;
    dropout stays the experiment's: it is a training setting), and those adapters."""
    from iada_jax.adapters import load_adapters

    start = load_adapters(cfg.init_adapters)
    where = f"--init-adapters {cfg.init_adapters}"
    if cfg.lora_r is not None:
        raise TrainingError(f"{where} fixes the LoRA rank; drop --lora-r")
    for name in ("lora", "iada"):
        if getattr(start, name) is not None and getattr(exp, name) is None:
            raise TrainingError(f"{where} holds {name} weights but experiment {exp.name!r} trains no {name}")
    if start.lora is not None:
        exp = dataclasses.replace(exp, lora=dataclasses.replace(start.lora, lora_dropout=exp.lora.lora_dropout))
    if start.iada is not None and start.iada != exp.iada:
        differ = [f"{f.name}={getattr(start.iada, f.name)!r} (experiment: {getattr(exp.iada, f.name)!r})"
                  for f in dataclasses.fields(start.iada) if getattr(start.iada, f.name) != getattr(exp.iada, f.name)]
        raise TrainingError(f"{where}: its IADA differs from experiment {exp.name!r}: {', '.join(differ)}")
    return exp, start


def _start_from(trainable: dict, start, where: str) -> dict:
    """Fresh adapters with the collections `start` holds replaced by its weights (same shapes)."""
    out = dict(trainable)
    for name, value in start.variables.items():
        want = jax.tree.map(lambda x: x.shape, trainable[name])
        got = jax.tree.map(lambda x: x.shape, value)
        if want != got:
            raise TrainingError(f"--init-adapters {where}: the {name} weights do not fit this model "
                                f"(expected shapes {want}, found {got})")
        out[name] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), value)
    return out


def _load(cfg: TrainConfig, mesh, log, dtype: str):
    """The model with its base weights read a leaf at a time straight onto the mesh (each device
    receives only its shards; no full copy on one device)."""
    from iada_jax.pretrained import load_pretrained

    model = load_pretrained(cfg.model, dtype=dtype,
                            shardings=lambda config, params: param_shardings(params, config, mesh))
    log(f"model: {cfg.model} ({model.config.text.num_hidden_layers} layers, d={model.config.text.hidden_size})")
    return model


def _data(cfg: TrainConfig, log) -> SFTData:
    """The tokenizer, the image processing with this run's pixel limits, and the indexed data
    (needs the model's config and tokenizer files only, not its weights)."""
    from transformers import AutoTokenizer

    from iada_jax.pretrained import load_config

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except Exception as e:
        raise TrainingError(f"{cfg.model}: no usable tokenizer files ({e}); the model folder must hold the "
                            "tokenizer and its chat template") from None
    if tokenizer.chat_template is None:
        raise TrainingError(f"{cfg.model}: the tokenizer has no chat template")
    mcfg, image_config = load_config(cfg.model)
    image_config = dataclasses.replace(image_config or ImageProcessorConfig(), min_pixels=cfg.min_pixels,
                                       max_pixels=cfg.max_pixels)
    return SFTData(DataConfig(path=cfg.data, max_length=cfg.max_length, batch_size=cfg.batch_size,
                              buckets=cfg.buckets, max_images=cfg.max_images, seed=cfg.seed,
                              prefetch=cfg.prefetch, workers=cfg.workers, messages_loss=cfg.messages_loss,
                              index_cache=cfg.index_cache, pack=cfg.pack, pack_samples=cfg.pack_samples,
                              pack_window=cfg.pack_window), tokenizer, image_config, mcfg, log=log)


def fit(cfg: TrainConfig, log=print) -> dict:
    used = [n for n in ("checkpoints", "metrics.jsonl", "final") if os.path.exists(os.path.join(cfg.out, n))]
    if used and not cfg.resume and not cfg.index_only:
        raise TrainingError(f"{cfg.out} already holds a run ({', '.join(used)}); continue it with --resume "
                            "or choose another --out")
    # The data first: indexing forks worker processes, which is safe only before JAX starts
    # its runtime (initialize_distributed, the mesh).
    data = _data(cfg, log)
    if cfg.index_only:
        log(data.describe())
        return {"index": data.index.path, "skipped": dict(data.skipped), "losses": [], "step": 0}
    initialize_distributed()
    os.makedirs(cfg.out, exist_ok=True)
    exp, start = _experiment(cfg)
    mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    if cfg.batch_size % mesh.size:
        raise TrainingError(f"batch_size={cfg.batch_size} is not a multiple of the {mesh.size} devices of the mesh")
    # A trained base is read in float32 (its master copy), never rounded through param_dtype.
    model = _load(cfg, mesh, log, "float32" if exp.base else cfg.param_dtype)
    mcfg = model.config
    block = exp.iada.block_size if exp.iada is not None else model.fwd.block_size
    attention = resolve_attention(cfg.attention, cfg.dtype)
    if attention != cfg.attention:
        log(f"attention: {attention} ({cfg.attention})")
    fwd = ForwardConfig(block_size=block, remat=cfg.remat, attention=attention, dtype=cfg.dtype)
    fwd.check(mcfg.text)

    per_epoch = data.batches_per_epoch()
    if per_epoch == 0:
        raise TrainingError(f"fewer usable rows than one batch of {cfg.batch_size} per length bucket")
    total_steps = cfg.steps or max(1, cfg.epochs * per_epoch // cfg.grad_accum)
    opt_cfg = OptimizerConfig(lora_lr=cfg.lora_lr, iada_lr=cfg.iada_lr, base_lr=cfg.base_lr, vision_lr=cfg.vision_lr,
                              schedule=cfg.schedule, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                              max_grad_norm=cfg.max_grad_norm)
    program = TrainProgram(mcfg, exp, fwd, opt_cfg, total_steps, cfg.grad_accum, cfg.loss_chunk)

    frozen = program.frozen(model.params)  # the base, already on the mesh (nothing when it trains)
    trainable = program.new_trainable(jax.random.PRNGKey(cfg.seed), model.params)
    if start is not None:
        trainable = _start_from(trainable, start, cfg.init_adapters)
        log(f"adapters from {cfg.init_adapters}: {', '.join(sorted(start.variables))}")
    # Adapters replicated; a trained base's master copy and its optimizer state sharded as the base.
    shardings = state_shardings(program.abstract_state(trainable, frozen), mcfg, mesh)
    trainable = jax.device_put(trainable, shardings["trainable"])
    state = program.init_state(trainable, frozen, shardings)
    del model, trainable  # the state holds what trains: no second copy of a trained base stays alive

    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump({"train": dataclasses.asdict(cfg), "lora": dataclasses.asdict(exp.lora) if exp.lora else None,
                   "iada": dataclasses.asdict(exp.iada) if exp.iada else None, "base": exp.base,
                   "total_steps": total_steps, "attention": attention,
                   "image": dataclasses.asdict(data.image_config), "index": data.index.path}, f, indent=1)

    ckpts = RunCheckpoints(cfg.out, keep=cfg.keep)
    position = (0, 0)
    if cfg.resume and ckpts.latest_step() is not None:
        step0 = ckpts.latest_step()
        state, meta = ckpts.restore(step0, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
        position = tuple(meta["position"])
        log(f"resumed from step {step0} (data epoch {position[0]}, batch {position[1]})")
    elif cfg.resume:
        log("--resume: no checkpoint yet, starting fresh")
    return _loop(cfg, data, state, frozen, program, mesh, ckpts, position, total_steps, log)


def _write_model(out_dir: str, params: dict, cfg: TrainConfig, step: int) -> str:
    """The trained base as a converted checkpoint folder (iada_jax/checkpoint.py), float32: the
    --model folder's config.json (the architecture is unchanged) and its tokenizer, chat
    template and processor files, so it is a --model for train.py and eval.py."""
    from convert.import_hf import copy_aux_files

    with open(os.path.join(cfg.model, "config.json")) as f:
        hf_config = json.load(f)
    specs, chunks = tree_specs(params)
    source = f"train.py --exp {cfg.exp} --out {os.path.abspath(cfg.out)} (step {step}) from {os.path.abspath(cfg.model)}"

    def write(folder):
        write_base_checkpoint(folder, specs, chunks, hf_config, dtype="float32", source=source)
        copy_aux_files(cfg.model, folder)

    return write_folder_atomically(out_dir, write)


class _Pending:
    """An optimizer step dispatched to the device whose metrics are not read yet."""

    def __init__(self, step: int, epoch: int, micro: list[dict], tokens: int):
        self.step, self.epoch, self.micro, self.tokens = step, epoch, micro, tokens


def _loop(cfg, data, state, frozen, program: TrainProgram, mesh, ckpts, position, total_steps, log):
    """Metrics are read one optimizer step late: step k's loss is read once step k + 1 is queued
    on the device, so the device never waits for the host. Before a checkpoint the step's own
    metrics are read first (a sync, at save steps only): a checkpoint never holds a step whose
    loss was not finite, and a NaN stops the run naming the step that produced it."""
    from tqdm import tqdm

    key = jax.random.PRNGKey(cfg.seed + 1)
    writer = MetricsWriter(cfg.out, enabled=jax.process_index() == 0)
    stop = {"signal": None}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    except ValueError:  # not the main thread: no handler
        previous = None
    step = start_step = int(to_host(state["step"]))
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress or jax.process_index() != 0,
               dynamic_ncols=True)
    last_saved = step if cfg.resume else None
    summary = {"run_dir": cfg.out, "skipped": dict(data.skipped), "losses": []}
    clock = {"read": time.perf_counter()}

    def report(p: _Pending) -> None:
        """Read a step's metrics (waits for that step only), check them, log them."""
        nll = sum(float(to_host(m["nll_sum"])) for m in p.micro)
        count = sum(float(to_host(m["tokens"])) for m in p.micro)
        loss, grad_norm = nll / max(count, 1.0), float(to_host(p.micro[-1]["grad_norm"]))
        now = time.perf_counter()
        elapsed, clock["read"] = now - clock["read"], now
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = ckpts.latest_step()
            raise TrainingError(f"loss is {loss} (gradient norm {grad_norm}) at step {p.step} (data epoch {p.epoch}); "
                                f"stopping. The last good checkpoint is "
                                f"{'step ' + str(kept) if kept is not None else 'none'}; lower the learning "
                                "rates or check that step's data")
        record = {"loss": loss, "grad_norm": grad_norm, "supervised_tokens": count,
                  "tokens_per_s": p.tokens / max(elapsed, 1e-9), "step_s": elapsed, "epoch": p.epoch}
        for c, lr in program.learning_rates(p.step - 1).items():
            record[f"lr_{c}"] = lr
        if "iada_gate" in p.micro[-1]:
            record["iada_gate"] = to_host(p.micro[-1]["iada_gate"]).reshape(-1).tolist()
        writer.write(p.step, record)
        summary["losses"].append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)

    def save(at_step, pos):
        ckpts.save(at_step, state, {"position": list(pos), "step": at_step})
        return at_step

    pending: _Pending | None = None
    micro: list[dict] = []
    tokens = 0
    next_pos = position
    batches = data.iterate(start=position)
    try:
        for pos, batch in batches:
            if step >= total_steps:
                break
            state, metrics = program.step(state, frozen, place_batch(batch, mesh), key)
            micro.append(metrics)
            tokens += int(np.asarray(batch.attention_mask).sum())  # host data: no device read
            if len(micro) < cfg.grad_accum:
                continue
            step += 1
            next_pos = (pos[0], pos[1] + 1)
            if pending is not None:
                report(pending)  # the previous step: done, or finishing while this one is queued
            pending, micro, tokens = _Pending(step, pos[0], micro, tokens), [], 0
            if cfg.stop_after is not None and step - start_step >= cfg.stop_after and step < total_steps:
                stop["signal"] = "stop_after"
            if step % cfg.save_every == 0 or step == total_steps or stop["signal"] is not None:
                report(pending)
                pending = None
                last_saved = save(step, next_pos)
            if stop["signal"] is not None:
                log(f"\nstopping ({stop['signal']}): saved step {step}; continue with --resume")
                summary["interrupted"] = True
                break
        else:
            if step < total_steps:
                log(f"data exhausted at step {step} of {total_steps}")
        if pending is not None:
            report(pending)
        if step > 0 and last_saved != step and not summary.get("interrupted"):
            save(step, next_pos)
    finally:
        batches.close()
        bar.close()
        ckpts.close()
        writer.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    summary["step"] = step
    trained = jax.tree.map(to_host, state["trainable"])  # every process (a sharded base is gathered)
    if step >= total_steps:
        final = os.path.join(cfg.out, "final")
        if os.path.exists(final) and jax.process_index() == 0:  # a resumed run that had already finished once
            import shutil

            shutil.rmtree(final)
        save_params(final, trained)  # every process (orbax synchronises them)
        if jax.process_index() == 0:
            summary["loss_png"] = plot_loss(cfg.out)
            if program.exp.base:
                summary["model_dir"] = _write_model(os.path.join(final, "model"), trained["params"], cfg, step)
                log(f"trained model: {summary['model_dir']} (float32; load it with iada_jax.load_pretrained, or "
                    "pass it as --model to train.py or eval.py)")
    summary["trainable"] = trained
    if data.skipped:
        log(f"skipped rows: {dict(data.skipped)}")
    return summary
