"""ScienceQA-IMG (test, 2017 questions): grade-school science questions with an image.

Mirrors lmms-eval `tasks/scienceqa/` (`scienceqa_img.yaml`, `utils.py`):
- prompt (`sqa_doc_to_text`, format "default"): "Context: {hint}\\n" when the hint is not
  empty, the question, "A. ..." lines, then the letter instruction;
- scoring (`sqa_process_results`, "how llava parses it"): correct when the stripped,
  lower-cased prediction is the letter, or the prediction starts with a capital and a period
  ("A. foo") and that capital is the letter. "(A)" and "The answer is A" score 0;
- metric: the mean, in %.
"""

from __future__ import annotations

import random

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.evaluation.benchmarks import mcq

NAME = "scienceqa"
TITLE = "ScienceQA"
GROUP = "reasoning"
DATASET = "lmms-lab/ScienceQA"  # config "ScienceQA-IMG"
CONFIG = "ScienceQA-IMG"
SPLIT = "test"
MAX_NEW_TOKENS = 16  # scienceqa_img.yaml generation_kwargs

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def build_prompt(hint: str, question: str, choices: list[str]) -> str:
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{question}\n{mcq.format_options(choices)}{POST_PROMPT}"


def _sample(row: dict, where: str, index: int) -> Sample:
    choices = list(mcq.field(row, "choices", where, DATASET))
    answer = mcq.field(row, "answer", where, DATASET)
    letters = mcq.letters_for(choices, where)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")
    image = mcq.field(row, "image", where, DATASET, required=False)  # lmms-eval allows rows without one
    return Sample(id=f"{NAME}-{index}",
                  prompt=build_prompt(mcq.field(row, "hint", where, DATASET, required=False) or "",
                                      mcq.field(row, "question", where, DATASET), choices),
                  images=[] if image is None else [to_image(image, f"{where} image")],
                  target=letters[answer], options=letters,
                  meta={"subject": row.get("subject"), "grade": row.get("grade")})


def load(source: str, limit: int | None = None) -> list[Sample]:
    """`source` is a file/folder holding the ScienceQA-IMG config, or a data set name, whose
    ScienceQA-IMG config is then loaded."""
    rows = read_rows(source, SPLIT, limit, config=CONFIG)
    return [_sample(row, where, i) for i, (where, row) in enumerate(rows)]


def is_correct(prediction: str, letter: str) -> bool:
    """lmms-eval `sqa_process_results` (with the case-insensitive, stripped equality)."""
    if prediction.strip().lower() == letter.lower():
        return True
    return len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == "." and prediction[0] == letter


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(NAME, samples, predictions)
    hits = sum(is_correct(p, s.target) for s, p in zip(samples, predictions))
    return {"score": percent(hits, len(samples)), "correct": hits, "total": len(samples),
            "lmms_eval": {"exact_match": hits / len(samples) if samples else 0.0}}  # its `mean`


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """Colour questions with 2 to 4 choices, every other one with a hint, in the
    lmms-lab/ScienceQA (ScienceQA-IMG) schema."""
    import datasets

    rng = random.Random(seed)
    keys = ("image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
            "skill", "lecture", "solution")
    cols: dict[str, list] = {k: [] for k in keys}
    for i in range(num):
        choices = ["red", "green", "blue", "yellow"][: 2 + i % 3]
        colour, image = mcq.fixture_image(rng, choices)
        row = {"image": image, "question": "Which colour is shown?", "choices": choices,
               "answer": choices.index(colour), "hint": "" if i % 2 else f"The picture is {image.width} pixels wide.",
               "task": "closed choice", "grade": f"grade{1 + i % 6}", "subject": "natural science",
               "topic": "colours", "category": "Colour", "skill": "Identify colours", "lecture": "",
               "solution": f"The image is {colour}."}
        for key, value in row.items():
            cols[key].append(value)
    features = {k: datasets.Value("string") for k in keys}
    features.update(image=datasets.Image(), choices=datasets.Sequence(datasets.Value("string")),
                    answer=datasets.Value("int8"))
    return mcq.write_parquet(cols, features, folder, NAME)
