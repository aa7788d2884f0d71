"""eval.py: the paper's table from fixtures of all 11 benchmarks on the embedded tiny model,
log-likelihood option choice against an independent computation, adapters change answers,
--compare with deltas, and the table's averages as the paper computes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from iada_jax.evaluation.benchmarks import PAPER, get_benchmark
from iada_jax.evaluation.table import compare, markdown, summarize, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A 4-sample fixture of every benchmark, in its real schema, in one --data folder."""
    data = tmp_path_factory.mktemp("bench")
    for name in PAPER:
        get_benchmark(name).write_fixture(str(data / name), num=4, seed=1)
    return str(data)


def test_eval_writes_the_papers_table_for_all_benchmarks(embedded, fixtures, tmp_path):
    import eval as eval_cli

    out = tmp_path / "ev"
    assert eval_cli.main(["--model", embedded[0], "--data", fixtures, "--out", str(out), "--bench", "paper",
                          "--dtype", "float32", "--max-new-tokens", "4", "--label", "tiny", "--no-progress",
                          "--min-pixels", "1024", "--max-pixels", "4096"]) == 0  # the tiny model's 64x64 images
    results = json.load(open(out / "results.json"))
    assert results["label"] == "tiny"
    assert results["settings"]["min_pixels"] == 1024 and results["settings"]["max_pixels"] == 4096
    assert results["settings"]["reasoning_tags"] == [["<think>", "</think>"], ["<analysis>", "</analysis>"]]
    assert results["settings"]["prompt_style"] == "default" and results["settings"]["mathvista_prompt"] == "cot"
    assert results["settings"]["max_new_tokens"] == {name: 4 for name in PAPER}
    assert set(results["lmms_eval"]) == set(PAPER)  # lmms-eval's own headline metrics of each
    assert results["lmms_eval"]["mmmu"]["mmmu_acc"] == round(results["row"]["mmmu"] / 100, 5)
    row = results["row"]
    assert list(row) == list(PAPER) + ["R-Avg", "P-Avg", "All-Avg"]
    assert all(0.0 <= row[k] <= 100.0 for k in row), row
    table = open(out / "results.md").read()
    for title in ("MMMU", "MathVista", "ScienceQA", "MMStar", "AI2D", "MME", "POPE", "RealWorldQA", "ChartQA",
                  "TextVQA", "OCRBench", "R-Avg", "P-Avg", "All-Avg"):
        assert title in table
    for name in PAPER:
        lines = open(out / name / "predictions.jsonl").read().splitlines()
        assert len(lines) == 4 and {"id", "prompt", "prediction", "target"} <= set(json.loads(lines[0]))
        assert "score" in json.load(open(out / name / "scores.json"))


def test_loglik_mode_picks_the_most_likely_option(embedded, fixtures, tmp_path):
    """The chosen option's log-likelihood, recomputed with a plain full forward, is the largest."""
    from transformers import AutoTokenizer

    from iada_jax.evaluation.runner import EvalConfig, Evaluator

    ckpt, _, _, model = embedded
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ev = Evaluator(model, tokenizer, cfg=EvalConfig(mode="loglik", max_length=512), progress=False)
    bench = get_benchmark("scienceqa")
    samples = bench.load(os.path.join(fixtures, "scienceqa"), limit=2)
    answers, logprobs = ev.choose(samples)
    for sample, answer, lp in zip(samples, answers, logprobs):
        ex = ev.prompt_example(sample)
        manual = []
        for option in sample.options:
            opt = tokenizer(option, add_special_tokens=False)["input_ids"]
            ids = np.concatenate([ex.input_ids, opt])[None]
            logits = model.logits(ids, pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw)[0]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            n = len(ex.input_ids)
            manual.append(sum(logp[n - 1 + j, t] for j, t in enumerate(opt)))
        np.testing.assert_allclose(lp, manual, rtol=1e-4, atol=1e-3)
        assert answer == sample.options[int(np.argmax(manual))]


def test_adapters_change_the_answers(embedded, fixtures, tmp_path):
    """--adapter with live LoRA + IADA moves every option log-likelihood."""
    import jax
    import eval as eval_cli

    from iada_jax.checkpoint import save_params
    from iada_jax.experiments import get_experiment
    from iada_jax.model.qwen3_vl import init_adapters

    ckpt, _, _, model = embedded
    exp = get_experiment("D_iada_lora")
    fwd = model.fwd.__class__(block_size=exp.iada.block_size)
    adapters = init_adapters(jax.random.PRNGKey(0), model.params, cfg=model.config, fwd=fwd, lora=exp.lora, iada=exp.iada)
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.1, adapters)
    run = tmp_path / "run"
    os.makedirs(run)
    with open(run / "config.json", "w") as f:
        import dataclasses

        json.dump({"train": {"model": ckpt, "min_pixels": 1024, "max_pixels": 4096}, "lora": dataclasses.asdict(exp.lora), "iada": dataclasses.asdict(exp.iada)}, f)
    save_params(str(run / "final"), adapters)
    common = ["--model", ckpt, "--data", fixtures, "--bench", "pope", "--mode", "loglik", "--dtype", "float32",
              "--limit", "2", "--no-progress"]
    assert eval_cli.main(common + ["--out", str(tmp_path / "base"), "--min-pixels", "1024", "--max-pixels", "4096"]) == 0
    # The adapted run evaluates with the pixel limits it was trained with (its config.json).
    assert eval_cli.main(common + ["--out", str(tmp_path / "adapted"), "--adapter", str(run)]) == 0
    assert json.load(open(tmp_path / "adapted" / "results.json"))["settings"]["max_pixels"] == 4096
    read = lambda p: [json.loads(l)["option_logprobs"] for l in open(p / "pope" / "predictions.jsonl")]  # noqa: E731,E741
    base, adapted = read(tmp_path / "base"), read(tmp_path / "adapted")
    assert all(abs(a[k] - b[k]) > 1e-2 for a, b in zip(adapted, base) for k in a)


