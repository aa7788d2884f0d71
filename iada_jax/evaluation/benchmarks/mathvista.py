"""MathVista (testmini, 1000 problems): mathematical reasoning over charts, plots, figures.

Mirrors lmms-eval 0.7.3 `tasks/mathvista/` (`utils.py`, `mathvista_evals.py` `MathVistaEvaluator`):
- prompt (`mathvista_doc_to_text` -> `create_one_query`, zero-shot), one of VARIANTS: "cot"
  (task `mathvista_testmini_cot`, shot_type "step-by-step", the default), "format"
  (`mathvista_testmini_format`, "format-prompt"), "solution" (`mathvista_testmini_solution`),
  or "query" (the data set's own `query` column, MathVista's official prompt; not lmms-eval's);
- extraction (`extract_answer`): the response as-is when it equals a choice, or parses as an
  int / float for those answer types; else lmms-eval asks a GPT extractor with DEMO_PROMPT.
  `extractor="gpt"` does the same through an OpenAI-compatible endpoint (judge.py); the
  offline default is a rule-based extractor (`offline_extract`: an option letter in any case,
  alone, as a label, after "the answer is" or ending the response; a choice's text named in
  the response; the text after "the answer is"; the last number, or number word);
- normalisation (`normalize_extracted_answer`): multiple choice letter -> choice text, else
  the Levenshtein-nearest choice; integer `int(float(x))`; float `round(x, int(precision))`.
  lmms-eval 0.7.3 passes the data set's float `precision` (1.0) to `round`, which raises, so
  it scores every float question wrong; we keep MathVista's own integer cast (a documented
  difference, the only one);
- correct when `str(prediction).strip() == str(answer).strip()` (`safe_equal`); accuracy in %,
  with lmms-eval's breakdowns by question and answer type, language, source, category, task,
  context, grade and skill, and its headline (`llm_as_judge_eval`, rounded to 2 places).
"""

from __future__ import annotations

import random
import re

from iada_jax.evaluation.benchmark import Sample, check_predictions, percent, read_rows, to_image
from iada_jax.evaluation.benchmarks import mcq

NAME = "mathvista"
TITLE = "MathVista"
GROUP = "reasoning"
DATASET = "AI4Math/MathVista"
SPLIT = "testmini"
MAX_NEW_TOKENS = 16384  # mathvista_testmini_{cot,format,solution}.yaml generation_kwargs
# Prompt variants: lmms-eval task -> its shot_type (create_one_query); "query": the data set's column.
VARIANTS = {"cot": "step-by-step", "format": "format-prompt", "solution": "solution", "query": None}

MULTI_CHOICE = "multi_choice"


# ----------------------------------------------------------------------------- loading
_FORMAT_HINTS = {"integer": "Answer the question using a single integer number.",
                 "float1": "Answer the question using a single floating-point number with one decimal place.",
                 "float2": "Answer the question using a single floating-point number with two decimal places.",
                 "list": "Answer the question using a Python list.",
                 "text": "Answer with the option's letter from the given choices directly."}
_HINT = "Hint: Please answer the question "
_STEP_HINTS = {"integer": _HINT + "requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
               "float1": _HINT + "requiring a floating-point number with one decimal place and provide the final "
                                 "value, e.g., 1.2, 1.3, 1.4, at the end.",
               "float2": _HINT + "requiring a floating-point number with two decimal places and provide the final "
                                 "value, e.g., 1.23, 1.34, 1.45, at the end.",
               "list": _HINT + "requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], "
                               "[1.2, 1.3, 1.4], at the end.",
               "text": _HINT + "and provide the correct option letter, e.g., A, B, C, D, at the end."}


def create_one_query(row: dict, shot_type: str) -> str:
    """lmms-eval `MathVistaEvaluator.create_one_query`, zero-shot, no caption or OCR (the
    settings of its testmini tasks) for shot types step-by-step, format-prompt and solution."""
    answer_type, precision = row["answer_type"], row.get("precision")
    kind = answer_type if answer_type != "float" else f"float{int(precision) if precision in (1, 2) else ''}"
    hints = _FORMAT_HINTS if shot_type == "format-prompt" else _STEP_HINTS
    hint = hints.get(kind, "")  # lmms-eval leaves the hint unset (and fails) for other float precisions
    question = row["question"] if shot_type == "format-prompt" else f"Question: {row['question']}"
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    choices = row.get("choices") or []
    if not choices:
        choices_text = ""
    elif shot_type == "format-prompt":
        choices_text = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    else:
        choices_text = "\n".join(["Choices:"] + [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)])
    tail = "Solution: " if shot_type == "solution" else ""
    return "\n".join(e for e in (question, choices_text, hint, tail) if e != "").strip()


