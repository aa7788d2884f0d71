"""The reasoning-tax study: its world (answers fixed by the pixels, held-out questions never in
training), the depth weights it plots (they reproduce IADA's read), and a --quick run of the
whole study command (stage 0 full training, stage 1 conditions, table, figures, reuse)."""

from __future__ import annotations

import json
import os
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iada_jax.study import world


def _pixel(img, row, col):
    cell = img.width / world.GRID
    return img.getpixel((int((col + 0.5) * cell), int((row + 0.5) * cell)))


def _scene_from_pixels(img) -> dict:
    """(row, col) -> colour name read from each cell's centre (the shapes cover it)."""
    by_rgb = {v: k for k, v in world.COLOURS.items()}
    out = {}
    for r in range(world.GRID):
        for c in range(world.GRID):
            rgb = _pixel(img, r, c)
            if rgb != (255, 255, 255):
                out[(r, c)] = by_rgb[rgb]
    return out


def test_cell_colours_and_counts_are_read_back_from_the_pixels():
    rng = random.Random(0)
    for _ in range(60):
        items = world.make_scene(rng)
        seen = _scene_from_pixels(world.render(items))
        assert seen == {(i.row, i.col): i.colour for i in items}
        q, a = world.ask(items, "count_all", rng)
        assert int(a) == len(seen)
        # the three shapes differ in how many pixels they cover in their cell
        img = np.asarray(world.render(items, 48))
        for it in items:
            cell = img[16 * it.row:16 * it.row + 16, 16 * it.col:16 * it.col + 16]
            filled = int((cell != 255).any(-1).sum())
            assert {"triangle": filled < 80, "circle": 80 <= filled < 110, "square": filled >= 110}[it.shape]


def test_reasoning_and_text_answers_follow_from_the_scene_and_the_question():
    rng = random.Random(1)
    rows = world.sample_rows(400, {"reasoning": 0.8, "text": 0.2}, seed=1)
    for r in rows:
        if r.group == "text":
            expr = r.question.removeprefix("What is ").removesuffix("?").replace("plus", "+").replace("minus", "-")
            assert str(eval(expr)) == r.answer  # noqa: S307 (digits and + - only)
            continue
        items, q = r.items, r.question
        count = lambda shape: sum(i.shape == shape for i in items)  # noqa: E731
        if r.kind == "weighted":
            s1, a, s2, b = re.match(r"A (\w+) is worth (\d), a (\w+) (\d)\.", q).groups()
            assert int(r.answer) == int(a) * count(s1) + int(b) * count(s2)
        elif r.kind == "right_of":
            colour, shape = re.match(r"What colour is right of the (\w+) (\w+)\?", q).groups()
            (anchor,) = [i for i in items if (i.colour, i.shape) == (colour, shape)]
            right = [i.colour for i in items if (i.row, i.col) == (anchor.row, anchor.col + 1)]
            assert r.answer == (right[0] if right else "none")
        elif r.kind == "more":
            s1, s2 = re.match(r"More (\w+)s than (\w+)s\?", q).groups()
            assert r.answer == ("yes" if count(s1) > count(s2) else "no")
    assert {r.kind for r in rows} == set(world.REASONING) | {"arithmetic"}
    del rng


def test_held_out_questions_never_appear_in_training():
    train = world.sample_rows(3000, {**world.STAGE0_MIX, "descriptive": 0.2}, seed=0)
    test = [r for g in world.GROUPS for r in world.heldout_rows(g, 200)]
    assert {(r.question, r.items) for r in train}.isdisjoint({(r.question, r.items) for r in test})
    assert {r.split for r in train} == {"train"} and {r.split for r in test} == {"test"}
    texts = {r.question for r in test if r.group == "text"}
    assert len(texts) > 100 and texts.isdisjoint({r.question for r in train})


def test_world_benchmarks_score_exact_match_by_kind(tmp_path):
    from iada_jax.evaluation.benchmarks import get_benchmark

    bench = get_benchmark("world_reasoning")
    samples = bench.load(bench.write_fixture(str(tmp_path), num=20, seed=3))
    assert len(samples) == 20 and all(len(s.images) == 1 for s in samples)
    preds = [s.target.upper() + "." if i % 2 else "x" for i, s in enumerate(samples)]
    scores = bench.score(samples, preds)
    assert scores["score"] == 50.0 and sum(scores["by_kind"].values()) > 0
    text = get_benchmark("world_text")
    assert all(not s.images for s in text.load(text.write_fixture(str(tmp_path), num=4)))


