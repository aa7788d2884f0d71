"""`TrainProgram`: the one training program, built once per (model, experiment, forward,
optimizer) and used by `train.py` and by every benchmark tool (bench/), so a benchmark
measures the step a run executes: the same forward, loss, LoRA dropout, gradient
accumulation, clipping and optimizer.

The step is one jitted pure function of (state, frozen, batch, key) with the state donated:
gradients over the trainable collections only (no backward pass ever produces a gradient for
the frozen base) of the micro-batch's summed token losses, accumulated over `grad_accum`
micro-batches with their token counts, then divided by the total count, clipped and applied.
So a step of k micro-batches is the step of one batch of all their tokens, every supervised
token weighing the same (transformers' Trainer with `num_items_in_batch` does the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iada_jax.config import ForwardConfig, Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.experiments import Experiment
from iada_jax.model.qwen3_vl import forward, init_adapters, lm_head_weight
from iada_jax.train.loss import chunked_next_token_nll
from iada_jax.train.optimizer import OptimizerConfig, apply_gradients, clip_gradients, learning_rate_schedule, make_optimizer

Array = jax.Array


class TrainProgram:
    """The jitted training step of one experiment on one model, and what it starts from.

    program = TrainProgram(cfg, exp, fwd, OptimizerConfig(...), total_steps, grad_accum)
    trainable = program.new_adapters(key, params)        # float32 LoRA / IADA variables
    state = program.init_state(trainable, {"params": params})
    state, metrics = program.step(state, {"params": params}, batch, key)   # state is donated

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
        self.tx = make_optimizer(opt, total_steps)
        self.schedules = {c: learning_rate_schedule(lr, total_steps, opt)
                          for c, lr in (("lora", opt.lora_lr), ("iada", opt.iada_lr))}
        self.step = jax.jit(self._step, donate_argnums=0)
        self.accumulate = jax.jit(self._accumulate)
        self._new_adapters = jax.jit(self._adapters)
        self._init_state = jax.jit(self._state)

    # ------------------------------------------------------------------ starting point
    def _adapters(self, key: Array, params: dict) -> dict:
        adapters = init_adapters(key, params, cfg=self.cfg, fwd=self.fwd, lora=self.exp.lora, iada=self.exp.iada)
        return jax.tree.map(lambda x: x.astype(jnp.float32), adapters)

    def new_adapters(self, key: Array, params: dict) -> dict:
        """Fresh float32 adapters (no forward pass is compiled for it)."""
        return self._new_adapters(key, params)

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

    def init_state(self, trainable: dict, frozen: dict) -> dict:
        return self._init_state(trainable, frozen)

    def learning_rates(self, step: int) -> dict[str, float]:
        """The learning rate each trained collection had at optimizer step `step` (0-based)."""
        return {c: float(self.schedules[c](step)) for c in ("lora", "iada") if getattr(self.exp, c) is not None}

    # ------------------------------------------------------------------ the step
    def nll_sum(self, trainable: dict, frozen: dict, batch: Batch, dropout_rng: Array | None):
        """(sum of the supervised tokens' losses, their count): the forward to the final hidden
        states, then the chunked loss head (no [B, T, V] logits)."""
        hidden, _ = forward(frozen["params"], batch, cfg=self.cfg, fwd=self.fwd, lora=self.exp.lora,
                            iada=self.exp.iada, adapters=trainable, dropout_rng=dropout_rng, logits=False)
        head, layout = lm_head_weight(frozen["params"], self.cfg)
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
