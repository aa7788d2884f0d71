"""MMMU (validation, 900 questions): college-level multi-discipline questions over 1-7 images.

Mirrors lmms-eval `tasks/mmmu/utils.py` (task `mmmu_val`), whose scoring helpers come from
the official MMMU `eval/eval_utils.py`:
- prompt: `construct_prompt` with the default prompts; `<image k>` references stay in the
  text and the referenced `image_k` columns, sorted, are the sample's images;
- multiple choice: `parse_mmmu_multi_choice_response` (mcq.py), exact letter match;
- open: `parse_open_response` (key-phrase splitting + number extraction) and `eval_open`;
- metric: instance-level accuracy over all subjects (`mmmu_acc`), in %.
"""

from __future__ import annotations

import ast
import random
import re

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.evaluation.benchmarks import mcq

NAME = "mmmu"
TITLE = "MMMU"
GROUP = "reasoning"
DATASET = "lmms-lab/MMMU"
SPLIT = "validation"
MAX_NEW_TOKENS = 16  # mmmu_val.yaml generation_kwargs

MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_ENDED_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "multiple-choice"


# ----------------------------------------------------------------------------- loading
def parse_options(text: str, where: str) -> list[str]:
    """The `options` cell is a *string* repr of a list in the HF data (lmms-eval: ast.literal_eval)."""
    try:
        options = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: options {text!r} is not a Python list literal ({e})") from None
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: options {text!r} must be a list of strings")
    return options


def build_prompt(question: str, options: list[str] | None) -> str:
    """lmms-eval `construct_prompt` with `MULTI_CHOICE_PROMPT` / `OPEN_ENDED_PROMPT`."""
    if options is not None:
        return f"{question}\n{mcq.format_options(options)}\n\n{MULTI_CHOICE_PROMPT}"
    return f"{question}\n\n{OPEN_ENDED_PROMPT}"


def _images(row: dict, prompt: str, where: str) -> list:
    """lmms-eval `mmmu_doc_to_visual`: the distinct `<image k>` references, sorted by name."""
    columns = sorted({ref.strip("<>").replace(" ", "_") for ref in re.findall(r"<image \d+>", prompt)})
    return [to_image(mcq.field(row, c, where, DATASET), f"{where} {c}") for c in columns]


def _sample(row: dict, where: str) -> Sample:
    question = mcq.field(row, "question", where, DATASET)
    kind = mcq.field(row, "question_type", where, DATASET)
    answer = str(mcq.field(row, "answer", where, DATASET)).strip()
    options = parse_options(mcq.field(row, "options", where, DATASET), where) if kind == MULTIPLE_CHOICE else None
    letters = mcq.letters_for(options, where) if options is not None else None
    prompt = build_prompt(question, options)
    if letters is not None and answer not in letters:
        raise ValueError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    return Sample(id=str(mcq.field(row, "id", where, DATASET)), prompt=prompt, images=_images(row, prompt, where),
                  target=answer, options=letters,
                  meta={"question_type": kind, "index2ans": dict(zip(letters, options)) if letters else None})


def load(source: str, limit: int | None = None) -> list[Sample]:
    return [_sample(row, where) for where, row in read_rows(source, SPLIT, limit)]


# ----------------------------------------------------------------------------- open questions
def extract_numbers(text: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation, and plain (MMMU `extract_numbers`)."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def normalize_str(text: str) -> list:
    """MMMU `normalize_str`: a number becomes [float rounded to 2 places]; other text is
    lower-cased, and a single character becomes [" x", "x "] to avoid trivial matches."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def _key_subresponses(response: str) -> list[str]:
    """Per sentence/line, the shortest tail after a key phrase ("is ", "so ", ...; "=" too in
    the last one); the whole lower-cased response when no sentence has one."""
    response = response.strip().strip(".").lower()
    # The original splits on r"\.\s(?=[A-Z])" *after* lower-casing, so only newlines split.
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = ""
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    """MMMU `parse_open_response`: the key sub-responses and the numbers in them, normalised."""
    keys = _key_subresponses(response)
    candidates = keys + [n for key in keys for n in extract_numbers(key)]
    normalised = [v for c in candidates for v in normalize_str(c)]
    return list(dict.fromkeys(normalised))  # the original dedups with set(); order is irrelevant


def eval_open(gold: str, parsed: list) -> bool:
    """MMMU `eval_open`: a text prediction must contain a normalised gold string, a number
    must equal a normalised gold number."""
    golds = normalize_str(gold)
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# ----------------------------------------------------------------------------- scoring
def score(samples: list[Sample], predictions: list[str], seed: int = 0) -> dict:
    """Instance-level accuracy (%). The random fallback of the multiple-choice parser draws
    from a `random.Random` seeded with (seed, sample id): the same prediction always gets the
    same letter, whatever else is scored with it."""
    check_predictions(NAME, samples, predictions)
    hits = {MULTIPLE_CHOICE: 0, "open": 0}
    counts = {MULTIPLE_CHOICE: 0, "open": 0}
    for sample, prediction in zip(samples, predictions):
        kind = MULTIPLE_CHOICE if sample.options else "open"
        if sample.options:
            rng = random.Random(f"{seed}:{sample.id}")
            parsed = mcq.parse_mmmu_multi_choice_response(prediction, sample.options, sample.meta["index2ans"], rng)
            correct = parsed == sample.target
        else:
            correct = eval_open(sample.target, parse_open_response(prediction))
        hits[kind] += int(correct)
        counts[kind] += 1
    total = sum(hits.values())
    return {"score": percent(total, len(samples)), "correct": total, "total": len(samples),
            "multiple_choice": percent(hits[MULTIPLE_CHOICE], counts[MULTIPLE_CHOICE]),
            "open": percent(hits["open"], counts["open"])}


# ----------------------------------------------------------------------------- fixture
def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """Alternating multiple-choice questions (the colour of an image; every fourth row has two
    images and asks about the second) and open ones (a number), in the lmms-lab/MMMU schema."""
    import datasets

    rng = random.Random(seed)
    colours = ("red", "green", "blue", "yellow")
    cols: dict[str, list] = {k: [] for k in ("id", "question", "options", "explanation", "img_type", "answer",
                                             "topic_difficulty", "question_type", "subfield")}
    cols.update({f"image_{k}": [] for k in range(1, 8)})
    for i in range(num):
        colour, image = mcq.fixture_image(rng, colours)
        images = [image]
        if i % 2 == 1:
            question, options, answer, kind = f"How many colours does <image 1> show? (item {i})", "[]", "1", "open"
        else:
            question = f"Which colour fills <image 1>? (item {i})"
            if i % 4 == 2:
                colour, image = mcq.fixture_image(rng, colours)
                images.append(image)
                question = f"Which colour fills <image 2>, the image after <image 1>? (item {i})"
            options, answer, kind = str(list(colours)), "ABCD"[colours.index(colour)], MULTIPLE_CHOICE
        row = {"id": f"validation_Art_{i + 1}", "question": question, "options": options, "explanation": "",
               "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy", "question_type": kind,
               "subfield": "Colour"}
        row.update({f"image_{k}": images[k - 1] if k <= len(images) else None for k in range(1, 8)})
        for key, value in row.items():
            cols[key].append(value)
    features = {k: datasets.Value("string") for k in cols}
    features.update({f"image_{k}": datasets.Image() for k in range(1, 8)})
    return mcq.write_parquet(cols, features, folder, NAME)
