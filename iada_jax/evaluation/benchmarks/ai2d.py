"""AI2D (test, 3088 questions): multiple choice over grade-school science diagrams.

Mirrors lmms-eval `tasks/ai2d/` (`ai2d.yaml`, `utils.py`, prompt format "mcq"):
- prompt: the question, "A. ..." lines, then the letter instruction;
- target: the letter of `options[int(answer)]` (`answer` is a string index);
- extraction: the filter `^\\s*([A-Z])\\.` takes the letter, otherwise the raw response;
- metric: `exact_match` ignoring case and punctuation (lmms-eval `exact_match_hf_evaluate`:
  lower-case, delete `string.punctuation`, then plain equality; whitespace is kept), in %.
"""

from __future__ import annotations

import random
import re
import string

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.evaluation.benchmarks import mcq

NAME = "ai2d"
TITLE = "AI2D"
GROUP = "reasoning"
DATASET = "lmms-lab/ai2d"
SPLIT = "test"
MAX_NEW_TOKENS = 16  # ai2d.yaml generation_kwargs

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def build_prompt(question: str, options: list[str]) -> str:
    return f"{question}\n{mcq.format_options(options)}{POST_PROMPT}"


def _sample(row: dict, where: str, index: int) -> Sample:
    options = list(mcq.field(row, "options", where, DATASET))
    answer = mcq.field(row, "answer", where, DATASET)
    letters = mcq.letters_for(options, where)
    position = int(answer) if str(answer).strip().isdigit() else -1  # a string index, e.g. "2"
    if not 0 <= position < len(options):
        raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(options)} options")
    return Sample(id=f"{NAME}-{index}", prompt=build_prompt(mcq.field(row, "question", where, DATASET), options),
                  images=[to_image(mcq.field(row, "image", where, DATASET), f"{where} image")],
                  target=letters[position], options=letters)


def load(source: str, limit: int | None = None) -> list[Sample]:
    return [_sample(row, where, i) for i, (where, row) in enumerate(read_rows(source, SPLIT, limit))]


def filter_response(response: str) -> str:
    """The letter of a leading "A." label, else the response unchanged."""
    match = _LEADING_LETTER.match(response)
    return match.group(1) if match else response


def exact_match(prediction: str, reference: str) -> bool:
    """`exact_match` with ignore_case and ignore_punctuation."""
    return prediction.lower().translate(_NO_PUNCTUATION) == reference.lower().translate(_NO_PUNCTUATION)


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(NAME, samples, predictions)
    hits = sum(exact_match(filter_response(p), s.target) for s, p in zip(samples, predictions))
    return {"score": percent(hits, len(samples)), "correct": hits, "total": len(samples),
            "lmms_eval": {"exact_match": hits / len(samples) if samples else 0.0}}  # its `mean`


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """Colour questions with 3 or 4 options, in the lmms-lab/ai2d schema."""
    import datasets

    rng = random.Random(seed)
    cols: dict[str, list] = {"question": [], "options": [], "answer": [], "image": []}
    for i in range(num):
        options = ["blue", "green", "red", "yellow"][: 3 + i % 2]
        colour, image = mcq.fixture_image(rng, options)
        for key, value in (("question", "Which colour is the diagram?"), ("options", options),
                           ("answer", str(options.index(colour))), ("image", image)):
            cols[key].append(value)
    features = {"question": datasets.Value("string"), "options": datasets.Sequence(datasets.Value("string")),
                "answer": datasets.Value("string"), "image": datasets.Image()}
    return mcq.write_parquet(cols, features, folder, NAME)
