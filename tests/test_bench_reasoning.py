"""The reasoning benchmarks (MMMU, MathVista, ScienceQA, MMStar, AI2D) and RealWorldQA:
lmms-eval's answer parsing and scoring on hand-written predictions whose scores are worked
out by hand, and each loader on its fixture (real HF schema) and on malformed rows."""

from __future__ import annotations

import json
import random
import re

import pytest
from PIL import Image

from iada_jax.evaluation.benchmark import Sample
from iada_jax.evaluation.benchmarks import ai2d, get_benchmark, mathvista, mcq, mmmu, mmstar, realworldqa, scienceqa

MODULES = (mmmu, mathvista, scienceqa, mmstar, ai2d, realworldqa)
COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


def _mc(id_: str, target: str, **meta) -> Sample:
    return Sample(id=id_, prompt="", images=[], target=target, options=mcq.ABCD, meta=meta)


# ----------------------------------------------------------------------------- shared MCQ parsing
@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"),                        # "(X)" is the first rule
    ("B", "B"),                          # padded to " B ": the "X " rule
    ("I pick B.\nDone", "B"),            # no "(X)", no "X ": the "X." rule
    ("I think the square is coloured green in the picture", "B"),  # > 5 words: option text
    ("It is red, no wait, it is green", "B"),  # two option texts: the later one
    ("A or B? I say B", "B"),            # "A " and "B ": the last " B " is later than " A "
    ("Not (B) but (C)", "C"),            # two bracketed: the later one
])
def test_mmmu_multi_choice_parser(response, letter):
    rng = random.Random(0)
    assert mcq.parse_mmmu_multi_choice_response(response, mcq.ABCD, COLOURS, rng) == letter


def test_mmmu_multi_choice_parser_falls_back_to_the_given_rng():
    # "green" is one word (text matching needs > 5), so no candidate: rng.choice(A-D).
    # random.Random(0).choice(["A","B","C","D"]) is "D", Random(1) gives "B".
    picks = [mcq.parse_mmmu_multi_choice_response("green", mcq.ABCD, COLOURS, random.Random(s)) for s in (0, 0, 1)]
    assert picks == ["D", "D", "B"]


@pytest.mark.parametrize("response, letter", [
    ("B", "B"),                          # start (priority 10)
    ("The answer is (C).", "C"),         # phrase (7) beats "(C)" (6)
    ("Answer: B", "B"),                  # end (9)
    ("(B) is wrong; D.", "D"),           # end "D" (9) beats "(B)" (6)
    ("I choose B because C is wrong", "C"),  # both after the phrase (7): the later letter wins
    ("A cat is on the mat", "A"),        # a capital "A" word counts as a leading letter
    ("Option B. is tempting, but the answer is C for sure", "C"),  # phrase (7) beats "B." (5)
    ("Definitely", "D"),                 # nothing marked: any occurrence (fallback)
    ("b", ""),                           # letters are case-sensitive
    ("no letter here", ""),
    ("   ", ""),
])
def test_extract_mcq_answer(response, letter):
    assert mcq.extract_mcq_answer(response, mcq.ABCD) == letter


def test_extract_mcq_answer_only_offers_the_given_letters():
    assert mcq.extract_mcq_answer("E") == "E"  # the default alphabet is A-H
    assert mcq.extract_mcq_answer("E", ("A", "B")) == ""


def test_option_helpers():
    assert mcq.format_options(["x", "y"]) == "A. x\nB. y"
    assert mcq.embedded_letters("Options: A: 1, B: 2, D: 4", r"(?:^|[\s,])([A-Z]):") == ("A", "B")  # a run from A
    with pytest.raises(ValueError, match="0 options"):
        mcq.option_letters(0)