def _sample(row: dict, where: str, variant: str) -> Sample:
    question_type = mcq.field(row, "question_type", where, DATASET)
    answer_type = mcq.field(row, "answer_type", where, DATASET)
    choices = mcq.field(row, "choices", where, DATASET, required=question_type == MULTI_CHOICE)
    precision = mcq.field(row, "precision", where, DATASET, required=answer_type == "float")
    image = to_image(mcq.field(row, "decoded_image", where, DATASET), f"{where} decoded_image")
    query = mcq.field(row, "query", where, DATASET)
    if VARIANTS[variant] is None:
        prompt = query
    else:
        mcq.field(row, "question", where, DATASET)
        prompt = create_one_query(row, VARIANTS[variant])
    return Sample(
        id=str(mcq.field(row, "pid", where, DATASET)), prompt=prompt, images=[image],
        target=str(mcq.field(row, "answer", where, DATASET)),
        options=mcq.letters_for(choices, where) if question_type == MULTI_CHOICE else None,
        meta={"question_type": question_type, "answer_type": answer_type, "query": query,
              "choices": list(choices) if choices is not None else [], "precision": precision,
              "metadata": row.get("metadata") or {}})


def load(source: str, limit: int | None = None, variant: str = "cot") -> list[Sample]:
    if variant not in VARIANTS:
        raise ValueError(f"MathVista prompt {variant!r}: choose from {list(VARIANTS)}")
    return [_sample(row, where, variant) for where, row in read_rows(source, SPLIT, limit)]


# ----------------------------------------------------------------------------- extraction
_LETTER_LABEL = re.compile(r"^\(?([A-Z])[.:)]\s")  # "B. 8/11", "(B) 8/11"
# The phrase in any case, the letter a capital: "the answer is a cat" names no option.
_LETTER_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def quick_extract(response: str, meta: dict) -> str | None:
    """lmms-eval `extract_answer` before its GPT call: a choice text verbatim, or the whole
    response when it parses as the answer type; None when the extractor would be asked."""
    if meta["question_type"] == MULTI_CHOICE and response in meta["choices"]:
        return response
    for kind, parse in (("integer", int), ("float", float)):
        if meta["answer_type"] == kind:
            try:
                return str(parse(response))
            except ValueError:
                pass
    return None


_LETTER_LAST = re.compile(r"(?<![A-Za-z'])\(?([A-Z])\)?[.!]?\s*$")  # "..., so B.", "... is (C)"
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
                                                      "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100}


def _option_letter(response: str, letters: tuple[str, ...]) -> str:
    """A letter the response clearly answers with: alone or as a leading label (any case:
    "b", "(b)", "B. 8/11"), after "answer is" / "option:" (the letter-answer examples of
    DEMO_PROMPT), or a capital letter ending the response ("..., so B.")."""
    text = response.strip()
    alone = text.strip("().:!").strip()
    if len(alone) == 1 and alone.upper() in letters:
        return alone.upper()
    match = _LETTER_LABEL.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    matches = [m.group(1) for m in _LETTER_PHRASE.finditer(response)]
    if matches and matches[-1] in letters:
        return matches[-1]
    match = _LETTER_LAST.search(text)
    if match and match.group(1) in letters:
        return match.group(1)
    return ""


def _choice_text(response: str, choices: list[str]) -> str:
    """The choice whose text the response names (case-insensitively; the last named when
    several are, e.g. "not A but Between 2007 and 2008"), or ""."""
    lower = response.lower()
    named = [(lower.rfind(str(c).lower()), i) for i, c in enumerate(choices) if str(c).strip() and str(c).lower() in lower]
    return str(choices[max(named)[1]]) if named else ""


