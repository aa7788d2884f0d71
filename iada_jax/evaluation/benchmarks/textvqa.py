"""TextVQA (lmms-lab/textvqa, validation, 5000): reading text in natural images, 10 answers each.

Mirrors lmms-eval `tasks/textvqa/utils.py` and `_task_utils/vqa_eval_metric.py`
(QWEN3VL_REFERENCE.md §6): the prediction and every gold answer go through EvalAI's answer
normalisation (`EvalAIAnswerProcessor`, ported below with its tables and quirks), then the VQA
accuracy averages, over the 10 leave-one-out subsets of 9 answers, min(1, matches / 3).
"score" is the mean accuracy in % (lmms-eval's `exact_match`).
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image

NAME = "textvqa"
TITLE = "TextVQA"
GROUP = "perception"
DATASET = "lmms-lab/textvqa"
SPLIT = "validation"
MAX_NEW_TOKENS = 128  # textvqa.yaml sets none; lmms-eval's qwen3_vl default

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # default post_prompt, ocr: false
COLUMNS = ("image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
           "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens")

# ---------------------------------------------------------------- EvalAIAnswerProcessor tables
# Copied key for key from lmms-eval `EvalAIAnswerProcessor` (itself from mmf/EvalAI), quirks
# kept: the capitalised keys ("Im", "Ive", ...) never match lower-cased text, and
# "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# "(?!<=\d)" is EvalAI's typo for a lookbehind: as written it is a no-op lookahead, so every
# period not followed by a digit goes ("3.5" keeps its point, "5." and "a.b" lose theirs).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
# EvalAI calls `PERIOD_STRIP.sub("", text, re.UNICODE)`: the flag lands in the `count` slot, so
# at most re.UNICODE (= 32) periods are removed. Kept for parity; no real answer has that many.
_PERIOD_COUNT = int(re.UNICODE)


def _word_tokenize(word: str) -> str:
    """Step 1: lower-case; drop "," and "?"; split off "'s"."""
    return word.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _process_punctuation(in_text: str) -> str:
    """Steps 2-3: a mark touching a space (or any text with digit commas) is removed, otherwise
    replaced by a space; then periods that are not decimal points are removed. The tests look
    at the input text, the replacements apply to the running output, as in EvalAI."""
    out_text = in_text
    for p in PUNCTUATIONS:
        if (p + " " in in_text or " " + p in in_text) or COMMA_STRIP.search(in_text) is not None:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return PERIOD_STRIP.sub("", out_text, count=_PERIOD_COUNT)


def _process_digit_article(in_text: str) -> str:
    """Steps 4-6: number words to digits, drop articles, then restore contractions."""
    words = [NUMBER_MAP.get(w, w) for w in in_text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """lmms-eval `EvalAIAnswerProcessor.__call__`."""
    answer = _word_tokenize(answer).replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """lmms-eval `textvqa_process_results`: mean over i of min(1, #{j != i : gt_j == pred} / 3)."""
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    accs = [min(1.0, sum(g == pred for j, g in enumerate(golds) if j != i) / 3) for i in range(len(golds))]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------- the benchmark interface
def features():
    """The HF schema of lmms-lab/textvqa (its dataset card's `dataset_info`)."""
    import datasets

    text, words, i32 = datasets.Value("string"), datasets.List(datasets.Value("string")), datasets.Value("int32")
    return datasets.Features({
        "image_id": text, "question_id": i32, "question": text, "question_tokens": words, "image": datasets.Image(),
        "image_width": i32, "image_height": i32, "flickr_original_url": text, "flickr_300k_url": text,
        "answers": words, "image_classes": words, "set_name": text, "ocr_tokens": words,
    })


def format_prompt(question: str) -> str:
    """lmms-eval `textvqa_doc_to_text`: `str.capitalize()` also lower-cases the rest of the question."""
    return f"{question.capitalize()}{POST_PROMPT}"


def load(source: str, limit: int | None = None) -> list[Sample]:
    required = ("question_id", "question", "image", "answers")  # what the prompt and the score need
    samples = []
    for where, row in read_rows(source, SPLIT, limit, columns=required, schema=TITLE):
        answers = row["answers"]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: answers must be a non-empty list of strings, got {answers!r}")
        samples.append(Sample(id=str(row["question_id"]), prompt=format_prompt(row["question"]),
                              images=[to_image(row["image"], where)], target=list(answers),
                              meta={"question_id": row["question_id"]}))
    return samples


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(TITLE, samples, predictions, allow_empty=False)
    accs = [vqa_accuracy(p, s.target) for s, p in zip(samples, predictions)]
    accuracy = percent(sum(accs), len(accs))
    return {"score": accuracy, "exact_match": accuracy, "lmms_eval": {"exact_match": sum(accs) / len(accs)}}


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """`num` questions with 10 answers each (a majority answer plus noise, as annotators give)."""
    import datasets

    rng = np.random.default_rng(seed)
    words = ("stop", "coca cola", "exit", "12", "yes", "main street", "open", "pepsi")
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(num):
        h, w = int(rng.integers(32, 65)), int(rng.integers(32, 65))
        main, other = rng.choice(words, size=2, replace=False)
        agree = int(rng.integers(4, 11))
        question = f"what is written on the sign by the ATM {i}?"  # real questions are lower-case, acronyms kept
        cols["image_id"].append(f"{int(rng.integers(1 << 40)):016x}")
        cols["question_id"].append(i)
        cols["question"].append(question)
        cols["question_tokens"].append(question.rstrip("?").split())
        cols["image"].append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        cols["image_width"].append(w)
        cols["image_height"].append(h)
        cols["flickr_original_url"].append(f"https://farm1.staticflickr.com/{i}/{i}_o.jpg")
        cols["flickr_300k_url"].append(f"https://c1.staticflickr.com/1/{i}/{i}_z.jpg")
        cols["answers"].append([str(main)] * agree + [str(other)] * (10 - agree))
        cols["image_classes"].append(["Billboard", "Street sign"])
        cols["set_name"].append("val")
        cols["ocr_tokens"].append(str(main).split())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "textvqa_validation.parquet")
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path
