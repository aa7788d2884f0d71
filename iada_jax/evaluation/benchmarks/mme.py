"""MME (lmms-lab/MME, test, 2374 questions): yes/no questions in pairs, one pair per image.

Mirrors lmms-eval `tasks/mme/utils.py` (QWEN3VL_REFERENCE.md §6): the answer is extracted with
`parse_pred_ans`; a category scores acc + acc+ (max 200), where acc is the % of questions right
and acc+ the % of images with both questions right; perception sums the 10 perception
categories (max 2000), cognition the 4 cognition ones (max 800).

The Table 1 number is the OpenVLM leaderboard's normalisation, (perception + cognition) / 28:
a percentage of the 2800 maximum (VLMEvalKit `gen_table.py` `BUILD_L1_DF`). A run that covers
only some categories (a fixture, `limit`) is scored as a percentage of its own maximum,
200 x categories present, and says how many categories it covered ("categories").
"""

from __future__ import annotations

import collections
import os

import numpy as np
from PIL import Image

from iada_jax.evaluation.benchmark import Sample, check_predictions, read_rows, to_image

NAME = "mme"
TITLE = "MME"
GROUP = "perception"
DATASET = "lmms-lab/MME"
SPLIT = "test"
MAX_NEW_TOKENS = 16  # lmms-eval mme.yaml generation_kwargs

# lmms-eval `eval_type_dict`: the category names exactly as the data set spells them.
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORY_MAX = 200.0  # acc (100) + acc+ (100)
FULL_MAX = CATEGORY_MAX * (len(PERCEPTION) + len(COGNITION))  # 2800: the leaderboard's "/ 28" is "/ 2800 * 100"

# lmms-eval `mme_doc_to_text` with the default post_prompt (qwen3_vl has no MME-specific one):
# the data set's own instruction is removed and the short-answer instruction appended.
REPLACE_PROMPT = " Please answer yes or no."
POST_PROMPT = "\nAnswer the question using a single word or phrase."
# A log-likelihood scorer picks one of these; `parse_pred_ans` maps them to "yes" / "no".
OPTIONS = ("Yes", "No")
COLUMNS = ("question_id", "image", "question", "answer", "category")


def features():
    """The HF schema of lmms-lab/MME (its dataset card's `dataset_info`)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"question_id": text, "image": datasets.Image(), "question": text, "answer": text,
                              "category": text})


def format_prompt(question: str) -> str:
    """lmms-eval `mme_doc_to_text`."""
    return question.strip().replace(REPLACE_PROMPT, "") + POST_PROMPT


def _gold(answer: str) -> str:
    """lmms-eval `mme_process_results`'s normalisation of the gold answer."""
    return answer.lower().strip().replace(".", "")


def load(source: str, limit: int | None = None) -> list[Sample]:
    samples, seen = [], collections.Counter()
    for where, row in read_rows(source, SPLIT, limit, columns=COLUMNS, schema=TITLE):
        if _gold(row["answer"] or "") not in ("yes", "no"):
            raise ValueError(f"{where}: answer {row['answer']!r} is not Yes/No")
        if row["category"] not in PERCEPTION + COGNITION:
            raise ValueError(f"{where}: unknown category {row['category']!r}; MME has {list(PERCEPTION + COGNITION)}")
        qid = row["question_id"]
        samples.append(Sample(id=f"{qid}#{seen[qid]}", prompt=format_prompt(row["question"]),
                              images=[to_image(row["image"], where)], target=row["answer"], options=OPTIONS,
                              meta={"question_id": qid, "category": row["category"]}))
        seen[qid] += 1  # the two questions of an image share its question_id
    return samples


def parse_pred_ans(pred: str) -> str:
    """lmms-eval `parse_pred_ans` (from Otter): "yes", "no" or "other"."""
    pred = pred.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    prefix = pred[:4]  # "Yes, it is" counts as yes; so does "Not sure" as no (lmms-eval's rule)
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _image_scores(correct: list[float]) -> tuple[float, float]:
    """(acc, acc+) of one image's questions, in %; lmms-eval `mme_aggregate_results` per question_id.

    lmms-eval asserts exactly 2 questions per image. A `limit` can cut a pair in half; such an
    image still counts (acc over its questions, acc+ = all of them right) and is reported as
    "unpaired" so the number is not mistaken for a full-set score."""
    return sum(correct) / len(correct) * 100.0, float(all(correct)) * 100.0


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(TITLE, samples, predictions, allow_empty=False)
    by_category: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for s, p in zip(samples, predictions):
        right = float(parse_pred_ans(p) == _gold(s.target))
        by_category[s.meta["category"]][s.meta["question_id"]].append(right)

    per_category, unpaired = {}, 0
    for cat, images in by_category.items():
        accs = [_image_scores(c) for c in images.values()]
        unpaired += sum(len(c) != 2 for c in images.values())
        acc = sum(a for a, _ in accs) / len(accs)
        acc_plus = sum(b for _, b in accs) / len(accs)
        per_category[cat] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus}

    perception = sum(v["score"] for c, v in per_category.items() if c in PERCEPTION)
    cognition = sum(v["score"] for c, v in per_category.items() if c in COGNITION)
    present_max = CATEGORY_MAX * len(per_category)  # FULL_MAX (2800) on the full set
    return {
        "score": (perception + cognition) / present_max * 100.0,
        # lmms-eval's two headlines (`mme_aggregate_results`): the sums of the category scores.
        "lmms_eval": {"mme_perception_score": perception, "mme_cognition_score": cognition},
        "perception": perception,
        "cognition": cognition,
        "categories": len(per_category),
        "max_total": present_max,
        "unpaired": unpaired,
        "per_category": dict(sorted(per_category.items())),
    }


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """`num` questions (num / 2 images, a Yes and a No question each, as in MME), spread over
    perception and cognition categories."""
    import datasets

    if num < 2 or num % 2:
        raise ValueError(f"MME fixture: num must be an even number >= 2 (questions come in pairs), got {num}")
    rng = np.random.default_rng(seed)
    cats = ("existence", "commonsense_reasoning", "count", "code_reasoning")
    things = ("dog", "cat", "car", "tree", "clock", "boat")
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for k in range(num // 2):
        cat, size = cats[k % len(cats)], int(rng.integers(32, 65))
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        yes, no = rng.choice(things, size=2, replace=False)
        for thing, answer in ((yes, "Yes"), (no, "No")):
            cols["question_id"].append(f"{cat}/{k:04d}.png")
            cols["image"].append(image)
            cols["question"].append(f"Is there a {thing} in this image?{REPLACE_PROMPT}")
            cols["answer"].append(answer)
            cols["category"].append(cat)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "mme_test.parquet")
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path