def _number_word(text: str) -> str:
    """The last number written as a word ("fourteen", "twenty one" -> "21"), or ""."""
    words = re.findall(r"[a-z]+", text.lower())
    found, k = "", 0
    while k < len(words):
        if words[k] in _NUMBER_WORDS:
            value = _NUMBER_WORDS[words[k]]
            if value >= 20 and value % 10 == 0 and k + 1 < len(words) and 0 < _NUMBER_WORDS.get(words[k + 1], 10) < 10:
                value, k = value + _NUMBER_WORDS[words[k + 1]], k + 1
            found = str(value)
        k += 1
    return found


def offline_extract(response: str, meta: dict) -> str:
    """Stands in for the GPT extractor. In order: an option letter (multiple choice; the
    normalisation maps it to its text); the text after the last "the answer is" / "answer:";
    for integer and float answers, the last number in that text (or in the whole response)."""
    if meta["question_type"] == MULTI_CHOICE:
        letter = _option_letter(response, mcq.option_letters(len(meta["choices"])))
        if letter:
            return letter
        named = _choice_text(response, meta["choices"])
        if named:
            return named
    phrases = _ANSWER_IS.findall(response)
    tail = phrases[-1].strip().rstrip(".") if phrases else response
    if meta["answer_type"] in ("integer", "float"):
        numbers = _NUMBER.findall(tail.replace(",", "")) or _NUMBER.findall(response.replace(",", ""))
        return numbers[-1] if numbers else _number_word(tail) or _number_word(response)
    return tail


# lmms-eval 0.7.3 mathvista_evals.py DEMO_PROMPT, verbatim: the GPT extractor's few-shot prompt.
DEMO_PROMPT = """
Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.
Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)

Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.

Extracted answer: 1.45

Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.
Question: Between which two years does the line  graph saw its maximum peak?

Model response: The line graph saw its maximum peak between 2007 and 2008.

Extracted answer: [2007, 2008]

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5

Model response: The correct answer is (B) 8/11.

Extracted answer: B
"""


def gpt_prompt(query: str, response: str) -> str:
    """lmms-eval `create_test_prompt(DEMO_PROMPT, query, response)`: what the extractor is asked
    (the data set's `query` column, whichever prompt variant the model saw)."""
    return f"{DEMO_PROMPT.strip()}\n\n{query}\n\n{response}\n\nExtracted answer: "


def extract_answer(response: str, meta: dict, extractor=None) -> str:
    """lmms-eval `extract_answer`: the quick checks, then `extractor(prompt) -> str` (the GPT
    call, judge.py) when given, else `offline_extract`."""
    if not response:
        return ""
    quick = quick_extract(response, meta)
    if quick is not None:
        return quick
    return extractor(gpt_prompt(meta["query"], response)) if extractor is not None else offline_extract(response, meta)


# ----------------------------------------------------------------------------- normalisation
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), as `Levenshtein.distance`."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalize_extracted_answer(extraction: str, meta: dict) -> str | None:
    """lmms-eval `normalize_extracted_answer`; None means "could not be read" (always wrong)."""
    if meta["question_type"] == MULTI_CHOICE:
        choices = meta["choices"]
        extraction = str(extraction).strip()
        bracketed = re.findall(r"\(([a-zA-Z])\)", extraction)  # "(A) text" -> "A"
        if bracketed:
            extraction = bracketed[0].upper()
        letters = mcq.option_letters(len(choices))
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [levenshtein(extraction, choice) for choice in choices]
        return choices[distances.index(min(distances))]  # the first of equally near choices
    try:
        if meta["answer_type"] == "integer":
            return str(int(float(extraction)))
        if meta["answer_type"] == "float":
            # MathVista's own scorer uses int(precision); the HF column holds floats (1.0, 2.0).
            precision = meta["precision"]
            return str(round(float(extraction), None if precision is None else int(precision)))
    except (TypeError, ValueError):
        return None
    return str(extraction)  # text and list answers compare as strings


# ----------------------------------------------------------------------------- scoring
BREAKDOWN_KEYS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade",
                  "skills")


