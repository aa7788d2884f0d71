"""`TrainProgram`: the one training program, built once per (model, experiment, forward,
optimizer) and used by `train.py` and by every benchmark tool (bench/), so a benchmark
measures the step a run executes: the same forward, loss, LoRA dropout, gradient
accumulation, clipping and optimizer.

The step is one jitted pure function of (state, frozen, batch, key) with the state donated:
gradients over the trainable collections only (no backward pass ever produces a gradient for
the frozen base), accumulated over `grad_accum` micro-batches, then clipped and applied.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from iada_jax.config import ForwardConfig, Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.experiments import Experiment
from iada_jax.model.qwen3_vl import forward, init_adapters
from iada_jax.train.loss import next_token_loss
from iada_jax.train.optimizer import OptimizerConfig, apply_gradients, clip_gradients, learning_rate_schedule, make_optimizer

Array = jax.Array


class TrainProgram:
    """The jitted training step of one experiment on one model, and what it starts from.

    program = TrainProgram(cfg, exp, fwd, OptimizerConfig(...), total_steps, grad_accum)
    trainable = program.new_adapters(key, params)        # float32 LoRA / IADA variables
    state = program.init_state(trainable, {"params": params})
    state, metrics = program.step(state, {"params": params}, batch, key)   # state is donated
    """

    def __init__(self, cfg: Qwen3VLConfig, exp: Experiment, fwd: ForwardConfig, opt: OptimizerConfig,
                 total_steps: int, grad_accum: int = 1):
        fwd.check(cfg.text)
        if not exp.trains:
            raise ValueError(f"experiment {exp.name!r} trains nothing")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} must be at least 1")
        self.cfg, self.exp, self.fwd, self.opt = cfg, exp, fwd, opt
        self.total_steps, self.grad_accum = total_steps, grad_accum
        self.dropout = exp.lora is not None and exp.lora.lora_dropout > 0
        self.tx = make_optimizer(opt, total_steps)
        self.schedules = {c: learning_rate_schedule(lr, total_steps, opt)
                          for c, lr in (("lora", opt.lora_lr), ("iada", opt.iada_lr))}
        self.step = jax.jit(self._step, donate_argnums=0)
        self._new_adapters = jax.jit(self._adapters)
        self._init_state = jax.jit(lambda trainable, frozen: init_train_state(trainable, frozen, self.tx))

    def logits(self, frozen: dict, batch: Batch, trainable: dict, dropout_rng: Array | None) -> Array:
        return forward(frozen["params"], batch, cfg=self.cfg, fwd=self.fwd, lora=self.exp.lora, iada=self.exp.iada,
                       adapters=trainable, dropout_rng=dropout_rng)[0]

    def _adapters(self, key: Array, params: dict) -> dict:
        adapters = init_adapters(key, params, cfg=self.cfg, fwd=self.fwd, lora=self.exp.lora, iada=self.exp.iada)
        return jax.tree.map(lambda x: x.astype(jnp.float32), adapters)

    def new_adapters(self, key: Array, params: dict) -> dict:
        """Fresh float32 adapters (no forward pass is compiled for it)."""
        return self._new_adapters(key, params)

    def init_state(self, trainable: dict, frozen: dict) -> dict:
        return self._init_state(trainable, frozen)

    def learning_rates(self, step: int) -> dict[str, float]:
        """The learning rate each trained collection had at optimizer step `step` (0-based)."""
        return {c: float(self.schedules[c](step)) for c in ("lora", "iada") if getattr(self.exp, c) is not None}

    def _step(self, state: dict, frozen: dict, batch: Batch, key: Array):
        return train_step(state, frozen, batch, key, forward_fn=self.logits, tx=self.tx, accum_steps=self.grad_accum,
                          dropout=self.dropout, max_grad_norm=self.opt.max_grad_norm)


# ----------------------------------------------------------------------------- the step


def init_train_state(trainable: dict, frozen: dict, tx: optax.GradientTransformation) -> dict:
    """step (optimizer updates done), micro (micro-batches accumulated since), the trainable
    collections (float32), the optimizer state, and the gradient accumulator."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "micro": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": tx.init({**frozen, **trainable}),
        "accum": jax.tree.map(jnp.zeros_like, trainable),
    }


def train_step(state: dict, frozen: dict, batch: Batch, key: Array, *, forward_fn: Callable,
               tx: optax.GradientTransformation, accum_steps: int, dropout: bool, max_grad_norm: float | None):
    """One micro-batch: gradients over the trainable collections, accumulated; every
    `accum_steps`-th call also applies the optimizer. Pure; jit with donate on `state`.

    forward_fn(frozen, batch, adapters, dropout_rng) -> logits. Returns (state, metrics).
    """
    rng = jax.random.fold_in(jax.random.fold_in(key, state["step"]), state["micro"]) if dropout else None

    def loss_fn(trainable):
        loss, count = next_token_loss(forward_fn(frozen, batch, trainable, rng), batch)
        return loss, count

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
    accum = jax.tree.map(lambda a, g: a + g / accum_steps, state["accum"], grads)
    last = state["micro"] + 1 == accum_steps

    def update(_):
        clipped, _ = clip_gradients(accum, max_grad_norm)
        new, opt_state = apply_gradients(tx, state["opt_state"], state["trainable"], frozen, clipped)
        return new, opt_state, jax.tree.map(jnp.zeros_like, accum), state["step"] + 1, jnp.zeros((), jnp.int32)

    def hold(_):
        return state["trainable"], state["opt_state"], accum, state["step"], state["micro"] + 1

    trainable, opt_state, new_accum, step, micro = jax.lax.cond(last, update, hold, None)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(accum), "applied": last}
    new_state = {"step": step, "micro": micro, "trainable": trainable, "opt_state": opt_state, "accum": new_accum}
    return new_state, metrics
