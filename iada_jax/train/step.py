"""`TrainProgram`: the one training program, built once per (model, experiment, forward,
optimizer) and used by `train.py` and by every benchmark tool (bench/), so a benchmark
measures the step a run executes: the same forward, loss, LoRA dropout, gradient
accumulation, clipping and optimizer.

The step is one jitted pure function of (state, frozen, batch, key) with the state donated:
gradients over the trainable collections only of the micro-batch's summed token losses,
accumulated over `grad_accum` micro-batches with their token counts, then divided by the
total count, clipped and applied. So a step of k micro-batches is the step of one batch of
all their tokens, every supervised token weighing the same (transformers' Trainer with
`num_items_in_batch` does the same).

What trains is the experiment's: its adapters (LoRA, IADA) over a frozen base, which no
backward pass differentiates (the vision tower's outputs even pass through `stop_gradient`),
or, for an experiment that trains the base (`full`), the base itself: then the trainable tree
holds {"params": a float32 master copy of the base}, the frozen tree is empty, and the
gradient reaches every base weight, the vision tower's included. The same step serves both;
compute stays in `ForwardConfig.dtype` (parameters are cast where they are used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iada_jax.config import ForwardConfig, Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.experiments import Experiment
from iada_jax.model.qwen3_vl import forward, init_adapters, lm_head_weight
from iada_jax.train.loss import chunked_next_token_nll
from iada_jax.train.optimizer import (
    BASE,
    TRAINABLE,
    VISION,
    OptimizerConfig,
    apply_gradients,
    clip_gradients,
    learning_rate_schedule,
    make_optimizer,
    peak_learning_rates,
)

Array = jax.Array


class TrainProgram:
    """The jitted training step of one experiment on one model, and what it starts from.

    program = TrainProgram(cfg, exp, fwd, OptimizerConfig(...), total_steps, grad_accum)
    trainable = program.new_trainable(key, params)   # float32 LoRA / IADA (and master base) variables
    frozen = program.frozen(params)                  # {"params": params}, or {} when the base trains
    state = program.init_state(trainable, frozen)
    state, metrics = program.step(state, frozen, batch, key)   # state is donated

    metrics (device values, read them when convenient): nll_sum and tokens of the micro-batch,
    applied (the optimizer ran), grad_norm (of the applied gradient, before clipping), and the
    IADA gates (when the experiment has a global or per-block gate).
    """

    def __init__(self, cfg: Qwen3VLConfig, exp: Experiment, fwd: ForwardConfig, opt: OptimizerConfig,
                 total_steps: int, grad_accum: int = 1, loss_chunk: int = 1024):
        fwd.check(cfg.text)
        if not exp.trains:
            raise ValueError(f"experiment {exp.name!r} trains nothing")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} must be at least 1")
        self.cfg, self.exp, self.fwd, self.opt = cfg, exp, fwd, opt
        self.total_steps, self.grad_accum, self.loss_chunk = total_steps, grad_accum, loss_chunk
        self.dropout = exp.lora is not None and exp.lora.lora_dropout > 0
        self.collections = TRAINABLE + ((BASE,) if exp.base else ())
        # The vision tower takes no gradient unless it trains (a frozen base, or vision_lr 0).
        self.frozen_vision = not exp.base or opt.vision_lr == 0
        self.tx = make_optimizer(opt, total_steps, self.collections)
        self.schedules = {c: learning_rate_schedule(lr, total_steps, opt) for c, lr in peak_learning_rates(opt).items()}
        self.step = jax.jit(self._step, donate_argnums=0)
        self.accumulate = jax.jit(self._accumulate)
        self._new_adapters = jax.jit(self._adapters)
        self._init_state = jax.jit(self._state)
        self._master = jax.jit(lambda params: jax.tree.map(lambda x: x.astype(jnp.float32), params))

    # ------------------------------------------------------------------ starting point
    def _adapters(self, key: Array, params: dict) -> dict:
        adapters = init_adapters(key, params, cfg=self.cfg, fwd=self.fwd, lora=self.exp.lora, iada=self.exp.iada)
        return jax.tree.map(lambda x: x.astype(jnp.float32), adapters)

    def new_adapters(self, key: Array, params: dict) -> dict:
        """Fresh float32 adapters (no forward pass is compiled for it)."""
        return self._new_adapters(key, params)

    def new_trainable(self, key: Array, params: dict) -> dict:
        """What the step trains, fresh: the adapters, and when the base trains a float32 master
        copy of `params` under "params" (a new buffer: `params` stays usable)."""
        trainable = self.new_adapters(key, params)
        if self.exp.base:
            trainable[BASE] = self._master(params)
        return trainable

    def frozen(self, params: dict) -> dict:
        """What the step reads but does not train: {"params": the base}, or nothing when the base trains."""
        return {} if self.exp.base else {BASE: params}

    def _state(self, trainable: dict, frozen: dict) -> dict:
        """step (optimizer updates done), micro (micro-batches accumulated since), the trainable
        collections (float32), the optimizer state, the gradient sum and its token count."""
        return {
            "step": jnp.zeros((), jnp.int32),
            "micro": jnp.zeros((), jnp.int32),
            "trainable": trainable,
            "opt_state": self.tx.init({**frozen, **trainable}),
            "grad_sum": jax.tree.map(jnp.zeros_like, trainable),
            "tokens": jnp.zeros((), jnp.float32),
        }

    def abstract_state(self, trainable: dict, frozen: dict) -> dict:
        """The state's shapes and dtypes (nothing computed), e.g. to choose its shardings."""
        return jax.eval_shape(self._state, trainable, frozen)

    def init_state(self, trainable: dict, frozen: dict, shardings: dict | None = None) -> dict:
        """The train state; `shardings` (a tree like `abstract_state`'s) places it as it is built,
        so a sharded base's optimizer moments never exist whole on one device."""
        if shardings is None:
            return self._init_state(trainable, frozen)
        return jax.jit(self._state, out_shardings=shardings)(trainable, frozen)

    def learning_rates(self, step: int) -> dict[str, float]:
        """The learning rate each trained collection ("lora", "iada", "base") had at optimizer
        step `step` (0-based)."""
        trained = {"lora": self.exp.lora is not None, "iada": self.exp.iada is not None, BASE: self.exp.base,
                   VISION: self.exp.base}
        return {"base" if c == BASE else c: float(self.schedules[c](step)) for c in self.schedules if trained[c]}

    # ------------------------------------------------------------------ the step
    def nll_sum(self, trainable: dict, frozen: dict, batch: Batch, dropout_rng: Array | None):
        """(sum of the supervised tokens' losses, their count): the forward to the final hidden
        states, then the chunked loss head (no [B, T, V] logits). The base is read from the
        trainable tree when it trains (gradients reach the vision tower), else from the frozen one."""
        params = trainable[BASE] if self.exp.base else frozen[BASE]
        adapters = {c: v for c, v in trainable.items() if c != BASE}
        hidden, _ = forward(params, batch, cfg=self.cfg, fwd=self.fwd, lora=self.exp.lora, iada=self.exp.iada,
                            adapters=adapters, dropout_rng=dropout_rng, logits=False, frozen_vision=self.frozen_vision)
        head, layout = lm_head_weight(params, self.cfg)
        return chunked_next_token_nll(hidden, head, batch, self.loss_chunk, layout)

    def _accumulate(self, state: dict, frozen: dict, batch: Batch, key: Array):
        """One micro-batch: add its gradient sum and token count. LoRA dropout's key is a pure
        function of (key, optimizer step, micro-batch), so a resumed run draws the same masks."""
        rng = jax.random.fold_in(jax.random.fold_in(key, state["step"]), state["micro"]) if self.dropout else None
        (total, count), grads = jax.value_and_grad(self.nll_sum, has_aux=True)(state["trainable"], frozen, batch, rng)
        state = dict(state, grad_sum=jax.tree.map(jnp.add, state["grad_sum"], grads), tokens=state["tokens"] + count,
                     micro=state["micro"] + 1)
        return state, {"nll_sum": total, "tokens": count}

    def gradient(self, state: dict) -> dict:
        """The accumulated gradient of the mean token loss: gradient sum / token count."""
        return jax.tree.map(lambda g: g / jnp.maximum(state["tokens"], 1.0), state["grad_sum"])

    def _apply(self, state: dict, frozen: dict):
        grads, norm = clip_gradients(self.gradient(state), self.opt.max_grad_norm)
        trainable, opt_state = apply_gradients(self.tx, state["opt_state"], state["trainable"], frozen, grads)
        return dict(state, trainable=trainable, opt_state=opt_state, grad_sum=jax.tree.map(jnp.zeros_like, grads),
                    tokens=jnp.zeros((), jnp.float32), micro=jnp.zeros((), jnp.int32), step=state["step"] + 1), norm

    def _step(self, state: dict, frozen: dict, batch: Batch, key: Array):
        """A micro-batch, and every `grad_accum`-th one also the optimizer update."""
        state, metrics = self._accumulate(state, frozen, batch, key)
        last = state["micro"] == self.grad_accum
        state, norm = jax.lax.cond(last, lambda s: self._apply(s, frozen), lambda s: (s, jnp.zeros((), jnp.float32)),
                                   state)
        metrics = dict(metrics, applied=last, grad_norm=norm)
        if "gate" in state["trainable"].get("iada", {}):  # read with the step's metrics, never from the state
            metrics["iada_gate"] = state["trainable"]["iada"]["gate"]
        return state, metrics