# ----------------------------------------------------------------------------- scorers
def test_mmmu_score():
    mc = [Sample(id=f"q{i}", prompt="", images=[], target="B", options=mcq.ABCD,
                 meta={"question_type": "multiple-choice", "index2ans": COLOURS}) for i in range(4)]
    open_ = [Sample(id=f"o{i}", prompt="", images=[], target=t, meta={"question_type": "open", "index2ans": None})
             for i, t in enumerate(["24", "24", "24", "Paris", "a"])]
    predictions = [
        "(B)",                      # 1
        "B.",                       # 1: stripped to "B"
        "(A)",                      # 0
        "purple",                   # seeded fallback: Random("0:q3").choice(A-D) is "A" -> 0
        "so the result is 24 apples",  # 1: key tail "24 apples" -> number 24.0
        "24.0",                     # 1: numbers compare as floats
        "There are 2,400 apples",   # 0: 2400.0 and 400.0, not 24.0
        "I think it is Paris.",     # 1: "paris" contained in the key tail
        "cat",                      # 0: a one-letter gold needs " a" or "a ", not just "a"
    ]
    result = mmmu.score(mc + open_, predictions)
    assert result["correct"] == 5 and result["total"] == 9
    assert result["score"] == pytest.approx(500 / 9)
    assert result["multiple_choice"] == 50.0 and result["open"] == 60.0
    assert mmmu.score(mc + open_, predictions) == result  # the fallback is reproducible
    assert mmmu.score(mc[3:], ["purple"], seed=1)["score"] == 100.0  # Random("1:q3") picks "B"


def test_mmmu_open_response_parsing():
    assert mmmu.parse_open_response("The answer is 24.") == [24.0]
    assert mmmu.parse_open_response("There are 2,400 apples") == ["there are 2,400 apples", 2400.0, 400.0]
    assert mmmu.parse_open_response("x = 25") == [25.0]  # "=" is a key only in the last line


def test_mathvista_score():
    choice = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3/11", "8/11", "6/11", "3/5"],
              "precision": None}
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": [], "precision": None}
    floating = {"question_type": "free_form", "answer_type": "float", "choices": [], "precision": 1.0}
    cases = [
        (choice, "8/11", "B", 1),                      # letter -> choice text
        (choice, "8/11", "(B) 8/11", 1),               # leading label
        (choice, "8/11", "The correct answer is B.", 1),  # answer phrase
        (choice, "8/11", "8/12", 1),                   # Levenshtein: 1 from "8/11", 2 from "3/11" and "6/11"
        (choice, "8/11", "6/10", 0),                   # nearest is "6/11"
        (choice, "8/11", "E", 0),                      # no option E: nearest by edits is "3/5"
        (integer, "14", "14.0", 1),                    # int(float("14.0"))
        (integer, "14", "There are 14 apples", 1),     # last number
        (integer, "14", "3 rows of 4 plus 2, answer: 14", 1),  # text after "answer:"
        (integer, "14", "fourteen", 1),                # a number word
        (integer, "21", "There are twenty one.", 1),   # tens and units
        (integer, "14", "none", 0),                    # no number at all: None
        (floating, "1.5", "1.52", 1),                  # round(1.52, 1)
        (floating, "1.5", "1.44", 0),                  # round(1.44, 1) = 1.4
    ]
    samples = [Sample(id=str(i), prompt="", images=[], target=t, meta=m) for i, (m, t, _, _) in enumerate(cases)]
    result = mathvista.score(samples, [p for _, _, p, _ in cases])
    assert [mathvista.score([s], [p])["correct"] for s, (_, _, p, _) in zip(samples, cases)] == [c for *_, c in cases]
    assert result["correct"] == 10 and result["score"] == pytest.approx(1000 / 14)
    assert result["question_type"]["multi_choice"] == {"accuracy": round(400 / 6, 2), "correct": 4, "total": 6}
    assert result["answer_type"]["integer"]["accuracy"] == round(500 / 6, 2)
    assert result["answer_type"]["float"]["accuracy"] == 50.0
    assert result["lmms_eval"] == {"llm_as_judge_eval": round(1000 / 14, 2)}  # lmms-eval's rounding


