"""MMMU (validation, 900 questions): college-level multi-discipline questions over 1-7 images.

Mirrors lmms-eval `tasks/mmmu/utils.py` (task `mmmu_val`), whose scoring helpers come from
the official MMMU `eval/eval_utils.py`:
- prompt (PROMPT_STYLES): "default", `construct_prompt` with the task's default prompts, or
  "qwen3_vl", `mmmu_doc_to_text_qwen3vl` with the task's `qwen3_vl` kwargs (what lmms-eval's
  qwen3_vl model gets); `<image k>` references stay in the text and the referenced `image_k`
  columns, sorted, are the sample's images (before the text);
- multiple choice: `parse_mmmu_multi_choice_response` (mcq.py), exact letter match;
- open: `parse_open_response` (key-phrase splitting + number extraction) and `eval_open`;
- metric: instance-level accuracy over all subjects (`mmmu_acc`), in %, with lmms-eval's
  breakdown by subject and domain (`mmmu_aggregate_results`) and its headline (a fraction
  rounded to 5 places).
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
MAX_NEW_TOKENS = 128  # _default_template_yaml generation_kwargs (mmmu_val includes it)

MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_ENDED_PROMPT = "Answer the question using a single word or phrase."
PROMPT_STYLES = ("default", "qwen3_vl")
# mmmu_val.yaml lmms_eval_specific_kwargs qwen3_vl (format "qwen3_vl")
QWEN3_VL_PRE_PROMPT = "Question: "
QWEN3_VL_POST_PROMPT = "Answer with the option letter only."
QWEN3_VL_OPEN_ENDED_PROMPT = "Please select the correct answer from the options above."
# lmms-eval mmmu/utils.py DOMAIN_CAT2SUB_CAT: subjects (the middle of the id) by domain.
DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
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


def build_prompt(question: str, options: list[str] | None, style: str = "default", listed: list[str] = ()) -> str:
    """lmms-eval `construct_prompt` with `MULTI_CHOICE_PROMPT` / `OPEN_ENDED_PROMPT`, or for
    style "qwen3_vl" `mmmu_doc_to_text_qwen3vl`. `options` is None for open questions, whose
    row's `options` cell (usually "[]") the qwen3_vl prompt lists all the same (`listed`)."""
    if style == "qwen3_vl":
        shown_options = options if options is not None else list(listed)
        shown = mcq.format_options(shown_options) if shown_options else ""
        post = QWEN3_VL_POST_PROMPT if options is not None else QWEN3_VL_OPEN_ENDED_PROMPT
        return f"{QWEN3_VL_PRE_PROMPT}{question}\nOptions:\n{shown}\n{post}"
    if options is not None:
        return f"{question}\n{mcq.format_options(options)}\n\n{MULTI_CHOICE_PROMPT}"
    return f"{question}\n\n{OPEN_ENDED_PROMPT}"


def _images(row: dict, prompt: str, where: str) -> list:
    """lmms-eval `mmmu_doc_to_visual`: the distinct `<image k>` references, sorted by name."""
    columns = sorted({ref.strip("<>").replace(" ", "_") for ref in re.findall(r"<image \d+>", prompt)})
    return [to_image(mcq.field(row, c, where, DATASET), f"{where} {c}") for c in columns]


def subject(sample_id: str) -> str:
    """lmms-eval `extract_subset_name`: "validation_Art_Theory_12" -> "Art_Theory"."""
    match = re.match(rf"^{re.escape(sample_id.split('_')[0])}_(.+?)_\d+$", sample_id)
    return match.group(1) if match else ""


def _sample(row: dict, where: str, style: str) -> Sample:
    question = mcq.field(row, "question", where, DATASET)
    kind = mcq.field(row, "question_type", where, DATASET)
    answer = str(mcq.field(row, "answer", where, DATASET)).strip()
    # The qwen3_vl prompt lists the options cell of open questions too (usually "[]").
    listed = parse_options(mcq.field(row, "options", where, DATASET), where) \
        if kind == MULTIPLE_CHOICE or style == "qwen3_vl" else ()
    options = listed if kind == MULTIPLE_CHOICE else None
    letters = mcq.letters_for(options, where) if options is not None else None
    prompt = build_prompt(question, options, style, listed)
    if letters is not None and answer not in letters:
        raise ValueError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    return Sample(id=str(mcq.field(row, "id", where, DATASET)), prompt=prompt, images=_images(row, prompt, where),
                  target=answer, options=letters,
                  meta={"question_type": kind, "index2ans": dict(zip(letters, options)) if letters else None,
                        "subject": subject(str(mcq.field(row, "id", where, DATASET)))})


def load(source: str, limit: int | None = None, prompt_style: str = "default") -> list[Sample]:
    return [_sample(row, where, prompt_style) for where, row in read_rows(source, SPLIT, limit)]


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
    by_subject: dict[str, list[int]] = {}
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
        by_subject.setdefault(sample.meta.get("subject") or subject(sample.id), []).append(int(correct))
    total = sum(hits.values())
    # lmms-eval `mmmu_aggregate_results`: per subject and per domain, fractions rounded to 5 places.
    breakdown = {}
    for domain, subjects in DOMAINS.items():
        present = [by_subject[s] for s in subjects if s in by_subject]
        n = sum(len(v) for v in present)
        breakdown["Overall-" + domain] = {"num": n, "acc": round(sum(map(sum, present)) / n, 5) if n else 0}
        breakdown.update({s: {"num": len(by_subject[s]), "acc": round(sum(by_subject[s]) / len(by_subject[s]), 5)}
                          for s in subjects if s in by_subject})
    return {"score": percent(total, len(samples)), "correct": total, "total": len(samples),
            "multiple_choice": percent(hits[MULTIPLE_CHOICE], counts[MULTIPLE_CHOICE]),
            "open": percent(hits["open"], counts["open"]), "breakdown": breakdown,
            "lmms_eval": {"mmmu_acc": round(total / len(samples), 5) if samples else 0}}


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
