"""Our 11 benchmarks against lmms-eval 0.7.3's own task code (tests/lmms_reference.py): on rows
in each benchmark's real schema (the fixtures), the same prompts (every prompt style and
MathVista variant), the same images, and for adversarial predictions the same per-benchmark
metrics as lmms-eval's `process_results` + aggregation return them (our "lmms_eval" entry).

Skipped, with the reason, only when the lmms-eval wheel cannot be fetched (no package index)."""

from __future__ import annotations

import copy
import random
import string
import types

import lmms_reference as lmms
import numpy as np
import pytest

from iada_jax.evaluation.benchmark import open_dataset
from iada_jax.evaluation.benchmarks import PAPER, get_benchmark, mathvista, mcq


@pytest.fixture(scope="module")
def reference():
    try:
        lmms.lmms_eval_root()
    except lmms.Unavailable as e:
        pytest.skip(f"lmms-eval {lmms.VERSION} wheel unavailable: {e}")
    return lmms


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """{name: (samples of each prompt setting, the raw rows as lmms-eval sees them)}."""
    folder = tmp_path_factory.mktemp("lmms_parity")
    out = {}
    for name in PAPER:
        bench = get_benchmark(name)
        path = bench.write_fixture(str(folder / name), num=12, seed=1)
        out[name] = (path, [dict(r) for r in open_dataset(path, bench.SPLIT)])
    return out


# ----------------------------------------------------------------------------- prompts
# (benchmark, our load kwargs, lmms task folder, yaml, kwargs key, doc_to_text name)
PROMPTS = [
    ("mmmu", {"prompt_style": "default"}, "mmmu", "mmmu/mmmu_val.yaml", "default", "mmmu_doc_to_text"),
    ("mmmu", {"prompt_style": "qwen3_vl"}, "mmmu", "mmmu/mmmu_val.yaml", "qwen3_vl", "mmmu_doc_to_text"),
    ("mathvista", {"variant": "cot"}, "mathvista", "mathvista/mathvista_testmini_cot.yaml", "default",
     "mathvista_doc_to_text"),
    ("mathvista", {"variant": "format"}, "mathvista", "mathvista/mathvista_testmini_format.yaml", "default",
     "mathvista_doc_to_text"),
    ("mathvista", {"variant": "solution"}, "mathvista", "mathvista/mathvista_testmini_solution.yaml", "default",
     "mathvista_doc_to_text"),
    ("scienceqa", {}, "scienceqa", "scienceqa/scienceqa_img.yaml", "default", "sqa_doc_to_text"),
    ("mmstar", {"prompt_style": "default"}, "mmstar", "mmstar/_default_template_yaml", "default", "mmstar_doc_to_text"),
    ("mmstar", {"prompt_style": "qwen3_vl"}, "mmstar", "mmstar/_default_template_yaml", "qwen3_vl",
     "mmstar_doc_to_text"),
    ("ai2d", {}, "ai2d", "ai2d/ai2d.yaml", "default", "ai2d_doc_to_text"),
    ("mme", {}, "mme", "mme/mme.yaml", "default", "mme_doc_to_text"),
    ("pope", {}, "pope", "pope/pope.yaml", "default", "pope_doc_to_text"),
    ("realworldqa", {}, "realworldqa", "realworldqa/realworldqa.yaml", "default", "realworldqa_doc_to_text"),
    ("chartqa", {}, "chartqa", "chartqa/chartqa.yaml", "default", "chartqa_doc_to_text"),
    ("textvqa", {}, "textvqa", "textvqa/_default_template_textvqa_yaml", "default", "textvqa_doc_to_text"),
    ("ocrbench", {}, "ocrbench", "ocrbench/ocrbench.yaml", "default", "ocrbench_doc_to_text"),
]


@pytest.mark.parametrize("name, kwargs, task, yaml_path, key, fn", PROMPTS,
                         ids=[f"{p[0]}-{'-'.join(map(str, p[1].values())) or 'default'}" for p in PROMPTS])
