"""POPE (lmms-lab/POPE, test, 9000 = 3 x 3000): object-hallucination yes/no questions.

Mirrors lmms-eval `tasks/pope/utils.py` (QWEN3VL_REFERENCE.md §6): a prediction is right only if
`pred.lower().strip() == gt`, so "Yes." is wrong. Precision, recall and F1 take "yes" as the
positive class; the yes ratio is that of the ground truth.

Which POPE number the paper's Table 1 shows is not recorded in the reference notes (lmms-eval
reports all five metrics, listing accuracy first; VLMEvalKit's "Overall" is F1). We report
accuracy as "score" (HEADLINE below, one line to change) and every metric besides it, overall
and per category. All metrics are in % (lmms-eval returns fractions).
"""

from __future__ import annotations

import collections
import os

import numpy as np
from PIL import Image

from iada_jax.evaluation.benchmark import Sample, check_predictions, read_rows, to_image

NAME = "pope"
TITLE = "POPE"
GROUP = "perception"
DATASET = "lmms-lab/POPE"
SPLIT = "test"
MAX_NEW_TOKENS = 128  # lmms-eval pope.yaml generation_kwargs

HEADLINE = "accuracy"  # the metric reported as Table 1's "score" (see the module docstring)
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # pope.yaml default post_prompt
# The gold answers are lower-case "yes" / "no"; a log-likelihood scorer's chosen option is scored
# as the prediction, and "Yes".lower().strip() == "yes", so the capitalised forms (what the model
# would write first) score correctly under the strict rule.
OPTIONS = ("Yes", "No")
CATEGORIES = ("adversarial", "popular", "random")
COLUMNS = ("id", "question_id", "question", "answer", "image_source", "image", "category")


def features():
    """The HF schema of lmms-lab/POPE (its dataset card's `dataset_info`)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"id": text, "question_id": text, "question": text, "answer": text, "image_source": text,
                              "image": datasets.Image(), "category": text})


def format_prompt(question: str) -> str:
    """lmms-eval `pope_doc_to_text`."""
    return f"{question.strip()}{POST_PROMPT}"


def load(source: str, limit: int | None = None) -> list[Sample]:
    samples = []
    for where, row in read_rows(source, SPLIT, limit, columns=COLUMNS, schema=TITLE):
        gold = (row["answer"] or "").lower().strip()
        if gold not in ("yes", "no"):  # lmms-eval asserts this
            raise ValueError(f"{where}: answer {row['answer']!r} is not yes/no")
        samples.append(Sample(id=str(row["id"]), prompt=format_prompt(row["question"]),
                              images=[to_image(row["image"], where)], target=gold, options=OPTIONS,
                              meta={"question_id": row["question_id"], "category": row["category"]}))
    return samples


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0  # lmms-eval returns 0 for an empty denominator


def metrics(preds: list[str], golds: list[str]) -> dict[str, float]:
    """lmms-eval `pope_aggregate_{accuracy,precision,recall,f1_score,yes_ratio}`, in %."""
    return {k.removeprefix("pope_").replace("f1_score", "f1"): 100.0 * v for k, v in fractions(preds, golds).items()}


def fractions(preds: list[str], golds: list[str]) -> dict[str, float]:
    """lmms-eval's five POPE metrics, as its aggregations return them (fractions).

    `preds` are already `.lower().strip()`-ed. As in lmms-eval, a false negative is a gold "yes"
    predicted exactly "no": a gold "yes" answered "yes." is wrong for accuracy but counts in
    neither recall term."""
    pairs = list(zip(preds, golds))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    yes = sum(g == "yes" for g in golds)
    return {
        "pope_accuracy": sum(float(p == g) for p, g in pairs) / len(pairs),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": f1,
        "pope_yes_ratio": _ratio(yes, yes + sum(g == "no" for g in golds)),
    }


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(TITLE, samples, predictions, allow_empty=False)
    preds = [p.lower().strip() for p in predictions]  # lmms-eval `pope_process_results`
    golds = [s.target.lower().strip() for s in samples]
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.meta["category"]].append(i)
    overall = metrics(preds, golds)
    per_category = {c: metrics([preds[i] for i in idx], [golds[i] for i in idx]) for c, idx in sorted(groups.items())}
    return {"score": overall[HEADLINE], **overall, "per_category": per_category, "lmms_eval": fractions(preds, golds)}


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """`num` questions cycling through the three categories, alternating yes / no."""
    import datasets

    rng = np.random.default_rng(seed)
    things = ("dog", "person", "chair", "car", "bottle", "cup")
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(num):
        size = int(rng.integers(32, 65))
        cols["id"].append(str(i))
        cols["question_id"].append(str(i // len(CATEGORIES) + 1))  # POPE numbers questions per category
        cols["question"].append(f"Is there a {things[int(rng.integers(len(things)))]} in the image?")
        cols["answer"].append("yes" if i % 2 == 0 else "no")
        cols["image_source"].append(f"COCO_val2014_{int(rng.integers(1, 600000)):012d}")
        cols["image"].append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        cols["category"].append(CATEGORIES[i % len(CATEGORIES)])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "pope_test.parquet")
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path
