"""Full-parameter training (experiment `full`): the gradient of every base weight, the vision
tower's included, equals transformers' autograd (float32); adapter experiments keep the tower
frozen; a run trains, writes final/model (a base checkpoint that loads, evaluates and takes
LoRA on top), shards its master copy like the base, and resumes bit for bit."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import iada_jax
from iada_jax.adapters import AdapterError, load_adapters
from iada_jax.data.image_processing import ImageProcessorConfig, preprocess_images
from iada_jax.experiments import get_experiment
from iada_jax.pretrained import Qwen3VL
from iada_jax.train.loop import TrainConfig, TrainingError, fit
from iada_jax.train.metrics import read_metrics
from iada_jax.train.optimizer import OptimizerConfig
from iada_jax.train.step import TrainProgram

def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------------- gradients
def _image_batch(model):
    """Two right-padded rows: an image with text around it, and a shorter text-only row; the
    last three real tokens of each supervised (so the image reaches the loss only through them)."""
    c = model.config
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    pixels, grid = preprocess_images([image], ImageProcessorConfig(patch_size=4, min_pixels=64, max_pixels=1024))
    image_tokens = [c.vision_start_token_id] + [c.image_token_id] * (int(grid.prod()) // 4) + [c.vision_end_token_id]
    rows = [[5, 6] + image_tokens + [7, 8, 9, 10, 11], list(rng.integers(0, 280, 9))]
    t = max(map(len, rows))
    ids, mask, loss = (np.zeros((2, t), np.int64) for _ in range(3))
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)], loss[b, len(row) - 3:len(row)] = row, 1, 1
    batch = model.make_batch(ids, mask, pixel_values=pixels, image_grid_thw=grid).replace(loss_mask=jnp.asarray(loss))
    hf_inputs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grid),
                     mm_token_type_ids=torch.as_tensor((ids == c.image_token_id).astype(np.int64)),
                     labels=torch.as_tensor(np.where(loss == 1, ids, -100)))
    return batch, hf_inputs


def _mean_loss(program, trainable, frozen, batch):
    total, count = program.nll_sum(trainable, frozen, batch, None)
    return total / count


def _hf_gradients_in_our_layout(hf, hf_inputs, cfg) -> tuple[float, dict]:
    """transformers' loss and its autograd gradients, mapped into our parameter tree by the
    converter's table (the same linear maps as the weights: transposes, stacking)."""
    from convert.mapping import mapping_table, set_path

    hf.zero_grad(set_to_none=True)
    loss = hf(**hf_inputs).loss
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    tree: dict = {}
    for rule in mapping_table(cfg):
        parts = [rule.transform.to_jax(grads[key]) for key in rule.hf_keys()]
        set_path(tree, rule.jax, parts[0] if rule.count is None else np.stack(parts))
    return loss.item(), tree