def test_prompts_and_images_equal_lmms_evals(reference, fixtures, name, kwargs, task, yaml_path, key, fn):
    bench = get_benchmark(name)
    path, docs = fixtures[name]
    samples = bench.load(path, **kwargs)
    utils = reference.task_utils(task)
    task_kwargs = reference.task_kwargs(yaml_path)[key]
    for sample, doc in zip(samples, docs, strict=True):
        assert sample.prompt == getattr(utils, fn)(copy.deepcopy(doc), task_kwargs), sample.id
        visual_fn = next(getattr(utils, n) for n in dir(utils) if n.endswith("doc_to_visual") and "_oc_" not in n)
        theirs = visual_fn(copy.deepcopy(doc))
        assert len(sample.images) == len(theirs)
        for ours, their in zip(sample.images, theirs):
            assert np.array_equal(np.asarray(ours), np.asarray(their.convert("RGB")))


# ----------------------------------------------------------------------------- scores
POOL = ["A", "B", "b", "(C)", "D.", "C) blue", "B. green", "The answer is B.", "Answer: A", "Option C", "yes", "No",
        "Yes.", "no, it is not", "", "  ", "14", "fourteen", "3.0", "1,000", "red", "Red.", "The colour is blue",
        "A or B", "I cannot tell.", "The answer is (D)", "answer: c", "1", "2.5", "[1, 2]", "E", "yes, there is"]


def _variants(target) -> list[str]:
    text = target if isinstance(target, str) else str(target[0] if isinstance(target, (list, tuple)) and target else target)
    return [text, text.lower(), f"The answer is {text}.", f" {text} ", text.upper()]


def _predictions(samples, round_: int) -> list[str]:
    """Round 0: the gold answers; then adversarial answers from POOL and variants of the gold."""
    rng = random.Random(round_)
    out = []
    for s in samples:
        candidates = POOL + _variants(s.target) + list(s.options or ())
        out.append(_variants(s.target)[0] if round_ == 0 else rng.choice(candidates))
    return out


def _mmmu_safe(samples, predictions):
    """MMMU's multiple-choice parser falls back to a random letter (unseeded in lmms-eval):
    such predictions are replaced by the gold letter."""
    class Raise:
        def choice(self, _):
            raise LookupError

    out = []
    for s, p in zip(samples, predictions):
        if s.options:
            try:
                mcq.parse_mmmu_multi_choice_response(p, s.options, s.meta["index2ans"], Raise())
            except LookupError:
                p = s.target
        out.append(p)
    return out


def _mean_metric(results: list[dict], key: str) -> float:
    values = [r[key] for r in results]
    return sum(values) / len(values)


def _lmms_scores(reference, name, docs, predictions, tmp_path) -> dict:
    """What lmms-eval 0.7.3's process_results + aggregations return for these predictions."""
    if name == "ai2d":
        utils = reference.task_utils("ai2d")
        exact = reference.function("lmms_eval/api/metrics.py", "exact_match_hf_evaluate", np=np, re=__import__("re"),
                                   string=string)
        filtered = utils.MultiChoiceRegexFilter(regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True,
                                                ignore_punctuation=True).apply([[p] for p in predictions], docs)
        scores = [exact([f], [utils.ai2d_doc_to_target(d, "mcq")], ignore_case=True, ignore_punctuation=True)
                  ["exact_match"] for f, d in zip(filtered, docs)]
        return {"exact_match": sum(scores) / len(scores)}
    if name == "mathvista":
        return {"llm_as_judge_eval": _mathvista(reference, docs, predictions)}
    utils = reference.task_utils(name)
    process = utils.sqa_process_results if name == "scienceqa" else getattr(utils, f"{name}_process_results")
    results = [process(d, [p]) for d, p in zip(docs, predictions)]
    if name in ("chartqa", "realworldqa", "scienceqa", "textvqa"):  # yaml aggregation: mean
        keys = {k for r in results for k in r if k != "submission"}
        return {k: _mean_metric([r for r in results if k in r], k) for k in keys}
    if name == "pope":
        keys = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
        return {k: getattr(utils, k.replace("pope_", "pope_aggregate_"))([r[k] for r in results]) for k in keys}
    if name == "mme":
        out = {}
        for key in ("mme_perception_score", "mme_cognition_score"):
            mine = [r[key] for r in results if key in r]
            if mine:
                out[key] = utils.mme_aggregate_results(mine)
        return out
    if name == "ocrbench":
        for k in utils.OCRBench_score:  # module-level totals lmms-eval never resets
            utils.OCRBench_score[k] = 0
        args = types.SimpleNamespace(output_path=str(tmp_path))
        return {"ocrbench_accuracy": utils.ocrbench_aggregate_accuracy([r["ocrbench_accuracy"] for r in results], args)}
    if name == "mmstar":
        out = {}
        for key in sorted({k for r in results for k in r}):
            out[key] = utils.mmstar_aggregate_results([r[key] for r in results if key in r])
        return out
    if name == "mmmu":
        return {"mmmu_acc": utils.mmmu_aggregate_results([r["mmmu_acc"] for r in results])}
    raise AssertionError(name)


