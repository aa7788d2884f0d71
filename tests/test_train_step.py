"""The training program's step: the chunked loss head equals the full-logits loss and
transformers' (values and gradients, float32), accumulation is token-weighted (k micro-batches
are one batch of all their tokens), LoRA dropout's masks are the same when a layer is
recomputed, and the remat policies trade memory as their names say."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TEXT_VOCAB

import iada_jax
from iada_jax.config import ForwardConfig
from iada_jax.data.batch import Batch
from iada_jax.experiments import get_experiment
from iada_jax.train.loss import chunked_next_token_nll, next_token_loss
from iada_jax.train.optimizer import OptimizerConfig
from iada_jax.train.step import TrainProgram


def _batch(rng, lengths, answers, seq, vocab=TEXT_VOCAB):
    """Right-padded rows of random ids; the last `answers[b]` real tokens of row b supervised."""
    ids = np.zeros((len(lengths), seq), np.int32)
    mask, loss = np.zeros_like(ids), np.zeros_like(ids)
    for b, (n, a) in enumerate(zip(lengths, answers)):
        ids[b, :n], mask[b, :n], loss[b, n - a:n] = rng.integers(0, vocab, n), 1, 1
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (3, len(lengths), seq))
    return Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
                 loss_mask=jnp.asarray(loss))


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_loss_head_equals_full_logits_values_and_gradients(layout, chunk):
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 12, 8, 50
    batch = _batch(rng, [12, 9, 4], [3, 9, 0], t, v)  # one row unsupervised: its chunks are skipped
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d) if layout == "vd" else (d, v)), jnp.float32)

    def full(h, w):
        logits = jnp.einsum("btd,vd->btv" if layout == "vd" else "btd,dv->btv", h, w)
        return next_token_loss(logits, batch)[0]

    def chunked(h, w):
        total, count = chunked_next_token_nll(h, w, batch, chunk, layout)
        return total / count

    with jax.default_matmul_precision("highest"):
        ref, ref_grads = jax.value_and_grad(full, argnums=(0, 1))(h, w)
        got, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-6 * float(jnp.abs(r).max()))
    assert int(chunked_next_token_nll(h, w, batch, chunk, layout)[1]) == 3 + 8  # tokens 1..T-1 only


def test_chunked_loss_head_memory_does_not_grow_with_tokens_times_vocabulary():
    """XLA's compiled temporaries of the head's gradient: 16x the tokens add O(tokens x D), not
    [tokens, V] float32 logits (autodiff through checkpointed chunks kept such residuals: 8.5 MiB
    here, about 3 x [tokens, V] at 2B dimensions)."""
    d, v, chunk = 32, 4096, 128

    def temp_bytes(rows):
        batch = Batch(input_ids=jax.ShapeDtypeStruct((rows, chunk + 1), jnp.int32),
                      attention_mask=jax.ShapeDtypeStruct((rows, chunk + 1), jnp.int32), position_ids=None,
                      loss_mask=jax.ShapeDtypeStruct((rows, chunk + 1), jnp.int32))

        def loss(h, w, batch):
            return chunked_next_token_nll(h, w, batch, chunk)[0]

        h = jax.ShapeDtypeStruct((rows, chunk + 1, d), jnp.float32)
        w = jax.ShapeDtypeStruct((v, d), jnp.float32)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one, many = temp_bytes(1), temp_bytes(16)
    logits_added = 15 * chunk * v * 4  # what keeping the extra tokens' float32 logits would cost
    print(f"[loss head] temp {one / 2**20:.1f} -> {many / 2**20:.1f} MiB for 16x the tokens "
          f"(their logits: {logits_added / 2**20:.0f} MiB)")
    assert many - one < 0.1 * logits_added  # seen: 0.6 MiB; the autodiff head added 8.5


def test_training_loss_equals_transformers_loss(tiny_hf):
    """Our loss (the forward to hidden states, the chunked head) against transformers' own
    `labels` loss on the same model and batch, float32."""
    path, hf = tiny_hf("untied_for_loss", seed=3, layers=2, tied=False)
    model = iada_jax.load_pretrained(path, fwd=ForwardConfig(block_size=1))
    batch = _batch(np.random.default_rng(1), [10, 7], [4, 2], 10)
    exp = get_experiment("B_lora")
    program = TrainProgram(model.config, exp, model.fwd, OptimizerConfig(), 10, loss_chunk=4)
    adapters = program.new_adapters(jax.random.PRNGKey(0), model.params)  # fresh LoRA: the base model
    with jax.default_matmul_precision("highest"):
        total, count = program.nll_sum(adapters, {"params": model.params}, batch, None)
    labels = np.where(np.asarray(batch.loss_mask) == 1, np.asarray(batch.input_ids), -100)
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(np.asarray(batch.input_ids), dtype=torch.long),
                    attention_mask=torch.as_tensor(np.asarray(batch.attention_mask)),
                    labels=torch.as_tensor(labels, dtype=torch.long)).loss.item()
    assert abs(float(total / count) - theirs) <= 1e-6 * abs(theirs), (float(total / count), theirs)


@pytest.fixture(scope="module")
def tiny_model(embedded):
    return embedded[3]


def test_four_by_two_equals_eight_by_one(tiny_model):
    """Token-weighted accumulation: 2 micro-batches of 4 (with 10 and 31 supervised tokens) give
    the gradient of the batch of 8, to 1e-6 in float32, not the mean of two micro-batch means."""
    model = tiny_model
    rng = np.random.default_rng(5)
    lengths, answers = [20, 14, 9, 17, 20, 20, 12, 19], [1, 2, 3, 4, 9, 8, 7, 7]
    batch8 = _batch(rng, lengths, answers, 20)
    halves = [jax.tree.map(lambda x, s=s: x[:, s] if x.ndim == 3 else x[s], batch8)
              for s in (slice(0, 4), slice(4, 8))]
    exp = get_experiment("D_iada_lora", block_size=2)
    exp = dataclasses.replace(exp, lora=dataclasses.replace(exp.lora, lora_dropout=0.0))
    frozen = {"params": model.params}
    grads = {}
    with jax.default_matmul_precision("highest"):
        programs = {accum: TrainProgram(model.config, exp, ForwardConfig(block_size=2), OptimizerConfig(), 10, accum)
                    for accum in (1, 2)}
        # Live adapters, kept small: at +0.05 this random model is chaotic enough that float32
        # rounding of a batch of 8 against one of 4 (1e-7) grows to 1e-4 in layer 0's gradient.
        trainable = jax.tree.map(lambda x: x + 0.01, programs[1].new_adapters(jax.random.PRNGKey(0), model.params))
        for name, accum, batches in (("8x1", 1, [batch8]), ("4x2", 2, halves), ("first", 2, halves[:1]),
                                     ("second", 2, halves[1:])):
            program = programs[accum]  # "first" / "second": one micro-batch of 4 alone, its own mean
            state = program.init_state(trainable, frozen)
            for b in batches:
                state, _ = program.accumulate(state, frozen, b, jax.random.PRNGKey(1))
            grads[name] = program.gradient(state)
            assert float(state["tokens"]) == sum(answers[:4] if name == "first" else answers[4:] if name == "second"
                                                 else answers)  # every answer token is a next-token target
    leaves = {k: jax.tree.leaves(v) for k, v in grads.items()}
    scale = max(float(np.abs(b).max()) for b in leaves["8x1"])
    worst = max(float(np.abs(a - b).max()) for a, b in zip(leaves["4x2"], leaves["8x1"]))
    print(f"[accumulation] max |4x2 - 8x1| = {worst:.2e}, gradient scale {scale:.2e}")
    assert worst <= 1e-6 * scale
    # The mean of the two micro-batch means (10 and 31 tokens) weighs the tokens unequally: it differs.
    mean_of_means = [(a + b) / 2 for a, b in zip(leaves["first"], leaves["second"])]
    assert max(float(np.abs(a - b).max()) for a, b in zip(mean_of_means, leaves["8x1"])) > 1e-2 * scale


def test_a_step_applies_once_per_accumulation_and_counts_tokens(tiny_model):
    model = tiny_model
    exp = get_experiment("B_lora")
    program = TrainProgram(model.config, exp, ForwardConfig(block_size=2), OptimizerConfig(), 10, grad_accum=3)
    frozen = {"params": model.params}
    state = program.init_state(program.new_adapters(jax.random.PRNGKey(0), model.params), frozen)
    batch = _batch(np.random.default_rng(2), [8, 6], [3, 2], 8)
    applied = []
    for _ in range(6):
        state, metrics = program.step(state, frozen, batch, jax.random.PRNGKey(0))
        applied.append(bool(metrics["applied"]))
        assert float(metrics["tokens"]) == 5 and np.isfinite(float(metrics["nll_sum"]))
    assert applied == [False, False, True] * 2 and int(state["step"]) == 2 and float(state["tokens"]) == 0


def _dropout_gradients(model, remat: str):
    exp = get_experiment("D_iada_lora", block_size=2)
    exp = dataclasses.replace(exp, lora=dataclasses.replace(exp.lora, lora_dropout=0.3))
    batch = _batch(np.random.default_rng(3), [16, 11], [5, 4], 16)
    program = TrainProgram(model.config, exp, ForwardConfig(block_size=2, remat=remat), OptimizerConfig(), 10)
    trainable = jax.tree.map(lambda x: x + 0.05, program.new_adapters(jax.random.PRNGKey(0), model.params))
    fn = jax.jit(jax.grad(lambda t: program.nll_sum(t, {"params": model.params}, batch, jax.random.PRNGKey(7))[0]))
    with jax.default_matmul_precision("highest"):
        return fn(trainable)


@pytest.fixture(scope="module")
def dropout_reference(tiny_model):
    return _dropout_gradients(tiny_model, "none")


@pytest.mark.parametrize("policy", ["full", "qkv", "proj"])
def test_lora_dropout_masks_survive_rematerialisation(tiny_model, dropout_reference, policy):
    """With LoRA dropout on, the recomputed layer draws the same masks: the adapter gradients
    under every remat policy equal those of no remat."""
    got = _dropout_gradients(tiny_model, policy)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(dropout_reference)):
        np.testing.assert_allclose(g, r, atol=1e-5 * float(np.abs(r).max()) + 1e-12, err_msg=jax.tree_util.keystr(path))


def test_remat_policies_keep_what_their_names_say(tiny_model):
    """Compiled temporary memory of the gradient: full < qkv < proj < none (XLA's analysis)."""
    model = tiny_model
    exp = get_experiment("B_lora")
    batch = _batch(np.random.default_rng(4), [64, 64], [30, 30], 64)
    temp = {}
    for policy in ("full", "qkv", "proj", "none"):
        program = TrainProgram(model.config, exp, ForwardConfig(block_size=2, remat=policy), OptimizerConfig(), 10)
        trainable = program.new_adapters(jax.random.PRNGKey(0), model.params)
        fn = jax.jit(jax.grad(lambda t: program.nll_sum(t, {"params": model.params}, batch, None)[0]))
        temp[policy] = fn.lower(trainable).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["qkv"] < temp["proj"] < temp["none"], temp
