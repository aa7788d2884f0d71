"""bench/ (not tests of speed): the FLOP formula is the documented one, the step harness builds
train.py's own training program, and the HLO counters read what they claim to (operation counts,
the CPU backend's float32 weight copies)."""

from __future__ import annotations

import types

import pytest

import jax
import jax.numpy as jnp

from bench import hlo_report, memory, train_step
from iada_jax.config import Qwen3VLConfig
from iada_jax.train.step import TrainProgram


def test_flop_formula_matches_the_documented_one():
    cfg = Qwen3VLConfig.qwen3_vl_2b()
    case = train_step.Case(exp="B_lora", seq=2048, images=0, batch=2)
    d, q, kv, i, L, V = 2048, 16 * 128, 8 * 128, 6144, 28, 151936
    p_text = L * (d * (q + 2 * kv) + q * d + 3 * d * i) + V * d
    tokens = 2 * 2048
    f_text = 2 * p_text * tokens + 4 * L * 2 * 2048**2 * q
    assert train_step.step_flops(cfg, case, adapter_params=1000) == 2 * f_text + 4 * 1000 * tokens
    with_image = train_step.step_flops(cfg, train_step.Case("B_lora", 2048, 1, 2), adapter_params=1000)
    assert with_image > 2 * f_text + 4 * 1000 * tokens  # the frozen vision tower's forward is counted


def test_the_harness_measures_train_pys_program_with_dropout_and_accumulation():
    """The case is built by TrainProgram (the one train.py runs): LoRA dropout as the
    experiment configures it, accumulation as asked; a batch of 4 with an image each fits
    (the vision bucket is sized per sample, as the loader sizes it)."""
    args = types.SimpleNamespace(tiny=True, block_size=2, remat="none", attention="xla", dtype="float32")
    case = train_step.Case("D_iada_lora", seq=64, images=1, batch=4, grad_accum=2)
    program, state, frozen, batch = train_step.build_jax_case(train_step.model_config(True), case, args)
    assert isinstance(program, TrainProgram) and program.dropout and program.grad_accum == 2
    assert batch.input_ids.shape == (4, 64) and batch.vision.frame_lengths.shape == (4,)
    assert set(state["trainable"]) == {"lora", "iada"}


def test_hlo_counters():
    hlo = "\n".join([
        "  %p0 = bf16[4,8]{1,0} parameter(0)",
        "  %p1 = bf16[8,2]{1,0} parameter(1)",
        "  %c = f32[4,8]{1,0} convert(%p0)",
        "  %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        "  ROOT %t = f32[2,4]{1,0} transpose(%d), dimensions={1,0}",
    ])
    report = hlo_report.inspect(hlo)
    assert report["dots"] == {("f32", ("bf16", "bf16"), "4,2"): 1}
    assert report["f32_results_of_bf16_products"] == 1
    assert report["converts"] == {("bf16", "f32"): 32}
    assert (report["transposes"], report["transpose_elements"]) == (1, 8)
    stable = ("%0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] : "
              "(tensor<4x8xbf16>, tensor<8x2xbf16>) -> tensor<4x2xf32>")
    assert hlo_report.requested_products(stable) == {"bf16 x bf16 -> f32": 1}


def test_cpu_weight_copies_count_each_converted_bf16_weight_once():
    params = {"q": jax.ShapeDtypeStruct((28, 64, 64), jnp.bfloat16),   # converted (stacked)
              "o": jax.ShapeDtypeStruct((28, 64, 64), jnp.bfloat16),   # same shape, its own copy
              "up": jax.ShapeDtypeStruct((28, 64, 96), jnp.bfloat16),  # never converted
              "bias": jax.ShapeDtypeStruct((64,), jnp.bfloat16),       # a vector, not a matmul weight
              "lora": jax.ShapeDtypeStruct((64, 96), jnp.float32)}     # already float32
    hlo = "\n".join([
        "  %c = f32[7,4,64,64]{3,2,1,0} convert(bf16[7,4,64,64]{3,2,1,0} %p0)",
        "  %d = f32[64]{0} convert(bf16[64]{0} %p3)",
        "  %e = bf16[28,64,96]{2,1,0} convert(f32[28,64,96]{2,1,0} %x)",
    ])
    assert memory.cpu_weight_upcast_bytes(hlo, params) == 2 * 4 * 28 * 64 * 64


