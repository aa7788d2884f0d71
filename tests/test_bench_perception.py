"""Perception benchmarks (MME, POPE, ChartQA, TextVQA, OCRBench): lmms-eval's scoring rules on
hand-worked predictions, and write_fixture -> load round trips in each data set's real schema."""

from __future__ import annotations

import collections

import datasets
import pytest
from PIL import Image

from iada_jax.evaluation.benchmark import Sample
from iada_jax.evaluation.benchmarks import chartqa, get_benchmark, mme, ocrbench, pope, textvqa

MODULES = {"mme": mme, "pope": pope, "chartqa": chartqa, "textvqa": textvqa, "ocrbench": ocrbench}


def sample(target, options=None, **meta) -> Sample:
    return Sample(id="x", prompt="q", images=[], target=target, options=options, meta=meta)


# ------------------------------------------------------------------------------------- MME
@pytest.mark.parametrize("pred, label", [
    ("Yes", "yes"), (" NO. ", "no"), ("y", "yes"), ("N", "no"), ("Y.", "yes"), ("x", "other"),
    ("Yes, it is", "yes"),  # "yes" within the first 4 characters
    ("The answer is yes", "other"),  # "yes" only after the first 4 characters
    ("Not sure", "no"),  # lmms-eval's prefix rule: "not " contains "no"
    ("", "other"),
])
def test_mme_answer_extraction(pred, label):
    assert mme.parse_pred_ans(pred) == label