def test_table_averages_and_compare_deltas(tmp_path):
    # Row A of the paper's Table 1: its R-Avg 57.3, P-Avg 73.5, All-Avg 66.1 are these means.
    paper_a = dict(zip(PAPER, [34.2, 48.0, 82.9, 45.4, 76.0, 82.3, 89.3, 66.4, 79.6, 80.2, 43.1]))
    row = summarize(paper_a)
    assert (round(row["R-Avg"], 1), round(row["P-Avg"], 1), round(row["All-Avg"], 1)) == (57.3, 73.5, 66.1)
    partial = summarize({"mmmu": 40.0, "pope": 80.0})
    assert partial["R-Avg"] is None and partial["mmmu"] == 40.0 and partial["ocrbench"] is None
    for label, shift in (("A", 0.0), ("D", 2.0)):
        os.makedirs(tmp_path / label)
        write_results(str(tmp_path / label), label, {k: v + shift for k, v in paper_a.items()}, {})
    table = compare([str(tmp_path / "A"), str(tmp_path / "D")])
    lines = table.splitlines()
    assert lines[2].startswith("| A | 34.2 | 48.0 |") and lines[3].startswith("| D | 36.2 | 50.0 |")
    assert lines[4].startswith("| (Δ vs A) | +2.0 | +2.0 |") and lines[4].endswith("| +2.0 | +2.0 | +2.0 |")
    assert markdown({"A": row}).count("\n") == 3
    import eval as eval_cli

    assert eval_cli.main(["--compare", str(tmp_path / "A"), str(tmp_path / "missing")]) == 1


def test_a_prompt_longer_than_max_length_is_refused_and_scored_wrong_never_truncated(embedded, tmp_path, capsys):
    from iada_jax.data.sft import BadRow
    from iada_jax.evaluation.runner import EvalConfig, Evaluator

    _, _, tok, model = embedded
    pope = get_benchmark("pope")
    samples = pope.load(pope.write_fixture(str(tmp_path / "pope"), num=2, seed=1))
    short = Evaluator(model, tok, cfg=EvalConfig(max_length=16), progress=False)  # 64 image tokens alone
    with pytest.raises(BadRow, match="too_long"):
        short.prompt_example(samples[0])
    answers = [None] * len(samples)
    assert short._prepare(samples, answers) == [] and answers == ["", ""]  # nothing generated: wrong
    assert capsys.readouterr().out.count("scored as wrong") == 2
    full = Evaluator(model, tok, cfg=EvalConfig(max_length=4096), progress=False)
    assert len(full._prepare(samples, [None] * len(samples))) == 2


def test_prompt_style_qwen3_vl_gives_lmms_evals_qwen3_vl_prompts(embedded, fixtures, tmp_path):
    import eval as eval_cli

    out = tmp_path / "qwen"
    assert eval_cli.main(["--model", embedded[0], "--data", fixtures, "--out", str(out), "--bench", "mmstar,mmmu",
                          "--dtype", "float32", "--max-new-tokens", "2", "--no-progress", "--prompt-style", "qwen3_vl",
                          "--min-pixels", "1024", "--max-pixels", "4096"]) == 0
    assert json.load(open(out / "results.json"))["settings"]["prompt_style"] == "qwen3_vl"
    mmstar = json.loads(open(out / "mmstar" / "predictions.jsonl").readline())
    assert mmstar["prompt"].startswith("Question: ") and mmstar["prompt"].endswith("Answer with the option letter only.")
    mmmu = [json.loads(line) for line in open(out / "mmmu" / "predictions.jsonl")]
    assert all("\nOptions:\n" in r["prompt"] and r["prompt"].startswith("Question: ") for r in mmmu)


def test_gpt_extractor_needs_a_key(embedded, fixtures, tmp_path, monkeypatch, capsys):
    import eval as eval_cli

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert eval_cli.main(["--model", embedded[0], "--data", fixtures, "--out", str(tmp_path), "--bench", "mathvista",
                          "--mathvista-extractor", "gpt", "--no-progress"]) == 1
    assert "OPENAI_API_KEY" in capsys.readouterr().err
