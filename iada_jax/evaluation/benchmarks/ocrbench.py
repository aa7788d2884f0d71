"""OCRBench (echo840/OCRBench, test, 1000): text recognition, text VQA, KIE, handwritten math.

Mirrors lmms-eval `tasks/ocrbench/utils.py` and the official OCRBench scorer
(QWEN3VL_REFERENCE.md §6): a sample is a hit when any gold answer is a substring of the
normalised prediction.
- HME100k (math expressions): spaces and newlines removed from both, case kept. The official
  scorer and VLMEvalKit keep case; lmms-eval lower-cases the prediction first, so an answer
  with a capital letter can never hit there. We follow the reference notes (case kept).
- everything else: lower-case, full-width ASCII folded to half-width, "\\n" -> " ", strip. The
  folding follows the reference notes; the lmms-eval and official versions we could read do
  not fold, which only matters for answers or predictions written in full-width characters.

"final_score" is the number of hits (out of 1000 on the full set, lmms-eval's Final Score).
The Table 1 "score" is hits / samples x 100, on the full set Final Score / 10, the OpenVLM
leaderboard's normalisation (VLMEvalKit `gen_table.py`).
"""

from __future__ import annotations

import collections
import os

import numpy as np
from PIL import Image

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image

NAME = "ocrbench"
TITLE = "OCRBench"
GROUP = "perception"
DATASET = "echo840/OCRBench"
SPLIT = "test"
MAX_NEW_TOKENS = 128  # lmms-eval ocrbench.yaml generation_kwargs

HME = "HME100k"
# lmms-eval `OCRBench_score`: the 10 question types; the first 6 make the recognition sub-score (max 300).
RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
               "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
QUESTION_TYPES = RECOGNITION + ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                                "Handwritten Mathematical Expression Recognition")
COLUMNS = ("dataset", "question", "question_type", "answer", "image")
# Full-width ASCII U+FF01..U+FF5E -> U+0021..U+007E, and the ideographic space U+3000 -> " ".
_FULL_TO_HALF = {0xFF01 + k: 0x21 + k for k in range(0x5E)} | {0x3000: 0x20}


def features():
    """The HF schema of echo840/OCRBench (its dataset card's `dataset_info`)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"dataset": text, "question": text, "question_type": text,
                              "answer": datasets.List(text), "image": datasets.Image()})


def format_prompt(question: str) -> str:
    """lmms-eval `ocrbench_doc_to_text`: the question alone."""
    return question.strip()


def _answers(cell, where: str) -> list[str]:
    """The gold answers; lmms-eval accepts a single string as well as a list."""
    answers = [cell] if isinstance(cell, str) else cell
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        # An empty answer is a substring of everything: it would make the row a free hit.
        raise ValueError(f"{where}: answer must be a non-empty string or list of non-empty strings, got {cell!r}")
    return list(answers)


def load(source: str, limit: int | None = None) -> list[Sample]:
    samples = []
    for i, (where, row) in enumerate(read_rows(source, SPLIT, limit, columns=COLUMNS, schema=TITLE)):
        if row["question_type"] not in QUESTION_TYPES:  # lmms-eval's aggregation would fail on it
            raise ValueError(f"{where}: unknown question_type {row['question_type']!r}; "
                             f"OCRBench has {list(QUESTION_TYPES)}")
        samples.append(Sample(id=str(i), prompt=format_prompt(row["question"]), images=[to_image(row["image"], where)],
                              target=_answers(row["answer"], where),
                              meta={"dataset": row["dataset"], "question_type": row["question_type"]}))
    return samples


def _hme_normalize(text: str) -> str:
    """Official OCRBench for HME100k: strip, newlines to spaces, then every space removed."""
    return text.strip().replace("\n", " ").replace(" ", "")


def _text_normalize(text: str) -> str:
    """Official OCRBench for everything else (lower, strip, "\\n" -> " "), plus full-width folding."""
    return text.lower().translate(_FULL_TO_HALF).replace("\n", " ").strip()


def is_hit(prediction: str, answers: list[str], dataset: str) -> bool:
    """lmms-eval `ocrbench_process_results`: any gold answer contained in the prediction."""
    norm = _hme_normalize if dataset == HME else _text_normalize
    pred = norm(prediction)
    return any(norm(a) in pred for a in answers)


def score(samples: list[Sample], predictions: list[str]) -> dict:
    check_predictions(TITLE, samples, predictions, allow_empty=False)
    per_type: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"hits": 0, "total": 0})
    for s, p in zip(samples, predictions):
        counts = per_type[s.meta["question_type"]]
        counts["hits"] += int(is_hit(p, s.target, s.meta["dataset"]))
        counts["total"] += 1
    hits = sum(c["hits"] for c in per_type.values())
    return {
        "score": percent(hits, len(samples)),
        "final_score": hits,
        # lmms-eval 0.7.3 `ocrbench_aggregate_accuracy` returns Final Score / 1000 whatever the
        # number of samples: equal to "score" on the full set, smaller on a --limit subset.
        "lmms_eval_accuracy": 100.0 * hits / 1000,
        "samples": len(samples),
        "text_recognition": sum(c["hits"] for t, c in per_type.items() if t in RECOGNITION),
        "per_question_type": dict(sorted(per_type.items())),
        "lmms_eval": {"ocrbench_accuracy": hits / 1000},
    }


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """`num` questions cycling through recognition, VQA, KIE and HME100k rows."""
    import datasets

    rng = np.random.default_rng(seed)
    kinds = (
        ("IIIT5K", "Regular Text Recognition", "what is written in the image?", ["STOP", "stop"]),
        (HME, "Handwritten Mathematical Expression Recognition",
         "Please write out the expression of the formula in the image using LaTeX format.", ["x ^ { 2 } + 1"]),
        ("docVQA", "Doc-oriented VQA", "What is the date on the letter?", ["May 4, 1998"]),
        ("FUNSD", "Key Information Extraction", "What is the value of the field 'Name'?", ["John Smith"]),
        ("textVQA", "Scene Text-centric VQA", "what brand is the bottle?", ["pepsi"]),
    )
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(num):
        dataset, qtype, question, answer = kinds[i % len(kinds)]
        h, w = int(rng.integers(32, 65)), int(rng.integers(32, 65))
        cols["dataset"].append(dataset)
        cols["question"].append(question)
        cols["question_type"].append(qtype)
        cols["answer"].append(list(answer))
        cols["image"].append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ocrbench_test.parquet")
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path