@pytest.mark.parametrize("response, gold", [
    ("b", "8/11"),                                  # a lower-case letter alone
    ("(b)", "8/11"),
    ("Comparing the bars, the second is larger, so B.", "8/11"),  # a letter ending the response
    ("It is between 3/5 and 8/11; the value is 8/11", "8/11"),   # the last choice text named
])
def test_mathvista_offline_extraction_catches_what_the_gpt_extractor_would(response, gold):
    meta = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3/11", "8/11", "6/11", "3/5"],
            "precision": None}
    assert mathvista.score([Sample(id="0", prompt="", images=[], target=gold, meta=meta)], [response])["correct"] == 1


def test_mathvista_text_options_named_in_the_answer():
    meta = {"question_type": "multi_choice", "answer_type": "text", "precision": None,
            "choices": ["Between 2006 and 2007", "Between 2007 and 2008", "Between 2008 and 2009"]}
    sample = Sample(id="0", prompt="", images=[], target="Between 2007 and 2008", meta=meta)
    assert mathvista.score([sample], ["The steepest fall is between 2007 and 2008."])["correct"] == 1


def test_levenshtein():
    assert mathvista.levenshtein("kitten", "sitting") == 3
    assert mathvista.levenshtein("", "abc") == 3
    assert mathvista.levenshtein("8/12", "3/11") == 2


def test_scienceqa_score():
    samples = [_mc(str(i), "A") for i in range(7)]
    # 1: "a" (case-insensitive), " A " (stripped), "A. foo" (capital + period);
    # 0: "(A)", "The answer is A", "a." (lower case + period), "B. foo" (wrong letter)
    predictions = ["a", " A ", "A. foo", "(A)", "The answer is A", "a.", "B. foo"]
    assert [scienceqa.is_correct(p, "A") for p in predictions] == [True] * 3 + [False] * 4
    assert scienceqa.score(samples, predictions)["score"] == pytest.approx(300 / 7)


def test_mmstar_score_is_the_mean_of_l2_categories():
    samples = [_mc("0", "A", category="math", l2_category="geometry")]
    samples += [_mc(str(i), "B", category="math", l2_category="statistical reasoning") for i in (1, 2, 3)]
    result = mmstar.score(samples, ["A", "The answer is B", "(C)", "D"])
    # geometry 1/1 = 100, statistical reasoning 1/3: mean 66.67; the plain mean is 2/4 = 50
    assert result["score"] == pytest.approx(200 / 3)
    assert result["plain"] == 50.0
    assert result["math"] == pytest.approx(200 / 3)
    assert result["l2/statistical reasoning"] == pytest.approx(100 / 3)


def test_mmstar_and_realworldqa_look_for_letters_a_to_d_whatever_the_options():
    """As lmms-eval 0.7.3 (`extract_mcq_answer(pred, choices=["A", "B", "C", "D"])` in both): a
    two-option question answered "the answer is B, not C" reads C (the later phrase match), and a
    fifth option's letter is never found."""
    two = ("A", "B")
    five = ("A", "B", "C", "D", "E")
    mm = [_mc("0", "B", category="math", l2_category="geometry"), _mc("1", "E", category="math", l2_category="geometry")]
    mm[0] = Sample(id="0", prompt="", images=[], target="B", options=two, meta=mm[0].meta)
    mm[1] = Sample(id="1", prompt="", images=[], target="E", options=five, meta=mm[1].meta)
    assert mmstar.score(mm, ["The answer is B, not C", "E"])["plain"] == 0.0
    assert mmstar.score(mm, ["B", "D"])["plain"] == 50.0
    assert not realworldqa.is_correct("The answer is B, not C", "B", two)
    assert realworldqa.is_correct("B", "b", two)  # a lower-case gold letter is a letter gold too


