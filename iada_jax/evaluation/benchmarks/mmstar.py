"""MMStar (val, 1500 questions): vision-indispensable multiple choice, 6 core categories x 3
sub-categories (l2_category), 250 questions per core category.

Mirrors lmms-eval `tasks/mmstar/` (`mmstar.yaml`, `utils.py`):
- prompt (`mmstar_doc_to_text`): the question (options embedded as "Options: A: ..., B: ...")
  stripped, " Please answer yes or no." removed, then the post-prompt (which has no final
  period); PROMPT_STYLES "qwen3_vl": the task's `qwen3_vl` kwargs, "Question: " before and
  "Answer with the option letter only." right after the question (no newline, as lmms-eval);
- scoring: `extract_mcq_answer` (mcq.py) over the letters A-D, whatever options the question
  offers (lmms-eval 0.7.3 `exact_match`: a fifth option's letter is never found), must give the
  answer letter (before April 2026 lmms-eval read the first character, "(X", "option X" or
  "the answer is X");
- metric "average": the mean of the per-l2_category accuracies, in %; the six core categories
  are reported the same way (mean of their sub-categories); "lmms_eval": the same as
  fractions, as `mmstar_aggregate_results` returns them.
"""

from __future__ import annotations

import random
import re
import string
from collections import defaultdict

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.evaluation.benchmarks import mcq

NAME = "mmstar"
TITLE = "MMStar"
GROUP = "reasoning"
DATASET = "Lin-Chen/MMStar"
SPLIT = "val"
MAX_NEW_TOKENS = 128  # mmstar.yaml sets none: lmms-eval's qwen3_vl model default

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
PROMPT_STYLES = ("default", "qwen3_vl")
QWEN3_VL_PROMPTS = ("Question: ", "Answer with the option letter only.")  # _default_template_yaml qwen3_vl
REPLACE_PROMPT = " Please answer yes or no."
_OPTION_LABEL = r"(?:^|[\s,])([A-Z]):"  # "Options: A: ..., B: ..."


def build_prompt(question: str, style: str = "default") -> str:
    pre, post = QWEN3_VL_PROMPTS if style == "qwen3_vl" else ("", POST_PROMPT)
    return f"{pre}{question.strip().replace(REPLACE_PROMPT, '')}{post}"


def _sample(row: dict, where: str, style: str) -> Sample:
    question = mcq.field(row, "question", where, DATASET)
    answer = str(mcq.field(row, "answer", where, DATASET)).strip().upper()
    if not re.fullmatch(r"[A-Z]", answer):
        raise ValueError(f"{where}: answer {answer!r} is not an option letter")
    options_text = question.rsplit("Options:", 1)[-1] if "Options:" in question else ""
    letters = mcq.embedded_letters(options_text, _OPTION_LABEL)
    if answer not in letters:  # options written in a form the label pattern misses: A-D at least
        letters = mcq.option_letters(max(4, string.ascii_uppercase.index(answer) + 1))
    return Sample(id=str(mcq.field(row, "index", where, DATASET)), prompt=build_prompt(question, style),
                  images=[to_image(mcq.field(row, "image", where, DATASET), f"{where} image")],
                  target=answer, options=letters,
                  meta={"category": mcq.field(row, "category", where, DATASET),
                        "l2_category": mcq.field(row, "l2_category", where, DATASET)})


def load(source: str, limit: int | None = None, prompt_style: str = "default") -> list[Sample]:
    return [_sample(row, where, prompt_style) for where, row in read_rows(source, SPLIT, limit)]


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """{"score": mean of the l2-category accuracies, "plain": the plain mean, per core
    category (mean of its l2 categories), "l2/<name>": each l2 accuracy}, all in %."""
    check_predictions(NAME, samples, predictions)
    by_l2: dict[str, list[int]] = defaultdict(list)
    l2_of: dict[str, dict[str, None]] = defaultdict(dict)  # ordered as lmms-eval meets them
    for sample, prediction in zip(samples, predictions):
        # lmms-eval 0.7.3 `exact_match`: the letter among A-D, whatever options the question offers.
        letter = mcq.extract_mcq_answer(prediction, mcq.ABCD)
        by_l2[sample.meta["l2_category"]].append(int(letter == sample.target))
        l2_of[sample.meta["category"]].setdefault(sample.meta["l2_category"])
    l2_frac = {name: sum(v) / len(v) for name, v in by_l2.items()}  # lmms-eval's order of operations
    l2_acc = {name: 100.0 * f for name, f in l2_frac.items()}
    hits = sum(sum(v) for v in by_l2.values())
    average = sum(l2_frac.values()) / len(l2_frac) if l2_frac else 0.0
    categories = {c: sum(l2_frac[n] for n in names) / len(names) for c, names in sorted(l2_of.items())}
    out = {"score": 100.0 * average, "plain": percent(hits, len(samples)), "correct": hits, "total": len(samples)}
    out.update({c: 100.0 * f for c, f in categories.items()})
    out.update({f"l2/{n}": acc for n, acc in sorted(l2_acc.items())})
    out["lmms_eval"] = {"average": average, **categories}
    return out


# A few of the real (category, l2_category) pairs, for the fixture.
_CATEGORIES = (("coarse perception", "image scene and topic"), ("coarse perception", "image style & quality"),
               ("fine-grained perception", "recognition"))


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """Colour questions with A-D options embedded, spread over three l2 categories, in the
    Lin-Chen/MMStar schema."""
    import datasets

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow"]
    keys = ("index", "question", "image", "answer", "category", "l2_category", "meta_info")
    cols: dict[str, list] = {k: [] for k in keys}
    for i in range(num):
        colour, image = mcq.fixture_image(rng, colours)
        category, l2 = _CATEGORIES[i % len(_CATEGORIES)]
        options = ", ".join(f"{letter}: {c}" for letter, c in zip("ABCD", colours))
        row = {"index": i, "question": f"Which colour fills the image?\nOptions: {options}", "image": image,
               "answer": "ABCD"[colours.index(colour)], "category": category, "l2_category": l2,
               "meta_info": {"source": "synthetic", "split": SPLIT, "image_path": f"images/{i}.jpg"}}
        for key, value in row.items():
            cols[key].append(value)
    text = datasets.Value("string")
    features = {k: text for k in keys}
    features.update(index=datasets.Value("int64"), image=datasets.Image(),
                    meta_info={"source": text, "split": text, "image_path": text})
    return mcq.write_parquet(cols, features, folder, NAME)
