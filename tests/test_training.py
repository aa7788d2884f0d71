"""The optimizer over collections: only trainable leaves hold state, each collection follows
its own learning rate, frozen parameters never move; the supervised next-token loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iada_jax.data.batch import Batch
from iada_jax.train.loss import next_token_loss
from iada_jax.train.optimizer import (
    OptimizerConfig,
    apply_gradients,
    collection_labels,
    learning_rate_schedule,
    make_optimizer,
    split_trainable,
)


def variables():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return {
        "params": {"model": {"w": f(32, 32), "b": f(32)}},
        "lora": {"model": {"q_proj": {"lora_A": f(3, 32, 4), "lora_B": f(3, 4, 32)}}},
        "iada": {"gate": f(2), "query_text": {"down_kernel": f(32, 4)}},
    }


def test_optimizer_state_holds_only_trainable_leaves():
    v = variables()
    tx = make_optimizer(OptimizerConfig(), total_steps=100)
    state = tx.init(v)
    n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    n_trainable = sum(x.size for k in ("lora", "iada") for x in jax.tree.leaves(v[k]))
    n_frozen = sum(x.size for x in jax.tree.leaves(v["params"]))
    assert n_state == 2 * n_trainable, "Adam keeps two moments per trainable value and nothing for the frozen base"
    shapes = {x.shape for x in jax.tree.leaves(state) if hasattr(x, "shape")}
    assert (32, 32) not in shapes and n_frozen > 0
    labels = collection_labels(v)
    assert set(jax.tree.leaves(labels)) == {"frozen", "lora", "iada"}


def test_each_collection_moves_at_its_own_rate_and_the_base_never_moves():
    v = variables()
    cfg = OptimizerConfig(lora_lr=1e-3, iada_lr=1e-2, schedule="constant", warmup_ratio=0.0, max_grad_norm=None)
    tx = make_optimizer(cfg, total_steps=10)
    trainable, frozen = split_trainable(v)
    state = tx.init({**frozen, **trainable})
    grads = jax.tree.map(jnp.ones_like, trainable)
    new, state = jax.jit(apply_gradients, static_argnums=0)(tx, state, trainable, frozen, grads)
    # The first Adam step moves every coordinate by lr (bias-corrected m / sqrt(v) = 1).
    step_lora = np.abs(np.asarray(new["lora"]["model"]["q_proj"]["lora_A"] - trainable["lora"]["model"]["q_proj"]["lora_A"]))
    step_iada = np.abs(np.asarray(new["iada"]["gate"] - trainable["iada"]["gate"]))
    np.testing.assert_allclose(step_lora, 1e-3, rtol=1e-4)
    np.testing.assert_allclose(step_iada, 1e-2, rtol=1e-4)
    assert set(new) == {"lora", "iada"}


def test_gradients_flow_only_to_trainable_collections():
    v = variables()
    trainable, frozen = split_trainable(v)

    def loss(tr, fr):
        w = fr["params"]["model"]["w"]
        a = tr["lora"]["model"]["q_proj"]["lora_A"][0] @ tr["lora"]["model"]["q_proj"]["lora_B"][0]
        return jnp.sum((w + a) ** 2) + jnp.sum(tr["iada"]["gate"] ** 2)

    grads = jax.grad(loss)(trainable, frozen)
    assert set(grads) == {"lora", "iada"}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["lora"]))


def test_warmup_then_cosine_schedule():
    sched = learning_rate_schedule(1e-3, 100, OptimizerConfig(warmup_ratio=0.1))
    assert float(sched(0)) == 0.0
    assert abs(float(sched(10)) - 1e-3) < 1e-9
    assert float(sched(55)) < 1e-3 and float(sched(99)) < 1e-5
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")


def test_next_token_loss_counts_only_supervised_answer_tokens():
    vocab = 7
    ids = jnp.asarray([[1, 2, 3, 4, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0]], jnp.int32)
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1]], jnp.int32)  # the padded last position must not count
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, vocab)).astype(np.float32))
    batch = Batch(input_ids=ids, attention_mask=mask, position_ids=jnp.zeros((3, 1, 5), jnp.int32), loss_mask=loss_mask)
    loss, count = next_token_loss(logits, batch)
    logp = jax.nn.log_softmax(logits, -1)
    expected = -(logp[0, 1, 3] + logp[0, 2, 4]) / 2
    assert int(count) == 2
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_mask"):
        next_token_loss(logits, batch.replace(loss_mask=None))


def test_optax_multi_transform_is_what_we_build():
    tx = make_optimizer(OptimizerConfig(max_grad_norm=None), total_steps=10)
    assert isinstance(tx, optax.GradientTransformation)
