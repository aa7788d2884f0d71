"""RealWorldQA (test, 765 questions): real-world spatial understanding, mostly from car cameras.

Mirrors lmms-eval `tasks/realworldqa/` (default prompt kwargs):
- prompt: the question, stripped; it already holds the options ("A. ...") and the
  instruction, or a short-answer instruction for the free-form questions;
- scoring (lmms-eval 0.7.3 `realworldqa_process_results`): a gold letter A-D (any case) ->
  `extract_mcq_answer` (mcq.py) over the letters A-D, whatever options the question offers,
  must give it (before April 2026 it was exact lower-case equality); any other gold ->
  `pred.lower().strip().rstrip(".") == gold.lower()`;
- metric: the mean, in %.
"""

from __future__ import annotations

import random

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.evaluation.benchmarks import mcq

NAME = "realworldqa"
TITLE = "RealWorldQA"
GROUP = "perception"
DATASET = "lmms-lab/RealWorldQA"
SPLIT = "test"
MAX_NEW_TOKENS = 16  # realworldqa.yaml generation_kwargs

MCQ_INSTRUCTION = "Please answer directly with only the letter of the correct option and nothing else."
_OPTION_LABEL = r"^([A-Z])\.\s"  # one "A. text" line per option


def _sample(row: dict, where: str, index: int) -> Sample:
    question = mcq.field(row, "question", where, DATASET).strip()
    answer = str(mcq.field(row, "answer", where, DATASET)).strip()
    letters = mcq.embedded_letters(question, _OPTION_LABEL) or None
    if letters is None and answer in mcq.ABCD:
        letters = mcq.ABCD  # a letter gold always has options, even written another way
    return Sample(id=f"{NAME}-{index}", prompt=question,
                  images=[to_image(mcq.field(row, "image", where, DATASET), f"{where} image")],
                  target=answer, options=letters)


def load(source: str, limit: int | None = None) -> list[Sample]:
    return [_sample(row, where, i) for i, (where, row) in enumerate(read_rows(source, SPLIT, limit))]


def is_correct(prediction: str, gold: str, letters: tuple[str, ...] | None = None) -> bool:
    """lmms-eval 0.7.3 `realworldqa_process_results`: a gold letter A-D (any case) is compared
    with the letter `extract_mcq_answer` finds among A-D, whatever options the question offers
    (`letters` serve the log-likelihood mode only); anything else exactly, lower-cased."""
    if gold.upper() in mcq.ABCD:
        return mcq.extract_mcq_answer(prediction, mcq.ABCD) == gold.upper()
    return prediction.lower().strip().rstrip(".") == gold.lower()


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(NAME, samples, predictions)
    hits = sum(is_correct(p, s.target, s.options) for s, p in zip(samples, predictions))
    return {"score": percent(hits, len(samples)), "correct": hits, "total": len(samples),
            "lmms_eval": {"exact_match": hits / len(samples) if samples else 0.0}}  # its `mean`


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """Colour questions with three lettered options, and every third a free-form count, in
    the lmms-lab/RealWorldQA schema."""
    import datasets

    rng = random.Random(seed)
    colours = ["red", "green", "blue"]
    cols: dict[str, list] = {"image": [], "question": [], "answer": []}
    for i in range(num):
        colour, image = mcq.fixture_image(rng, colours)
        if i % 3 == 2:
            question = "How many colours does the image show? Please answer directly with a single word or number."
            answer = "1"
        else:
            options = "\n".join(f"{letter}. {c.capitalize()}" for letter, c in zip("ABC", colours))
            question, answer = f"What colour is the image?\n{options}\n{MCQ_INSTRUCTION}", "ABC"[colours.index(colour)]
        for key, value in (("image", image), ("question", question), ("answer", answer)):
            cols[key].append(value)
    features = {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    return mcq.write_parquet(cols, features, folder, NAME)