def test_every_base_gradient_equals_transformers_autograd(embedded):
    """The `full` program's loss gradient with respect to every base weight (the embedding,
    which the tied head shares as in Qwen3-VL-2B; the text layers; the vision tower with its
    patch embedding, position table and DeepStack mergers) against torch autograd through
    transformers on the same tiny random model (the embedded default's HF folder), on a batch
    with an image, float32. (The untied head's [D, V] layout has its gradient checked against
    full logits in test_train_step.py.)"""
    from transformers import Qwen3VLForConditionalGeneration

    model = embedded[3]
    hf = Qwen3VLForConditionalGeneration.from_pretrained(os.path.join(os.path.dirname(embedded[0]), "hf"),
                                                         dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    batch, hf_inputs = _image_batch(model)
    program = TrainProgram(model.config, get_experiment("full"), model.fwd, OptimizerConfig(), 10, loss_chunk=8)
    trainable = program.new_trainable(jax.random.PRNGKey(0), model.params)
    assert set(trainable) == {"params"} and program.frozen(model.params) == {}
    loss, grads = jax.jit(jax.value_and_grad(lambda t: _mean_loss(program, t, {}, batch)))(trainable)
    hf_loss, hf_grads = _hf_gradients_in_our_layout(hf, hf_inputs, model.config)
    assert abs(float(loss) - hf_loss) <= 1e-6 * abs(hf_loss), (float(loss), hf_loss)
    ours, theirs = _leaves(grads["params"]), _leaves(hf_grads)
    assert ours.keys() == theirs.keys() and sum("visual" in k for k in ours) > 10
    worst = {}
    for key, g in ours.items():
        scale = float(np.abs(theirs[key]).max())
        assert scale > 0, f"{key}: no gradient in transformers either"
        worst[key] = float(np.abs(g - theirs[key]).max()) / scale
    key = max(worst, key=worst.get)
    print(f"[full gradients] {len(worst)} leaves, worst relative error {worst[key]:.1e} at {key}")
    assert worst[key] <= 1e-5, f"{key}: relative error {worst[key]:.2e}"  # seen: 3.7e-6


def test_adapter_training_keeps_the_vision_tower_frozen(embedded):
    """B_lora's loss differentiated with respect to the vision tower of its frozen base: the
    stop_gradient on the tower's outputs stays (every gradient exactly zero, and no backward
    pass through the tower is compiled), where the full program above reaches the tower."""
    model = embedded[3]
    batch, _ = _image_batch(model)
    program = TrainProgram(model.config, get_experiment("B_lora"), model.fwd, OptimizerConfig(), 10, loss_chunk=8)
    adapters = program.new_trainable(jax.random.PRNGKey(0), model.params)
    assert set(adapters) == {"lora"}

    def loss(visual):
        params = dict(model.params, model=dict(model.params["model"], visual=visual))
        return _mean_loss(program, adapters, {"params": params}, batch)

    grads = jax.jit(jax.grad(loss))(model.params["model"]["visual"])
    assert len(jax.tree.leaves(grads)) > 10 and not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_full_counts_every_base_weight_as_trainable(embedded):
    from iada_jax.config import Qwen3VLConfig
    from iada_jax.params import count_trainable

    model = embedded[3]
    loaded = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))  # the vision tower included
    assert count_trainable(get_experiment("full"), model.config, base={}) == {"lora": 0, "iada": 0, "base": loaded}
    assert count_trainable(get_experiment("full"), Qwen3VLConfig.qwen3_vl_2b(), base={})["base"] == 2_127_532_032


# ---------------------------------------------------------------------------- the run
def config(embedded, out, **kw) -> TrainConfig:
    ckpt, data, _, _ = embedded
    base = dict(model=ckpt, data=data, out=str(out), exp="full", dtype="float32", param_dtype="float32",
                remat="none", max_length=128, buckets=(128,), batch_size=2, grad_accum=2, steps=4, base_lr=1e-3,
                lora_lr=2e-3, warmup_ratio=0.0, save_every=2, progress=False, workers=1, prefetch=2, mesh_data=1,
                min_pixels=1024, max_pixels=4096)  # the tiny model's 64x64 images
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def full_run(embedded, tmp_path_factory):
    """4 optimizer steps of 2 micro-batches of 2, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("full") / "run"
    return fit(config(embedded, out), log=quiet)


def test_full_run_trains_and_writes_a_loadable_model(embedded, full_run):
    run = full_run["run_dir"]
    losses = full_run["losses"]
    assert len(losses) == 4 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert set(full_run["trainable"]) == {"params"}
    assert {np.asarray(x).dtype for x in jax.tree.leaves(full_run["trainable"])} == {np.dtype("float32")}
    assert "lr_base" in read_metrics(run)[-1] and json.load(open(os.path.join(run, "config.json")))["base"] is True
    model_dir = os.path.join(run, "final", "model")
    assert full_run["model_dir"] == model_dir
    for name in ("config.json", "iada_jax.json", "params.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(model_dir, name)), name

    trained = iada_jax.load_pretrained(model_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trained.params), full_run["trainable"]["params"])
    start = embedded[3]
    ids = np.random.default_rng(0).integers(0, 280, (2, 12))
    got = trained.logits(ids)
    np.testing.assert_array_equal(got, Qwen3VL(start.config, full_run["trainable"]["params"], start.fwd).logits(ids))
    assert np.abs(got - start.logits(ids)).max() > 1e-2  # trained: not the starting model
    assert trained.image_config == start.image_config

    with pytest.raises(AdapterError, match="final/model as --model instead"):
        load_adapters(run)


def test_the_master_copy_and_its_optimizer_state_are_sharded_like_the_base(embedded):
    """On an fsdp mesh of 4 fake devices the run's train state (as fit builds it) lays out the
    float32 master base, its gradient sum and its Adam moments as the base itself: split on the
    hidden dimension, not replicated (the adapters' state stays replicated)."""
    from iada_jax.train.sharding import make_mesh, param_shardings, state_shardings

    model = embedded[3]
    mesh = make_mesh(1, 4)
    params = jax.device_put(model.params, param_shardings(model.params, model.config, mesh))
    program = TrainProgram(model.config, get_experiment("full"), model.fwd, OptimizerConfig(), 4)
    trainable = program.new_trainable(jax.random.PRNGKey(0), params)
    shardings = state_shardings(program.abstract_state(trainable, {}), model.config, mesh)
    state = program.init_state(jax.device_put(trainable, shardings["trainable"]), {}, shardings)
    want = jax.tree.leaves(param_shardings(model.params, model.config, mesh))
    moments = state["opt_state"].inner_states["params"].inner_state[0]
    for tree in (state["trainable"]["params"], state["grad_sum"]["params"], moments.mu["params"], moments.nu["params"]):
        for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree), want):
            assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding, s)
    assert sum(not s.is_fully_replicated for s in want) > 20  # most of the base is split
    lora = get_experiment("B_lora")
    program = TrainProgram(model.config, lora, model.fwd, OptimizerConfig(), 4)
    frozen = {"params": params}
    adapters = program.new_trainable(jax.random.PRNGKey(0), params)
    shardings = state_shardings(program.abstract_state(adapters, frozen), model.config, mesh)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