def test_depth_weights_reproduce_the_iada_read(embedded):
    """The per-depth weights of depth_weights are those of iada.cross_depth_attention: their
    weighted sum of the memory equals the operator's output, and each boundary's sum to 1."""
    from iada_jax.config import ForwardConfig
    from iada_jax.experiments import get_experiment
    from iada_jax.iada import cross_depth_attention
    from iada_jax.model.qwen3_vl import init_adapters
    from iada_jax.study.depth_weights import depth_weights, stream_depth_probabilities

    _, _, _, model = embedded
    cfg = model.config
    exp = get_experiment("D_iada_lora", block_size=2)
    fwd = ForwardConfig(block_size=2)
    adapters = init_adapters(jax.random.PRNGKey(0), model.params, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada)
    # a trained-looking IADA: non-zero up-projections and gates
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    adapters["iada"] = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape), adapters["iada"])
    from PIL import Image

    from iada_jax.data.image_processing import ImageProcessorConfig, preprocess_images

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    pixels, grid = preprocess_images(images, ImageProcessorConfig(patch_size=4, min_pixels=64, max_pixels=1024))
    ids = rng.integers(0, 200, (2, 12))
    ids[:, 2:6] = cfg.image_token_id  # 16 patches merged 2x2: 4 tokens an image
    batch = model.make_batch(ids, np.ones_like(ids), pixel_values=pixels, image_grid_thw=grid)
    batch = batch.__class__(**{**batch.__dict__, "loss_mask": jnp.asarray(np.r_[[0] * 10, [1] * 2][None].repeat(2, 0))})
    w = depth_weights(model.params, adapters, batch, cfg=cfg, fwd=fwd, lora=exp.lora, iada=exp.iada)
    n = cfg.text.num_hidden_layers // 2
    assert set(w) == {"visual", "text"} and w["text"].shape == (2, n, n + 1)
    np.testing.assert_allclose(w["text"].sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(w["text"][0], 2) == 0)  # boundary n reads depths 0..n only

    memory = jnp.asarray(rng.normal(size=(n + 1, 2, 12, cfg.text.hidden_size)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(2, cfg.text.hidden_size)), jnp.float32)
    readable = jnp.asarray(rng.random((2, 12)) < 0.6)
    depth_ok = jnp.arange(n + 1) <= 1
    p = stream_depth_probabilities(q, memory, depth_ok, readable, cfg.text.num_attention_heads, cfg.text.rms_norm_eps)
    h, dh = cfg.text.num_attention_heads, cfg.text.hidden_size // cfg.text.num_attention_heads
    v = memory.reshape(n + 1, 2, 12, h, dh)
    ours = jnp.einsum("bhnt,nbthd->bhd", p, v).reshape(2, -1)
    ref = cross_depth_attention(q[:, None], memory, depth_ok, readable[:, None, :], h, cfg.text.rms_norm_eps)[:, 0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    from iada_jax.study.reasoning_tax import main

    out = str(tmp_path_factory.mktemp("study") / "quick")
    assert main(["--quick", "--out", out]) == 0
    return out


def test_the_quick_study_writes_the_table_results_and_figures(quick_study):
    out = quick_study
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    assert set(summary["results"]) == {"A_pretrained", "B_lora", "D_iada_lora"}
    for condition, seeds in summary["results"].items():
        avg = seeds["0"]["averages"]
        assert set(avg) == {"perception", "reasoning", "text", "R-Avg", "P-Avg", "All-Avg"}
        assert all(0.0 <= v <= 100.0 for v in avg.values())
        assert avg["R-Avg"] == pytest.approx((avg["reasoning"] + avg["text"]) / 2)
    table = open(os.path.join(out, "table.md")).read()
    for label in ("A: base", "B: LoRA", "D: IADA + LoRA", "(Δ vs A)", "(Δ vs B)", "majority answer"):
        assert label in table
    for name in ("reasoning_tax.png", "depth_weights.png", "depth_weights.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    weights = json.load(open(os.path.join(out, "depth_weights.json")))
    assert set(weights) == {"perception", "reasoning", "gates"}
    for rows in weights["reasoning"]["text"]:
        assert sum(rows) == pytest.approx(1.0, abs=1e-4)
    # stage 0 trained the language stack from random initialisation and kept the vision tower at
    # its random initialisation (stage0_vision_lr 0); stage 1 only adapters
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "stage0", "metrics.jsonl"))]
    assert len(losses) == 6 and all(np.isfinite(losses))
    import iada_jax

    init, base = (iada_jax.load_pretrained(os.path.join(out, *p)).params["model"]
                  for p in (("init",), ("stage0", "final", "model")))
    for a, b in zip(jax.tree.leaves(init["visual"]), jax.tree.leaves(base["visual"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sum(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(init["language_model"]), jax.tree.leaves(base["language_model"]))) > 10


def test_a_finished_study_is_reused_not_retrained(quick_study, capsys):
    from iada_jax.study.reasoning_tax import main

    before = os.path.getmtime(os.path.join(quick_study, "stage1", "B_lora", "seed0", "scores.json"))
    assert main(["--quick", "--out", quick_study]) == 0
    assert os.path.getmtime(os.path.join(quick_study, "stage1", "B_lora", "seed0", "scores.json")) == before
    assert "B: LoRA" in capsys.readouterr().out
    # other settings in the same folder would silently reuse these runs: refused
    assert main(["--quick", "--out", quick_study, "--stage1-steps", "5"]) == 1
    assert "stage1_steps" in capsys.readouterr().err


def test_eval_scores_the_world_sets_in_their_own_table(embedded, tmp_path):
    """eval.py --bench world: the world's table in results.md, its scores in results.json."""
    import eval as eval_cli
    from iada_jax.evaluation.benchmarks import WORLD, get_benchmark

    data = tmp_path / "data"
    for name in WORLD:
        get_benchmark(name).write_fixture(str(data / name), num=4)
    out = tmp_path / "out"
    assert eval_cli.main(["--model", embedded[0], "--data", str(data), "--bench", "world", "--out", str(out),
                          "--max-new-tokens", "3", "--dtype", "float32", "--no-progress",
                          # the tiny model's own sizes (lmms-eval's 200704 would make 3136 tokens an image)
                          "--min-pixels", "1024", "--max-pixels", "4096"]) == 0
    md = (out / "results.md").read_text()
    assert "World-Perception | World-Reasoning | World-Text" in md and "MMMU" not in md
    results = json.loads((out / "results.json").read_text())
    assert set(results["world"]) == set(WORLD) and all(0 <= v <= 100 for v in results["world"].values())
    predictions = (out / "world_text" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4