def test_ai2d_score():
    predictions = ["B.", "  B. green", "b", "(B)", "B ", "The answer is B", " b. green", "C. red"]
    # 1: "B." and "  B. green" (filter takes the letter), "b" (case), "(B)" (punctuation dropped);
    # 0: "B " (whitespace kept), a sentence, a lower-case label (the filter needs a capital), C
    assert [ai2d.exact_match(ai2d.filter_response(p), "B") for p in predictions] == [True] * 4 + [False] * 4
    assert ai2d.score([_mc(str(i), "B") for i in range(8)], predictions)["score"] == 50.0


def test_realworldqa_score():
    letters = ("A", "B", "C")
    samples = [Sample(id=str(i), prompt="", images=[], target="B", options=letters) for i in range(3)]
    samples += [Sample(id=str(i), prompt="", images=[], target=t) for i, t in ((3, "3"), (4, "Yes"), (5, "3"))]
    predictions = ["B", "The answer is B.", "b",  # letter gold: 1, 1, 0 (extraction is case-sensitive)
                   " 3. ", "yes.", "three"]  # other golds: 1, 1 (lower, strip, rstrip "."), 0
    assert realworldqa.score(samples, predictions) == {"score": pytest.approx(400 / 6), "correct": 4, "total": 6,
                                                       "lmms_eval": {"exact_match": 4 / 6}}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_score_needs_one_prediction_per_sample(module):
    with pytest.raises(ValueError, match=f"{module.NAME}: 1 predictions for 2 samples"):
        module.score([_mc("0", "A"), _mc("1", "A")], ["A"])


# ----------------------------------------------------------------------------- loaders
FIRST_PROMPTS = {
    "mmmu": "Which colour fills <image 1>? (item 0)\nA. red\nB. green\nC. blue\nD. yellow\n\n"
            "Answer with the option's letter from the given choices directly.",
    # lmms-eval's mathvista_testmini_cot prompt (create_one_query, shot_type "step-by-step")
    "mathvista": "Question: What colour is the image?\nChoices:\n(A) red\n(B) green\n(C) blue\n(D) yellow\n"
                 "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "scienceqa": "Context: The picture is 56 pixels wide.\nWhich colour is shown?\nA. red\nB. green\n"
                 "Answer with the option's letter from the given choices directly.",
    "mmstar": "Which colour fills the image?\nOptions: A: red, B: green, C: blue, D: yellow\n"
              "Answer with the option's letter from the given choices directly",
    "ai2d": "Which colour is the diagram?\nA. blue\nB. green\nC. red\n"
            "Answer with the option's letter from the given choices directly.",
    "realworldqa": "What colour is the image?\nA. Red\nB. Green\nC. Blue\n"
                   "Please answer directly with only the letter of the correct option and nothing else.",
}
FIRST_OPTIONS = {"mmmu": mcq.ABCD, "mathvista": mcq.ABCD, "scienceqa": ("A", "B"), "mmstar": mcq.ABCD,
                 "ai2d": ("A", "B", "C"), "realworldqa": ("A", "B", "C")}
# Where the fixtures mix question types: the row of a free-form / open question (options None).
OPEN_ROWS = {"mmmu": 1, "mathvista": 1, "realworldqa": 2}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    paths = {m.NAME: m.write_fixture(str(folder)) for m in MODULES}
    return {m.NAME: (paths[m.NAME], m.load(paths[m.NAME])) for m in MODULES}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_fixture_round_trip(module, loaded):
    path, samples = loaded[module.NAME]
    assert len(samples) == 8 and len({s.id for s in samples}) == 8
    assert samples[0].prompt == FIRST_PROMPTS[module.NAME]
    assert samples[0].options == FIRST_OPTIONS[module.NAME]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for s in samples for im in s.images)
    assert all(len(s.images) >= 1 for s in samples)
    if module.NAME in OPEN_ROWS:
        assert samples[OPEN_ROWS[module.NAME]].options is None
    assert [s.id for s in module.load(path, limit=3)] == [s.id for s in samples[:3]]
    assert module.score(samples, [s.target for s in samples])["score"] == 100.0  # the golds score 100
    assert get_benchmark(module.NAME) is module
    assert module.GROUP == ("perception" if module is realworldqa else "reasoning")