def test_mme_acc_and_acc_plus_per_image_pair():
    pairs = [("existence", "existence/0.png", "Yes", "Yes"), ("existence", "existence/0.png", "No", "No."),
             ("existence", "existence/1.png", "Yes", "Yes, it is"), ("existence", "existence/1.png", "No", "Maybe"),
             ("code_reasoning", "code/0.png", "Yes", "y"), ("code_reasoning", "code/0.png", "No", "N")]
    samples = [sample(gold, mme.OPTIONS, category=c, question_id=q) for c, q, gold, _ in pairs]
    out = mme.score(samples, [p for *_, p in pairs])
    # existence: 3 of 4 questions right (acc 75), 1 of 2 images fully right (acc+ 50) -> 125.
    assert out["per_category"]["existence"] == {"acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert out["per_category"]["code_reasoning"] == {"acc": 100.0, "acc+": 100.0, "score": 200.0}
    assert (out["perception"], out["cognition"], out["categories"], out["max_total"]) == (125.0, 200.0, 2, 400.0)
    assert out["score"] == 81.25  # (125 + 200) / (2 categories x 200) x 100
    assert out["unpaired"] == 0


def test_mme_full_set_normalisation_is_a_percentage_of_2800():
    cats = mme.PERCEPTION + mme.COGNITION
    samples = [sample(g, category=c, question_id=c) for c in cats for g in ("Yes", "No")]
    preds = [s.target for s in samples]
    preds[0] = "No"  # existence: acc 50, acc+ 0 -> 50 instead of 200
    out = mme.score(samples, preds)
    assert len(cats) == 14 and out["categories"] == 14 and out["max_total"] == mme.FULL_MAX == 2800.0
    assert (out["perception"], out["cognition"]) == (1850.0, 800.0)
    assert out["score"] == pytest.approx(2650.0 / 28)  # the leaderboard's (perception + cognition) / 28


def test_mme_a_pair_cut_by_limit_is_reported_as_unpaired():
    out = mme.score([sample("Yes", category="OCR", question_id="OCR/1.png")], ["yes"])
    assert out["unpaired"] == 1 and out["per_category"]["OCR"]["score"] == 200.0


# ------------------------------------------------------------------------------------- POPE
def test_pope_is_strict_yes_dot_is_wrong():
    s = [sample("yes", pope.OPTIONS, category="random")]
    assert pope.score(s, ["Yes."])["accuracy"] == 0.0
    assert pope.score(s, [" yes "])["accuracy"] == 100.0


def test_pope_metrics_by_hand_overall_and_per_category():
    rows = [("adversarial", "yes", "yes"), ("adversarial", "yes", "Yes."), ("adversarial", "yes", "no"),
            ("adversarial", "no", "yes"), ("random", "no", "no"), ("random", "no", " No "),
            ("random", "yes", "YES"), ("random", "no", "yes")]
    out = pope.score([sample(g, pope.OPTIONS, category=c) for c, g, _ in rows], [p for *_, p in rows])
    # Right: rows 0, 4, 5, 6 -> 4/8. TP = 2 (rows 0, 6), FP = 2 (rows 3, 7), FN = 1 (row 2):
    # "Yes." for a gold yes is neither TP nor FN in lmms-eval, so recall = 2/3, not 2/4.
    assert out["score"] == out["accuracy"] == 50.0
    assert out["precision"] == 50.0
    assert out["recall"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx(400 / 7)  # 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7
    assert out["yes_ratio"] == 50.0  # 4 gold yes of 8
    adv, rnd = out["per_category"]["adversarial"], out["per_category"]["random"]
    assert adv == {"accuracy": 25.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 75.0}
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["yes_ratio"]) == (75.0, 50.0, 100.0, 25.0)
    assert rnd["f1"] == pytest.approx(200 / 3)  # 2 * 0.5 * 1 / 1.5
    assert sorted(out["per_category"]) == ["adversarial", "random"]


def test_pope_chosen_options_score_as_predictions():
    s = [sample("yes", pope.OPTIONS, category="popular"), sample("no", pope.OPTIONS, category="popular")]
    assert pope.score(s, list(pope.OPTIONS))["score"] == 100.0  # "Yes" for gold yes, "No" for gold no


# ------------------------------------------------------------------------------------- ChartQA
@pytest.mark.parametrize("pred, target, right", [
    ("12%", "0.12", True), ("0.12", "12%", True),  # x% is x / 100 on both sides
    ("105", "100", True), ("95", "100", True),  # exactly 5% off: the boundary is inclusive
    ("105.5", "100", False), ("94.9", "100", False),
    ("Yes.", "Yes", False),  # no stripping of the prediction
    ("12.5.", "12.5", False),  # not a float, and not the same string
    ("12.", "12", True),  # Python's float accepts "12."
    ("0", "0", True), ("0.0", "0", False),  # zero target: exact string match only
    ("blue", "Blue", True), ("1,000", "1000", False),
])
def test_chartqa_relaxed_correctness(pred, target, right):
    assert chartqa.relaxed_correctness(pred, target) is right


def test_chartqa_split_scores():
    rows = [("human_test", "12%", "0.12"), ("human_test", "105", "100"), ("human_test", "105.5", "100"),
            ("human_test", "Yes.", "Yes"), ("augmented_test", "0.0", "0"), ("augmented_test", "0", "0"),
            ("augmented_test", "blue", "Blue"), ("augmented_test", "12.", "12")]
    out = chartqa.score([sample(t, type=k) for k, _, t in rows], [p for _, p, _ in rows])
    assert out == {"score": 62.5, "relaxed_overall": 62.5,  # 5 of 8
                   "relaxed_human_split": 50.0, "relaxed_augmented_split": 75.0,  # 2 of 4, 3 of 4
                   "lmms_eval": {"relaxed_overall": 0.625, "relaxed_human_split": 0.5, "relaxed_augmented_split": 0.75}}


# ------------------------------------------------------------------------------------- TextVQA
@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),  # number words <= ten only
    ("The Coca-Cola", "coca cola"), ("a sign", "sign"), ("an apple", "apple"),  # "-" -> space; articles go
    ("one-way", "1 way"),
    ("dont", "don't"), ("Dont.", "don't"), ("whats", "what's"),  # contractions
    ("Im", "im"),  # EvalAI's capitalised keys never match lower-cased text
    ("somebody'd", "somebodyd"),  # EvalAI's table maps this one backwards
    ("McDonald's", "mcdonald 's"),  # "'s" split off
    ("3.5", "3.5"), ("5.", "5"),  # only decimal points survive
    ("yes!", "yes"), ("Hello, world?", "hello world"),
    ("(c) 2019", "c 2019"),  # "(" touches no space -> space; ")" touches one -> removed
])
def test_textvqa_normalisation(raw, norm):
    assert textvqa.normalize_answer(raw) == norm