def test_packed_and_bucketed_layouts_of_the_step_bench_hold_the_same_samples_and_loss():
    """`bench.train_step --lengths llava --pack` compares two layouts of the same samples: the
    bucketed batches and the packed rows hold the same real tokens, and (every sample getting the
    logits it gets alone) the token-weighted loss of LoRA + IADA is the same, to float32 rounding."""
    from convert.random_init import random_params
    from iada_jax.config import ForwardConfig
    from iada_jax.experiments import get_experiment
    from iada_jax.train.optimizer import OptimizerConfig

    cfg = train_step.model_config(True)
    examples = train_step.llava_examples(cfg, 24, tiny=True)
    bucketed, packed = train_step.llava_layouts(cfg, examples, 256, batch=4, pack_batch=1)
    assert {b.input_ids.shape[1] for b in bucketed} == {64, 128}  # two buckets, each its own program
    assert {b.input_ids.shape for b in packed} == {(1, 256)} and all(b.segment_ids is not None for b in packed)
    real = lambda batches: sum(int(b.attention_mask.sum()) for b in batches)  # noqa: E731
    slots = lambda batches: sum(b.attention_mask.size for b in batches)  # noqa: E731
    samples = sum(len(b.input_ids) for b in bucketed)
    assert sum(int((b.sample_lengths > 0).sum()) for b in packed) == samples
    assert real(packed) == real(bucketed) and real(packed) / slots(packed) > real(bucketed) / slots(bucketed)

    program = TrainProgram(cfg, get_experiment("D_iada_lora", 2), ForwardConfig(block_size=2, remat="none",
                                                                                 dtype="float32"),
                           OptimizerConfig(), total_steps=10)
    params = random_params(cfg, "float32")
    trainable = train_step.moved(program.new_adapters(jax.random.PRNGKey(0), params))  # LoRA and IADA both act
    frozen = {"params": params}
    loss_bucketed = train_step.layout_loss(program, trainable, frozen, bucketed)
    loss_packed = train_step.layout_loss(program, trainable, frozen, packed)
    assert abs(loss_packed / loss_bucketed - 1) < 1e-5, (loss_packed, loss_bucketed)


def test_the_gpu_attention_checks_run_with_xla_standing_in_for_cudnn(monkeypatch):
    """bench/parity.py's cuDNN checks (right-padded, packed, vision frames) only run on a GPU, where
    a slip costs a lease: run their code here with XLA in cuDNN's place (differences exactly 0)."""
    from bench import parity
    from iada_jax.model import layers, vision

    real = layers.dot_product_attention

    def standing_in(q, k, v, mask, seq_lengths, implementation, causal=True):
        return real(q, k, v, mask, seq_lengths, "xla", causal)

    monkeypatch.setattr(vision, "dot_product_attention", standing_in)
    frames = parity.frame_attention_check(tiny=True)
    assert frames["frames_status"] == "ok" and frames["frames_cudnn_max_abs_diff"] == 0.0, frames
    monkeypatch.setattr(layers, "dot_product_attention", standing_in)
    b, t, hq, hkv, hd = 4, 32, 4, 2, 8
    q, k, v, cot = (jnp.ones((b, t, h, hd), jnp.bfloat16) * 0.1 for h in (hq, hkv, hkv, hq))
    packed = parity.packed_attention_check(q, k, v, cot)
    assert packed["packed_status"] == "ok" and packed["packed_cudnn_max_abs_diff"] == 0.0, packed


def test_auto_attention_is_xla_on_the_cpu_and_cudnn_is_refused_here():
    from iada_jax.model.layers import resolve_attention

    assert resolve_attention("auto", "bfloat16") == "xla" and resolve_attention("xla", "float32") == "xla"
    for bad, message in (("cudnn", "needs an NVIDIA GPU"), ("flash", "unknown attention")):
        with pytest.raises(ValueError, match=message):
            resolve_attention(bad, "bfloat16")