def test_mmmu_fixture_loads_the_referenced_images_in_order(loaded):
    sample = loaded["mmmu"][1][2]  # row 2 refers to <image 2> and <image 1>: image_1 then image_2
    assert "<image 2>" in sample.prompt and len(sample.images) == 2
    assert [im.size for im in sample.images] == [(48, 56), (64, 40)]


def test_scienceqa_prompt_drops_an_empty_context(loaded):
    # lmms-eval writes "Context: ...\n" only for a non-empty hint; fixture row 1 has none
    assert loaded["scienceqa"][1][1].prompt == ("Which colour is shown?\nA. red\nB. green\nC. blue\n"
                                               "Answer with the option's letter from the given choices directly.")


def test_fixtures_are_deterministic(tmp_path):
    for module in (mmmu, mathvista):
        a = module.load(module.write_fixture(str(tmp_path / "a")))
        b = module.load(module.write_fixture(str(tmp_path / "b")))
        assert [(s.prompt, s.target) for s in a] == [(s.prompt, s.target) for s in b]
        assert [im.tobytes() for s in a for im in s.images] == [im.tobytes() for s in b for im in s.images]


def _jsonl(tmp_path, rows: list[dict]) -> str:
    """rows as a jsonl file; an "image" value of IMAGE becomes the path of a small PNG."""
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({k: str(image) if v == IMAGE else v for k, v in r.items()}) + "\n"
                            for r in rows))
    return str(path)


IMAGE = "<png>"
MALFORMED = {
    # a good row, the change that breaks the second row, the error that must name it
    "mmmu": ({"id": "validation_Art_1", "question": "Q?", "options": "['x', 'y']", "answer": "A",
              "question_type": "multiple-choice"}, {"options": "['x', 'y'"}, "row 1: options .* not a Python list"),
    "mathvista": ({"pid": "1", "query": "Q?", "question": "Q?", "question_type": "free_form", "answer_type": "integer",
                   "choices": None, "precision": None, "answer": "1", "decoded_image": IMAGE},
                  {"query": None}, "row 1: column 'query' is empty"),
    "scienceqa": ({"question": "Q?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": IMAGE},
                  {"answer": 2}, "row 1: answer 2 is not an index into its 2 choices"),
    "mmstar": ({"index": 0, "question": "Q?\nOptions: A: x, B: y", "answer": "A", "category": "c",
                "l2_category": "l", "image": IMAGE}, {"answer": "AB"}, "row 1: answer 'AB' is not an option letter"),
    "ai2d": ({"question": "Q?", "options": ["x", "y"], "answer": "0", "image": IMAGE},
             {"answer": "one"}, "row 1: answer 'one' is not an index"),
    "realworldqa": ({"question": "Q?", "answer": "A", "image": IMAGE}, {"image": None},
                    "row 1: column 'image' is empty"),
}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_malformed_rows_name_the_source_and_row(module, tmp_path):
    good, change, error = MALFORMED[module.NAME]
    source = _jsonl(tmp_path, [good, {**good, **change}])
    assert len(module.load(source, limit=1)) == 1  # the good row loads
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/rows.jsonl ") + error):
        module.load(source)


def test_missing_column_is_named(tmp_path):
    source = _jsonl(tmp_path, [{"question": "Q?", "answer": "0", "image": IMAGE}])  # no "options"
    with pytest.raises(ValueError, match=r"row 0: no column 'options' .*lmms-lab/ai2d schema"):
        ai2d.load(source)
