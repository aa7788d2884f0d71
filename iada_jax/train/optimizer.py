"""The optimizer over collections: AdamW per trainable collection, nothing for the frozen base.

Trainability is decided by collection. The variables a step sees are
{"params": the base, "lora": ..., "iada": ...}; the optimizer is an `optax.multi_transform`
over the labels {lora, iada, params, frozen}: AdamW with its own learning rate and schedule for
each trainable collection, `set_to_zero` (no state) for the rest. The base (`params`) is frozen
unless the experiment trains it (`Experiment.base`, the `full` experiment): then it is one
more trainable collection, at `base_lr`, its vision tower at `vision_lr` when that is set
(0: the tower keeps the weights it was loaded with, and has no optimizer state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

TRAINABLE = ("lora", "iada")  # the adapter collections; "params" (the base) joins them when it trains
BASE = "params"
FROZEN = "frozen"
VISION = "vision"  # the vision tower's leaves of a trained base, when they have their own rate


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW per trainable collection. The paper's learning rates were lost in its text;
    2e-4 for LoRA (the usual PEFT figure) and 1e-3 for IADA are ours; base_lr is for the base's
    own weights when they train (full-parameter training), vision_lr for the vision tower's among
    them (None: base_lr; 0: the tower stays as loaded)."""

    lora_lr: float = 2e-4
    iada_lr: float = 1e-3
    base_lr: float = 1e-4
    vision_lr: float | None = None
    schedule: str = "cosine"  # "cosine" | "linear" | "constant", after a linear warmup
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule={self.schedule!r}; use 'cosine', 'linear' or 'constant'")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.vision_lr is not None and self.vision_lr < 0:
            raise ValueError(f"vision_lr={self.vision_lr} must be at least 0")

    @property
    def vision_apart(self) -> bool:
        """Whether a trained base's vision tower has its own rate."""
        return self.vision_lr is not None and self.vision_lr != self.base_lr


def learning_rate_schedule(peak: float, total_steps: int, cfg: OptimizerConfig) -> optax.Schedule:
    warmup = int(round(cfg.warmup_ratio * total_steps))
    decay = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def peak_learning_rates(cfg: OptimizerConfig) -> dict[str, float]:
    """The peak learning rate of each collection that can train (and of a trained base's vision
    tower, when it has its own)."""
    peaks = {"lora": cfg.lora_lr, "iada": cfg.iada_lr, BASE: cfg.base_lr}
    if cfg.vision_apart:
        peaks[VISION] = cfg.vision_lr
    return peaks


def is_vision_leaf(path) -> bool:
    """A leaf of the vision tower (params["model"]["visual"]...)."""
    return any(getattr(k, "key", None) == "visual" for k in path)


def collection_labels(variables: dict, trainable: tuple[str, ...] = TRAINABLE, vision_apart: bool = False) -> dict:
    """A label per leaf: its collection name if trained, else "frozen"; with vision_apart, a
    trained base's vision-tower leaves are "vision"."""
    labels = {col: jax.tree.map(lambda _: col if col in trainable else FROZEN, tree) for col, tree in variables.items()}
    if vision_apart and BASE in trainable and BASE in variables:
        labels[BASE] = jax.tree_util.tree_map_with_path(lambda p, _: VISION if is_vision_leaf(p) else BASE,
                                                        variables[BASE])
    return labels


def make_optimizer(cfg: OptimizerConfig, total_steps: int, trainable: tuple[str, ...] = TRAINABLE
                   ) -> optax.GradientTransformation:
    """AdamW per trainable collection, set_to_zero for the rest (clipping: `clip_gradients`)."""
    transforms = {FROZEN: optax.set_to_zero()}
    peaks = peak_learning_rates(cfg)
    vision_apart = cfg.vision_apart and BASE in trainable
    for col in trainable + ((VISION,) if vision_apart else ()):
        if col == VISION and peaks[col] == 0:  # the tower stays as loaded: no moments either
            transforms[col] = optax.set_to_zero()
            continue
        transforms[col] = optax.adamw(
            learning_rate_schedule(peaks[col], total_steps, cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    return optax.multi_transform(transforms, lambda v: collection_labels(v, trainable, vision_apart))


def clip_gradients(grads: dict, max_norm: float | None) -> tuple[dict, Array]:
    """Global-norm clipping over the trainable gradients only; returns (grads, norm before)."""
    norm = optax.global_norm(grads)
    if max_norm is None:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda g: g * scale, grads), norm


def split_trainable(variables: dict, trainable: tuple[str, ...] = TRAINABLE) -> tuple[dict, dict]:
    """(trainable collections, frozen collections)."""
    return ({k: v for k, v in variables.items() if k in trainable},
            {k: v for k, v in variables.items() if k not in trainable})


def apply_gradients(tx: optax.GradientTransformation, opt_state, trainable: dict, frozen: dict, grads: dict):
    """One optimizer update. Frozen collections enter as zero gradients (set_to_zero ignores
    them and holds no state; XLA removes the dead zeros) and are returned untouched."""
    full_grads = {**jax.tree.map(jnp.zeros_like, frozen), **grads}
    updates, opt_state = tx.update(full_grads, opt_state, {**frozen, **trainable})
    new = optax.apply_updates(trainable, {k: updates[k] for k in trainable})
    return new, opt_state
