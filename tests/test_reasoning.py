"""Reasoning blocks cut from answers before scoring, as lmms-eval 0.7.3's default
`--reasoning_tags` (lmms_eval/api/reasoning.py): hand-worked cases of each of its rules, and
the evaluator scoring the stripped answer while keeping the raw one."""

from __future__ import annotations

import json

import pytest

from iada_jax.evaluation.reasoning import DEFAULT_REASONING_TAGS, parse_reasoning_tags, strip_reasoning_tags


@pytest.mark.parametrize("text, want", [
    ("<think>Two cats, one dog.</think> B", "B"),
    ("<think>a</think>yes<think>b</think>", "yes"),  # every block
    ("<analysis>long</analysis>\n\nThe answer is 4.", "The answer is 4."),
    ("<think>one</think><analysis>two</analysis>no", "no"),  # both default pairs
    ("Counting...</think> 3", "3"),  # opening tag prefilled by the template: keep what follows
    ("x</think>y</think> z", "z"),  # ... after the last closing tag
    ("<think>never closed, A", "<think>never closed, A"),  # left untouched
    ("<THINK>case</THINK> C", "<THINK>case</THINK> C"),  # case-sensitive
    ("</think>first<think>", "</think>first<think>"),  # a closing tag before the opening: no block, both present
    ("  plain answer \n", "plain answer"),  # always stripped of surrounding whitespace
])
def test_strip_follows_lmms_evals_rules(text, want):
    assert strip_reasoning_tags(text, DEFAULT_REASONING_TAGS) == want


def test_parse_reasoning_tags():
    assert parse_reasoning_tags(None) == DEFAULT_REASONING_TAGS
    assert parse_reasoning_tags("none") is None
    assert parse_reasoning_tags('[["<r>", "</r>"]]') == (("<r>", "</r>"),)
    with pytest.raises(ValueError, match="JSON list"):
        parse_reasoning_tags("<think>")


def test_the_evaluator_scores_the_stripped_answer_and_keeps_the_raw_one(embedded, tmp_path, monkeypatch):
    from iada_jax.evaluation.benchmarks import get_benchmark
    from iada_jax.evaluation.runner import EvalConfig, Evaluator

    _, _, tok, model = embedded
    pope = get_benchmark("pope")
    source = pope.write_fixture(str(tmp_path / "pope"), num=4, seed=1)
    samples = pope.load(source)
    golds = [s.target for s in samples]
    answers = [f"<think>Is there a {i}?</think> {g}" for i, g in enumerate(golds)]
    monkeypatch.setattr(Evaluator, "generate", lambda self, samples, n, desc="": list(answers))
    for tags, accuracy in ((DEFAULT_REASONING_TAGS, 100.0), (None, 0.0)):
        out = tmp_path / f"out{accuracy}"
        evaluator = Evaluator(model, tok, cfg=EvalConfig(reasoning_tags=tags), progress=False)
        scores = evaluator.run(pope, source, str(out))
        assert scores["accuracy"] == accuracy
        rows = [json.loads(line) for line in open(out / "pope" / "predictions.jsonl")]
        if tags:
            assert [r["prediction"] for r in rows] == golds and rows[0]["raw_prediction"] == answers[0]
        else:
            assert [r["prediction"] for r in rows] == answers and "raw_prediction" not in rows[0]