def test_textvqa_leave_one_out_accuracy():
    two = ["Coca Cola"] * 2 + ["pepsi"] * 8
    three = ["Coca Cola"] * 3 + ["pepsi"] * 7
    # 2 matches: the 2 matching annotators see 1 other (1/3), the 8 others see 2 (2/3): (2/3 + 16/3) / 10.
    assert textvqa.vqa_accuracy("coca-cola", two) == pytest.approx(0.6)
    # 3 matches: (3 x 2/3 + 7 x 1) / 10.
    assert textvqa.vqa_accuracy("coca-cola", three) == pytest.approx(0.9)
    assert textvqa.vqa_accuracy("Pepsi.", two) == 1.0
    assert textvqa.vqa_accuracy("sprite", two) == 0.0
    out = textvqa.score([sample(two), sample(three)], ["coca-cola", "The Coca Cola"])
    assert out["score"] == pytest.approx(75.0) and out["exact_match"] == pytest.approx(75.0)


# ------------------------------------------------------------------------------------- OCRBench
@pytest.mark.parametrize("pred, answers, dataset, hit", [
    ("The text is ＡＢＣ.", ["ABC"], "IIIT5K", True),  # full-width folded, lower-cased
    ("pepsi", ["ＰＥＰＳＩ"], "textVQA", True),  # the answer is folded too
    ("ＡＢＣ　ＤＥＦ", ["abc def"], "IIIT5K", True),  # the ideographic space is a space
    ("Hello\nWorld", ["hello world"], "docVQA", True),
    ("1234", ["12345"], "docVQA", False),
    ("It says BAR", ["foo", "bar"], "FUNSD", True),  # any answer
    ("$\\frac{a}{b}$", ["\\frac { a } { b }"], "HME100k", True),  # spaces removed from both
    ("a\n+b", ["a + b"], "HME100k", True),
    ("x^2", ["X ^ 2"], "HME100k", False),  # case kept for HME100k
])
def test_ocrbench_hits(pred, answers, dataset, hit):
    assert ocrbench.is_hit(pred, answers, dataset) is hit


def test_ocrbench_score_counts_per_question_type():
    rows = [("IIIT5K", "Regular Text Recognition", ["ABC"], "ＡＢＣ"),
            ("docVQA", "Doc-oriented VQA", ["hello world"], "Hello\nWorld"),
            ("docVQA", "Doc-oriented VQA", ["12345"], "1234"),
            ("HME100k", "Handwritten Mathematical Expression Recognition", ["a + b"], "a+b"),
            ("HME100k", "Handwritten Mathematical Expression Recognition", ["X ^ 2"], "x^2")]
    out = ocrbench.score([sample(a, dataset=d, question_type=t) for d, t, a, _ in rows], [p for *_, p in rows])
    assert (out["final_score"], out["samples"], out["text_recognition"]) == (3, 5, 1)
    assert out["score"] == 60.0  # 3 hits of 5
    assert out["lmms_eval_accuracy"] == 0.3  # lmms-eval: 3 hits of 1000, whatever the sample count
    assert out["per_question_type"] == {
        "Doc-oriented VQA": {"hits": 1, "total": 2},
        "Handwritten Mathematical Expression Recognition": {"hits": 1, "total": 2},
        "Regular Text Recognition": {"hits": 1, "total": 1}}


# ------------------------------------------------------------------------------------- all five
INTERFACE = {  # name: (TITLE, DATASET, SPLIT, MAX_NEW_TOKENS)
    "mme": ("MME", "lmms-lab/MME", "test", 16), "pope": ("POPE", "lmms-lab/POPE", "test", 128),
    "chartqa": ("ChartQA", "lmms-lab/ChartQA", "test", 16),
    "textvqa": ("TextVQA", "lmms-lab/textvqa", "validation", 128),
    "ocrbench": ("OCRBench", "echo840/OCRBench", "test", 128),
}
COLUMNS = {  # the real HF column names, in order
    "mme": ["question_id", "image", "question", "answer", "category"],
    "pope": ["id", "question_id", "question", "answer", "image_source", "image", "category"],
    "chartqa": ["type", "question", "answer", "image"],
    "textvqa": ["image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
                "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens"],
    "ocrbench": ["dataset", "question", "question_type", "answer", "image"],
}
FIRST_PROMPT = {
    "mme": "Is there a clock in this image?\nAnswer the question using a single word or phrase.",
    "pope": "Is there a car in the image?\nAnswer the question using a single word or phrase.",
    "chartqa": "What is the value of bar 0?\nAnswer the question with a single word.",
    "textvqa": "What is written on the sign by the atm 0?\nAnswer the question using a single word or phrase.",
    "ocrbench": "what is written in the image?",
}
OPTIONS = {"mme": ("Yes", "No"), "pope": ("Yes", "No"), "chartqa": None, "textvqa": None, "ocrbench": None}