def _mathvista(reference, docs, predictions):
    """lmms-eval's MathVista scoring with its GPT call answered by our offline extractor (the
    prompt it sends must be the one we build), on docs whose float `precision` is an int: with
    the data set's floats lmms-eval 0.7.3 scores every float question wrong (tested apart)."""
    utils = reference.task_utils("mathvista")
    samples = {str(d["pid"]): d for d in docs}

    def answer(prompt, **kwargs):
        for pid, d in samples.items():
            for response in set(predictions):
                if prompt == mathvista.gpt_prompt(d["query"], response.strip()):
                    meta = {"question_type": d["question_type"], "answer_type": d["answer_type"],
                            "choices": d["choices"] or [], "precision": d["precision"]}
                    return mathvista.offline_extract(response.strip(), meta)
        raise AssertionError(f"lmms-eval asked the extractor a prompt we would not build: {prompt[-300:]!r}")

    utils.mathvista_evaluator.get_chat_response = answer
    fixed = [dict(d, precision=int(d["precision"]) if d["precision"] is not None else None) for d in docs]
    results = [utils.mathvista_process_results(d, [p])["llm_as_judge_eval"] for d, p in zip(fixed, predictions)]
    return utils.mathvista_aggregate_results(results, None)


@pytest.mark.parametrize("name", PAPER)
def test_scores_equal_lmms_evals(reference, fixtures, name, tmp_path):
    bench = get_benchmark(name)
    path, docs = fixtures[name]
    samples = bench.load(path)
    for round_ in range(6):
        predictions = _predictions(samples, round_)
        if name == "mmmu":
            predictions = _mmmu_safe(samples, predictions)
        theirs = _lmms_scores(reference, name, docs, predictions, tmp_path)
        ours = bench.score(samples, predictions)["lmms_eval"]
        ours = {k: v for k, v in ours.items() if k in theirs}
        assert ours == pytest.approx(theirs, abs=1e-12), (round_, predictions)
        assert set(theirs) <= set(bench.score(samples, predictions)["lmms_eval"])


def test_lmms_eval_scores_float_mathvista_questions_wrong_with_the_datasets_precision(reference, fixtures):
    """The documented difference: lmms-eval rounds with the data set's float precision, which
    raises inside its normaliser, so an exact float answer is wrong there and right here."""
    utils = reference.task_utils("mathvista")
    _, docs = fixtures["mathvista"]
    doc = next(d for d in docs if d["answer_type"] == "float")
    result = utils.mathvista_process_results(doc, [doc["answer"]])["llm_as_judge_eval"]
    assert result["prediction"] is None and result["true_false"] is False
    sample = next(s for s in mathvista.load(fixtures["mathvista"][0]) if s.id == str(doc["pid"]))
    assert mathvista.score([sample], [doc["answer"]])["correct"] == 1