def test_a_lora_run_starts_from_the_trained_model(embedded, full_run, tmp_path):
    lora = fit(config(embedded, tmp_path / "lora", model=full_run["model_dir"], exp="B_lora", steps=1, grad_accum=1),
               log=quiet)
    assert lora["step"] == 1 and np.isfinite(lora["losses"][0]) and set(lora["trainable"]) == {"lora"}
    with pytest.raises(TrainingError, match="pass its RUN/final/model as --model"):
        fit(config(embedded, tmp_path / "init", init_adapters=full_run["run_dir"]), log=quiet)


def test_killed_and_resumed_full_run_ends_with_identical_parameters(embedded, full_run, tmp_path):
    """The module's run again, stopped after step 3 with the step-3 checkpoint lost (a kill
    between saves) and resumed from step 2: the same float32 master weights, bit for bit."""
    run = tmp_path / "killed"
    first = fit(config(embedded, run, stop_after=3), log=quiet)
    assert first["step"] == 3 and first.get("interrupted")
    shutil.rmtree(run / "checkpoints" / "3")
    resumed = fit(config(embedded, run, resume=True), log=quiet)
    assert resumed["step"] == 4
    for a, b in zip(jax.tree.leaves(full_run["trainable"]), jax.tree.leaves(resumed["trainable"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3, 4]


def test_the_vision_tower_takes_its_own_rate_and_zero_keeps_it_as_loaded(embedded, tmp_path):
    """--vision-lr: 0 leaves every vision weight bit-identical to the loaded one (and keeps no
    Adam moments for them) while the language stack trains; a rate of its own moves the tower
    and is logged as lr_vision; adapter experiments refuse it (their tower is frozen anyway)."""
    start = jax.tree.map(np.asarray, embedded[3].params)
    frozen = fit(config(embedded, tmp_path / "v0", vision_lr=0.0, steps=2, grad_accum=1, save_every=100), log=quiet)
    params = frozen["trainable"]["params"]["model"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params["visual"]), start["model"]["visual"])
    moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(params["language_model"]),
                                                                   jax.tree.leaves(start["model"]["language_model"]))]
    assert sum(moved) > 10
    last = read_metrics(frozen["run_dir"])[-1]
    assert last["lr_vision"] == 0.0 and last["lr_base"] > 0

    model = embedded[3]
    program = TrainProgram(model.config, get_experiment("full"), model.fwd, OptimizerConfig(vision_lr=0.0), 4)
    state = program.init_state(program.new_trainable(jax.random.PRNGKey(0), model.params), {})
    moments = state["opt_state"].inner_states["params"].inner_state[0].mu["params"]["model"]
    assert set(moments) == {"language_model", "visual"} and not any(
        isinstance(x, jax.Array) for x in jax.tree.leaves(moments["visual"]))  # optax's masked placeholders only

    own = fit(config(embedded, tmp_path / "v1", vision_lr=1e-4, steps=2, grad_accum=1, save_every=100), log=quiet)
    assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(
        jax.tree.leaves(own["trainable"]["params"]["model"]["visual"]), jax.tree.leaves(start["model"]["visual"])))
    assert read_metrics(own["run_dir"])[0]["lr_vision"] < read_metrics(own["run_dir"])[0]["lr_base"]
    with pytest.raises(TrainingError, match="vision-lr"):
        fit(config(embedded, tmp_path / "lora", exp="B_lora", vision_lr=0.0), log=quiet)
