"""ChartQA (lmms-lab/ChartQA, test, 2500 = 1250 human_test + 1250 augmented_test).

Mirrors lmms-eval `tasks/chartqa/utils.py` (QWEN3VL_REFERENCE.md §6): relaxed accuracy, i.e. a
number within 5% of a non-zero numeric target, otherwise a case-insensitive exact match. As in
lmms-eval the prediction is not stripped or cleaned: "Yes." does not match "Yes", and "12.5."
does not parse as a number (Python's `float` does accept "12." and surrounding whitespace).
Scores are in %; "score" is `relaxed_overall`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image

NAME = "chartqa"
TITLE = "ChartQA"
GROUP = "perception"
DATASET = "lmms-lab/ChartQA"
SPLIT = "test"
MAX_NEW_TOKENS = 16  # lmms-eval chartqa.yaml generation_kwargs

POST_PROMPT = "\nAnswer the question with a single word."  # chartqa.yaml default post_prompt
MAX_RELATIVE_CHANGE = 0.05
COLUMNS = ("type", "question", "answer", "image")


def features():
    """The HF schema of lmms-lab/ChartQA."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"type": text, "question": text, "answer": text, "image": datasets.Image()})


def format_prompt(question: str) -> str:
    """lmms-eval `chartqa_doc_to_text` (no stripping)."""
    return f"{question}{POST_PROMPT}"


def load(source: str, limit: int | None = None) -> list[Sample]:
    samples = []
    for i, (where, row) in enumerate(read_rows(source, SPLIT, limit, columns=COLUMNS, schema=TITLE)):
        if not isinstance(row["answer"], str) or not isinstance(row["question"], str):
            raise ValueError(f"{where}: question and answer must be strings, got "
                             f"{type(row['question']).__name__} and {type(row['answer']).__name__}")
        samples.append(Sample(id=str(i), prompt=format_prompt(row["question"]), images=[to_image(row["image"], where)],
                              target=row["answer"], meta={"type": row["type"]}))
    return samples


def _to_float(text: str) -> float | None:
    """lmms-eval `relaxed_correctness._to_float`: "x%" is x / 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """lmms-eval `relaxed_correctness` (from Qwen-VL `evaluate_vqa.py`). A zero target falls
    through to the string comparison, as a relative change to 0 is undefined."""
    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(TITLE, samples, predictions, allow_empty=False)
    right = [float(relaxed_correctness(p, s.target)) for s, p in zip(samples, predictions)]
    # lmms-eval `chartqa_process_results`: anything that is not human_test is the augmented split.
    human = [r for s, r in zip(samples, right) if s.meta["type"] == "human_test"]
    augmented = [r for s, r in zip(samples, right) if s.meta["type"] != "human_test"]
    out = {"score": percent(sum(right), len(right))}
    out["relaxed_overall"] = out["score"]
    lmms = {"relaxed_overall": sum(right) / len(right)}  # lmms-eval's `mean`, a fraction
    if human:  # a split with no samples has no score (lmms-eval leaves it out too)
        out["relaxed_human_split"] = percent(sum(human), len(human))
        lmms["relaxed_human_split"] = sum(human) / len(human)
    if augmented:
        out["relaxed_augmented_split"] = percent(sum(augmented), len(augmented))
        lmms["relaxed_augmented_split"] = sum(augmented) / len(augmented)
    out["lmms_eval"] = lmms
    return out


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """`num` questions alternating human_test / augmented_test, with numeric, percentage and word answers."""
    import datasets

    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(num):
        h, w = int(rng.integers(32, 65)), int(rng.integers(32, 65))
        kind = i % 3
        if kind == 0:
            question, answer = f"What is the value of bar {i}?", str(int(rng.integers(1, 100)))
        elif kind == 1:
            question, answer = f"What share does segment {i} have?", f"{int(rng.integers(1, 100))}%"
        else:
            question, answer = f"Which color is series {i}?", str(rng.choice(["Blue", "Red", "Green"]))
        cols["type"].append("human_test" if i % 2 == 0 else "augmented_test")
        cols["question"].append(question)
        cols["answer"].append(answer)
        cols["image"].append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "chartqa_test.parquet")
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path