def oracle(name: str, s: Sample) -> str:
    """A prediction each benchmark must score as right."""
    if name == "pope":
        return "Yes" if s.target == "yes" else "No"
    if name == "textvqa":
        return collections.Counter(s.target).most_common(1)[0][0]
    return s.target[0] if name == "ocrbench" else s.target


@pytest.mark.parametrize("name", list(MODULES))
def test_fixture_round_trip(name, tmp_path):
    mod = MODULES[name]
    assert get_benchmark(name) is mod and mod.NAME == name and mod.GROUP == "perception"
    assert (mod.TITLE, mod.DATASET, mod.SPLIT, mod.MAX_NEW_TOKENS) == INTERFACE[name]
    path = mod.write_fixture(str(tmp_path / "a"))
    raw = datasets.load_dataset("parquet", data_files=path, split="train")
    assert raw.column_names == COLUMNS[name] and raw.features["image"] == datasets.Image()

    samples = mod.load(path)
    assert len(samples) == 8 and len({s.id for s in samples}) == 8
    assert samples[0].prompt == FIRST_PROMPT[name]
    assert all(len(s.images) == 1 and isinstance(s.images[0], Image.Image) and s.images[0].mode == "RGB"
               and 32 <= min(s.images[0].size) <= max(s.images[0].size) <= 64 for s in samples)
    assert all(s.options == OPTIONS[name] for s in samples)
    assert mod.score(samples, [oracle(name, s) for s in samples])["score"] == 100.0
    with pytest.raises(ValueError, match="predictions for 8 samples"):
        mod.score(samples, [oracle(name, s) for s in samples[:-1]])

    assert [s.id for s in mod.load(path, limit=3)] == [s.id for s in samples[:3]]
    again = mod.load(mod.write_fixture(str(tmp_path / "b")))  # deterministic
    assert [(s.prompt, s.target, s.images[0].tobytes()) for s in again] == \
        [(s.prompt, s.target, s.images[0].tobytes()) for s in samples]


def test_fixtures_cover_what_scoring_distinguishes(tmp_path):
    m = mme.load(mme.write_fixture(str(tmp_path / "mme")))
    assert collections.Counter(s.meta["question_id"] for s in m) == {q: 2 for q in {s.meta["question_id"] for s in m}}
    cats = {s.meta["category"] for s in m}
    assert cats & set(mme.PERCEPTION) and cats & set(mme.COGNITION)
    assert {s.meta["type"] for s in chartqa.load(chartqa.write_fixture(str(tmp_path / "c")))} == \
        {"human_test", "augmented_test"}
    assert {s.meta["category"] for s in pope.load(pope.write_fixture(str(tmp_path / "p")))} == set(pope.CATEGORIES)
    assert "HME100k" in {s.meta["dataset"] for s in ocrbench.load(ocrbench.write_fixture(str(tmp_path / "o")))}


def corrupt(mod, tmp_path, column: str, row: int, value) -> str:
    """The module's fixture with one cell replaced, written back in the same schema."""
    cols = datasets.load_dataset("parquet", data_files=mod.write_fixture(str(tmp_path / "good")), split="train")[:]
    cols[column][row] = value
    path = str(tmp_path / "bad.parquet")
    datasets.Dataset.from_dict(cols, features=mod.features()).to_parquet(path)
    return path


@pytest.mark.parametrize("name, column, row, value, message", [
    ("mme", "answer", 1, "Maybe", r"row 1: answer 'Maybe' is not Yes/No"),
    ("pope", "answer", 2, "maybe", r"row 2: answer 'maybe' is not yes/no"),
    ("chartqa", "image", 3, None, r"row 3: bad_image"),
    ("textvqa", "answers", 1, [], r"row 1: answers must be a non-empty list"),
    ("ocrbench", "question_type", 0, "Poetry", r"row 0: unknown question_type 'Poetry'"),
])
def test_malformed_rows_name_the_file_and_row(name, column, row, value, message, tmp_path):
    mod = MODULES[name]
    path = corrupt(mod, tmp_path, column, row, value)
    with pytest.raises(ValueError, match=message) as e:
        mod.load(path)
    assert path in str(e.value)


def test_missing_columns_are_named(tmp_path):
    path = str(tmp_path / "no_type.parquet")
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"missing columns \['type', 'image'\]"):
        chartqa.load(path)
