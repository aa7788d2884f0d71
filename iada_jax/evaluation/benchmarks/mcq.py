"""Multiple-choice plumbing shared by the reasoning benchmarks (and RealWorldQA).

- Option letters and the "A. text" lines lmms-eval puts under a question.
- `parse_mmmu_multi_choice_response`: MMMU's parser (lmms-eval `mmmu/utils.py`
  `parse_multi_choice_response`, from the official MMMU `eval_utils.py`), with its random
  fallback made reproducible by a caller-supplied `random.Random`.
- `extract_mcq_answer`: lmms-eval's shared letter extractor
  (`_task_utils/mcq_extract.py`, the priority-ranked version used by MMStar and RealWorldQA).
- `field`: a row's cell with errors that name the source, row and schema, and writing the
  tiny fixtures (solid-colour images, parquet in the real HF schema). Reading rows, checking
  prediction counts and `percent` live in `iada_jax.evaluation.benchmark`.
"""

from __future__ import annotations

import os
import random
import re
import string
from collections.abc import Sequence
from typing import Any

from PIL import Image

DEFAULT_CHOICES = ("A", "B", "C", "D", "E", "F", "G", "H")  # extract_mcq_answer's default
ABCD = ("A", "B", "C", "D")


# ----------------------------------------------------------------------------- options
def option_letters(n: int) -> tuple[str, ...]:
    """("A", "B", ...) for n options, as lmms-eval's `chr(ord("A") + i)`."""
    if not 0 < n <= 26:
        raise ValueError(f"{n} options; a multiple-choice question needs 1 to 26")
    return tuple(string.ascii_uppercase[:n])


def letters_for(options: Sequence, where: str) -> tuple[str, ...]:
    """option_letters for a row's options, with an error that names the row."""
    if not 0 < len(options) <= 26:
        raise ValueError(f"{where}: {len(options)} options; a multiple-choice question needs 1 to 26")
    return option_letters(len(options))


def format_options(options: Sequence[str]) -> str:
    """'A. first\\nB. second' (lmms-eval `parse_options` / the `choices_str` of ScienceQA, AI2D)."""
    return "\n".join(f"{letter}. {text}" for letter, text in zip(option_letters(len(options)), options))


def embedded_letters(text: str, label: str) -> tuple[str, ...]:
    """The option letters written into a question, for benchmarks whose options live in the
    question text: `label` is the regex of one label with the letter as group 1 (MMStar
    "A: ...", RealWorldQA "A. ..."). Only a run from "A" counts, so stray capitals are ignored."""
    found = set(re.findall(label, text, flags=re.MULTILINE))
    letters = []
    for letter in string.ascii_uppercase:
        if letter not in found:
            break
        letters.append(letter)
    return tuple(letters)


# ----------------------------------------------------------------------------- MMMU parser
def parse_mmmu_multi_choice_response(response: str, all_choices: Sequence[str], index2ans: dict[str, str],
                                     rng: random.Random) -> str:
    """The chosen letter, as lmms-eval / MMMU `parse_multi_choice_response`:
    1. "(A)"; else 2. "A " (letter then space, so a bare "A" counts after padding); else
    3. "A."; else 4. if the response has more than 5 words, an option's text (case-insensitive).
    Several candidates: the one whose last occurrence is latest wins. None: `rng.choice`
    (lmms-eval calls the global `random.choice`; a seeded rng makes the score reproducible)."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:  # one after another, as the original
        response = response.strip(char)
    response = " " + response + " "  # so "B" alone matches "B " and " B "

    candidates = [c for c in all_choices if f"({c})" in response]
    bracketed, by_text = bool(candidates), False
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        by_text = bool(candidates)

    if not candidates:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:  # -1 when the letter only matched as the end of a word ("DNA is"): never the latest
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]  # np.argmax: the first of equal maxima


# ----------------------------------------------------------------------------- extract_mcq_answer
# Phrases after which the first occurrence of each letter is a candidate (lmms-eval
# `_ANSWER_PHRASES`, including its Korean, Chinese and Japanese markers).
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# Candidate kinds, most trusted first (lmms-eval `_FORMAT_PRIORITY`).
START, END, PHRASE, PARENTHESES, PERIOD, COLON, RIGHT_PAREN, SPACE, FALLBACK = 10, 9, 7, 6, 5, 4, 3, 2, 0
_MARKED = ((PARENTHESES, "({})"), (PERIOD, "{}."), (COLON, "{}:"), (RIGHT_PAREN, "{})"), (SPACE, "{} "))


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """The answered letter, or "" when there is none; mirrors lmms-eval `extract_mcq_answer`
    (`_task_utils/mcq_extract.py`, the priority-ranked version, April 2026).

    After stripping outer punctuation (,.!?;:'") and padding with spaces, every match is a
    candidate (letter, position, kind). The kind with the highest priority wins and, within
    it, the latest position:
      10 start:  the response starts with the letter, not followed by a letter ("B", "B) cat")
       9 end:    it ends with the letter, not preceded by a letter ("... is B")
       7 phrase: the first occurrence of the letter after an answer phrase ("the answer is B")
       6 "(B)"   5 "B."   4 "B:"   3 "B)"   2 "B " (last occurrence of each)
       0 any occurrence of the capital letter, only if nothing above matched.
    Letters are case-sensitive except inside the (lower-cased) phrase search. Note that a
    leading capital word-letter counts as "start": "A cat" answers A (later lmms-eval
    versions became stricter; this is the version the reference documents)."""
    if not response or not response.strip():
        return ""
    letters = tuple(choices or DEFAULT_CHOICES)
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "

    found: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for priority, template in _MARKED:
        for letter in letters:
            at = text.rfind(template.format(letter))
            if at != -1:
                found.append((priority, at, letter))
    lower = text.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at == -1:
            continue
        for letter in letters:
            where = text.find(letter, at + len(phrase))
            if where != -1:
                found.append((PHRASE, where, letter))
    core = text.strip()
    for letter in letters:
        if core.startswith(letter) and (len(core) == 1 or not core[1].isalpha()):
            found.append((START, 0, letter))
        if core.endswith(letter) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((END, len(text) - 1, letter))
    if not found:
        found = [(FALLBACK, text.rfind(c), c) for c in letters if c in text]
    if not found:
        return ""
    return max(found, key=lambda cand: (cand[0], cand[1]))[2]  # max keeps the first of ties, as the stable sort


# ----------------------------------------------------------------------------- rows
def field(row: dict, name: str, where: str, dataset: str, required: bool = True) -> Any:
    """row[name], or an error that says which row lacks it and which schema was expected."""
    if name not in row:
        raise ValueError(f"{where}: no column {name!r} (has {sorted(row)}); expected the {dataset} schema")
    if required and row[name] is None:
        raise ValueError(f"{where}: column {name!r} is empty")
    return row[name]


# ----------------------------------------------------------------------------- fixtures
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "black": (0, 0, 0), "white": (255, 255, 255)}


def fixture_image(rng: random.Random, names: Sequence[str] = tuple(COLOURS)) -> tuple[str, Image.Image]:
    """(colour name, a solid image of it, 32 to 64 pixels a side): small, deterministic, and
    with an answer a question can ask about."""
    name = rng.choice(list(names))
    size = (rng.randrange(32, 65, 8), rng.randrange(32, 65, 8))
    return name, Image.new("RGB", size, COLOURS[name])


def write_parquet(columns: dict[str, list], features, folder: str, name: str) -> str:
    """Writes `columns` with the HF `features` (images as `datasets.Image()`) to folder/name.parquet."""
    import datasets

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.parquet")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(path)
    return path