def score(samples: list[Sample], predictions: list[str], extractor=None) -> dict:
    """Accuracy (%), overall and broken down as lmms-eval's `mathvista_aggregate_results`
    ({key: {value: {"accuracy", "correct", "total"}}}, accuracies rounded to 2 places).
    extractor: the GPT extractor (`extract_answer`); None: the offline rules."""
    check_predictions(NAME, samples, predictions)
    right = []
    for sample, prediction in zip(samples, predictions):
        extraction = extract_answer(prediction.strip(), sample.meta, extractor)
        normalised = normalize_extracted_answer(extraction, sample.meta)
        right.append(int(str(normalised).strip() == str(sample.target).strip()))
    hits = sum(right)
    breakdown: dict[str, dict[str, list[int]]] = {k: {} for k in BREAKDOWN_KEYS}
    for sample, correct in zip(samples, right):
        fields = {**(sample.meta.get("metadata") or {}), "question_type": sample.meta["question_type"],
                  "answer_type": sample.meta["answer_type"]}
        for key in BREAKDOWN_KEYS:
            values = fields.get(key)
            for value in (values if key == "skills" else [values]) if values is not None else ():
                breakdown[key].setdefault(str(value), []).append(correct)
    out = {"score": percent(hits, len(samples)), "correct": hits, "total": len(samples)}
    for key, groups in breakdown.items():
        rows = {v: {"accuracy": round(percent(sum(c), len(c)), 2), "correct": sum(c), "total": len(c)}
                for v, c in groups.items()}
        out[key] = dict(sorted(rows.items(), key=lambda kv: kv[1]["accuracy"], reverse=True))
    headline = round(hits / len(samples) * 100, 2) if samples else 0.0
    out["lmms_eval"] = {"llm_as_judge_eval": headline or None}  # lmms-eval returns None for 0
    return out


# ----------------------------------------------------------------------------- fixture
_HINTS = {
    "text": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    "float": "Please answer the question requiring a floating-point number with one decimal place and "
             "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
}


def _query(answer_type: str, question: str, choices: list[str] | None) -> str:
    """The `query` column as MathVista builds it: hint, question, then "(A) ..." choices."""
    query = f"Hint: {_HINTS[answer_type]}\nQuestion: {question}"
    if choices:
        query += "\nChoices:\n" + "\n".join(f"({letter}) {c}" for letter, c in zip("ABCDEFGH", choices))
    return query


def write_fixture(folder: str, num: int = 8, seed: int = 0) -> str:
    """multi_choice (colour), free_form integer (pixel width / 8) and float (aspect ratio,
    one decimal) rows in turn, in the AI4Math/MathVista schema."""
    import datasets

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow"]
    keys = ("pid", "question", "image", "decoded_image", "choices", "unit", "precision", "answer",
            "question_type", "answer_type", "metadata", "query")
    cols: dict[str, list] = {k: [] for k in keys}
    for i in range(num):
        colour, image = mcq.fixture_image(rng, colours)
        answer_type = ("text", "integer", "float")[i % 3]
        if answer_type == "text":
            question, choices, answer, precision = "What colour is the image?", colours, colour, None
        elif answer_type == "integer":
            question, choices, answer, precision = "How wide is the image, in units of 8 pixels?", None, \
                str(image.width // 8), None
        else:
            question, choices, precision = "What is the width of the image divided by its height?", None, 1.0
            answer = str(round(image.width / image.height, 1))
        pid = str(i + 1)
        row = {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "decoded_image": image,
               "choices": choices, "unit": None, "precision": precision, "answer": answer,
               "question_type": MULTI_CHOICE if choices else "free_form", "answer_type": answer_type,
               "metadata": {"category": "math-targeted-vqa", "context": "synthetic scene", "grade": "elementary school",
                            "img_height": image.height, "img_width": image.width, "language": "english",
                            "skills": ["arithmetic reasoning"], "source": "synthetic", "split": SPLIT,
                            "task": "figure question answering"},
               "query": _query(answer_type, question, choices)}
        for key, value in row.items():
            cols[key].append(value)
    text, sequence = datasets.Value("string"), datasets.Sequence(datasets.Value("string"))
    features = {k: text for k in keys}
    metadata = {k: text for k in ("category", "context", "grade", "language", "source", "split", "task")}
    metadata.update(img_height=datasets.Value("int64"), img_width=datasets.Value("int64"), skills=sequence)
    features.update(decoded_image=datasets.Image(), choices=sequence, precision=datasets.Value("float64"),
                    metadata=metadata)
    return mcq.write_parquet(cols, features, folder, NAME)
