"""A synthetic multimodal world for the reasoning-tax study: scenes, questions, data sets.

A scene is a 3x3 grid of cells holding 1-5 flat shapes (circle, square, triangle) in four
colours, drawn without anti-aliasing on white, so every answer is fixed by the pixels. Three
kinds of question, all answered by one word (a colour, a shape, a number, yes/no/none):

    perception  one look: the colour or shape at a cell, counts of all / one shape / one colour,
                "is there a red square?"
    reasoning   several looks composed: sums, differences and comparisons of counts, parity,
                weighted totals ("a circle is worth 3, a square 2"), and two-hop spatial
                questions ("what colour is right of the red circle?")
    text        multi-step arithmetic without an image ("What is 7 minus 2 plus 6?")

Stage 0 of the study (a base model from random initialisation) trains on a mix of all three;
stage 1 (the fine-tuning whose tax is measured) sees perception-style instruction data only:
descriptions of the image and of its shapes, with a fraction of short perception answers (as
visual-instruction mixes hold some VQA). Held-out sets of each kind are scored by exact match.

Rows use the trl-lib/llava-instruct-mix schema (`images`, `prompt`, `completion`), plus
`kind` and `group` columns that training ignores; text-only rows have no image.
"""

from __future__ import annotations

import dataclasses
import os
import random
import zlib

from PIL import Image, ImageDraw

from iada_jax.embedded.synthetic import draw_shape

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # exact RGB values; drawing is not anti-aliased
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
GRID = 3
MAX_OBJECTS = 5
NUMBERS = tuple(str(i) for i in range(19))  # every numeric answer of the world lies in 0..18
GROUPS = ("perception", "reasoning", "text")

PERCEPTION = {
    "colour_at": "What colour is at {cell}?",
    "shape_at": "What shape is at {cell}?",
    "count_all": "How many shapes?",
    "count_shape": "How many {shape}s?",
    "count_colour": "How many {colour} shapes?",
    "exists": "Is there a {colour} {shape}?",
}
REASONING = {
    "sum": "How many {shape}s and {shape2}s together?",
    "difference": "How many more {shape}s than {shape2}s?",
    "more": "More {shape}s than {shape2}s?",
    "parity": "Is the number of {colour} shapes odd?",
    "weighted": "A {shape} is worth {a}, a {shape2} {b}. Total value?",
    "right_of": "What colour is right of the {colour} {shape}?",
    "below": "What shape is below the {colour} {shape}?",
}
TEXT = {
    "arithmetic": "What is {a} {op1} {b} {op2} {c}?",
}
# Stage 1: perception-style instructions with descriptive answers.
DESCRIPTIVE = {
    "describe": "Describe the image.",
    "tell_cell": "Tell me about {cell}.",
    "describe_shape": "Describe the {shape}s.",
}
KINDS = {"perception": PERCEPTION, "reasoning": REASONING, "text": TEXT}


@dataclasses.dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    row: int
    col: int

    @property
    def cell(self) -> str:
        return cell_name(self.row, self.col)


def cell_name(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "middle"
    return f"{ROWS[row]} {COLUMNS[col]}"


def make_scene(rng: random.Random) -> list[Item]:
    """1-5 shapes in distinct cells; shapes and colours drawn independently (repeats allowed)."""
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    return [Item(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), c // GRID, c % GRID) for c in sorted(cells)]


def render(items: list[Item], size: int = 48) -> Image.Image:
    """The scene on a white square of `size` pixels; each shape fills most of its cell."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    r = max(2, int(cell * 0.36))
    for it in items:
        draw_shape(draw, it.shape, int((it.col + 0.5) * cell), int((it.row + 0.5) * cell), r, COLOURS[it.colour])
    return img


def _count(items, shape=None, colour=None) -> int:
    return sum((shape is None or i.shape == shape) and (colour is None or i.colour == colour) for i in items)


def _at(items, row, col):
    return next((i for i in items if (i.row, i.col) == (row, col)), None)


def _unique(items):
    """Items whose (colour, shape) is unique in the scene (a two-hop question's anchor)."""
    return [i for i in items if _count(items, i.shape, i.colour) == 1]


def _two_shapes(rng):
    a, b = rng.sample(SHAPES, 2)
    return a, b


def ask(items: list[Item], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of `kind` about the scene, or None when the scene cannot pose it."""
    if kind == "colour_at" or kind == "shape_at":
        it = rng.choice(items)
        return PERCEPTION[kind].format(cell=it.cell), it.colour if kind == "colour_at" else it.shape
    if kind == "count_all":
        return PERCEPTION[kind], str(len(items))
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        return PERCEPTION[kind].format(shape=shape), str(_count(items, shape=shape))
    if kind == "count_colour":
        colour = rng.choice(sorted(COLOURS))
        return PERCEPTION[kind].format(colour=colour), str(_count(items, colour=colour))
    if kind == "exists":
        if rng.random() < 0.5:  # half the questions ask about a shape that is there
            it = rng.choice(items)
            colour, shape = it.colour, it.shape
        else:
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        return PERCEPTION[kind].format(colour=colour, shape=shape), "yes" if _count(items, shape, colour) else "no"
    if kind in ("sum", "difference", "more"):
        a, b = _two_shapes(rng)
        ka, kb = _count(items, shape=a), _count(items, shape=b)
        if kind == "difference":
            if ka < kb:
                a, b, ka, kb = b, a, kb, ka
            return REASONING[kind].format(shape=a, shape2=b), str(ka - kb)
        if kind == "sum":
            return REASONING[kind].format(shape=a, shape2=b), str(ka + kb)
        return REASONING[kind].format(shape=a, shape2=b), "yes" if ka > kb else "no"
    if kind == "parity":
        colour = rng.choice(sorted(COLOURS))
        return REASONING[kind].format(colour=colour), "yes" if _count(items, colour=colour) % 2 else "no"
    if kind == "weighted":
        s1, s2 = _two_shapes(rng)
        a, b = rng.randint(1, 3), rng.randint(1, 3)
        total = a * _count(items, shape=s1) + b * _count(items, shape=s2)
        return REASONING[kind].format(shape=s1, shape2=s2, a=a, b=b), str(total)
    if kind in ("right_of", "below"):
        step = (0, 1) if kind == "right_of" else (1, 0)
        neighbour = lambda i: _at(items, i.row + step[0], i.col + step[1])  # noqa: E731
        anchors = _unique(items)
        with_one = [i for i in anchors if neighbour(i) is not None]
        if rng.random() < 0.75:  # mostly a neighbour to name (another scene if none), else any
            if not with_one:
                return None
            anchors = with_one
        if not anchors:
            return None
        it = rng.choice(anchors)
        other = neighbour(it)
        answer = "none" if other is None else (other.colour if kind == "right_of" else other.shape)
        return REASONING[kind].format(colour=it.colour, shape=it.shape), answer
    raise ValueError(f"unknown question kind {kind!r}")


def arithmetic(rng: random.Random) -> tuple[str, str]:
    """Two steps of + / - on digits, every partial result in 0..18."""
    while True:
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        op1, op2 = rng.choice(("plus", "minus")), rng.choice(("plus", "minus"))
        first = a + b if op1 == "plus" else a - b
        total = first + c if op2 == "plus" else first - c
        if 0 <= first <= 18 and 0 <= total <= 18:
            return TEXT["arithmetic"].format(a=a, b=b, c=c, op1=op1, op2=op2), str(total)


def _a(items: list[Item]) -> str:
    return ", ".join(f"a {i.colour} {i.shape} at {i.cell}" for i in items)


def describe(items: list[Item], kind: str, rng: random.Random) -> tuple[str, str]:
    """(instruction, descriptive answer) of stage 1."""
    if kind == "describe":
        return DESCRIPTIVE[kind], f"There {'is' if len(items) == 1 else 'are'} {_a(items)}."
    if kind == "tell_cell":
        row, col = divmod(rng.randrange(GRID * GRID), GRID)
        if rng.random() < 0.75:  # mostly an occupied cell
            row, col = (lambda i: (i.row, i.col))(rng.choice(items))
        it = _at(items, row, col)
        return (DESCRIPTIVE[kind].format(cell=cell_name(row, col)),
                "It is empty." if it is None else f"It holds a {it.colour} {it.shape}.")
    if kind == "describe_shape":
        shape = rng.choice(SHAPES)
        found = [i for i in items if i.shape == shape]
        if not found:
            return DESCRIPTIVE[kind].format(shape=shape), f"There are no {shape}s."
        return DESCRIPTIVE[kind].format(shape=shape), f"There {'is' if len(found) == 1 else 'are'} {_a(found)}."
    raise ValueError(f"unknown descriptive kind {kind!r}")


@dataclasses.dataclass(frozen=True)
class Row:
    question: str
    answer: str
    kind: str
    group: str  # perception | reasoning | text | descriptive
    items: tuple[Item, ...] | None  # None: a text-only row
    image_size: int

    def image(self) -> Image.Image | None:
        return None if self.items is None else render(list(self.items), self.image_size)

    @property
    def split(self) -> str:
        """"test" for one (question, scene) in HELDOUT_SHARE, "train" otherwise: a held-out
        question never appears in training, not even the text-only ones (the world has about
        a thousand arithmetic questions, so a random test set would be mostly memorised)."""
        key = repr((self.question, self.items)).encode()
        return "test" if zlib.crc32(key) % HELDOUT_SHARE == 0 else "train"


HELDOUT_SHARE = 8  # one (question, scene) pair in 8 is reserved for the held-out sets


def sample_row(rng: random.Random, group: str, image_size: int = 48, split: str = "train") -> Row:
    """One row of a group and split: a kind uniformly from the group, then a scene and a
    question of that kind, drawn again until they can be posed and fall in `split`."""
    kinds = ["arithmetic"] if group == "text" else list(DESCRIPTIVE if group == "descriptive" else KINDS[group])
    kind = rng.choice(kinds)
    while True:
        if group == "text":
            q, a = arithmetic(rng)
            row = Row(q, a, kind, group, None, image_size)
        else:
            items = make_scene(rng)
            qa = describe(items, kind, rng) if group == "descriptive" else ask(items, kind, rng)
            if qa is None:
                continue
            row = Row(qa[0], qa[1], kind, group, tuple(items), image_size)
        if row.split == split:
            return row


def sample_rows(n: int, mix: dict[str, float], seed: int, image_size: int = 48, split: str = "train") -> list[Row]:
    """n rows of `split` with groups drawn by the weights of `mix` ({group: weight})."""
    rng = random.Random(seed)
    groups, weights = zip(*[(g, w) for g, w in mix.items() if w > 0])
    return [sample_row(rng, rng.choices(groups, weights)[0], image_size, split) for _ in range(n)]


def features():
    """llava-instruct-mix's features (embedded/synthetic.py), plus the row's kind and group."""
    import datasets

    from iada_jax.embedded.synthetic import features as llava_features

    return datasets.Features({**llava_features(), "kind": datasets.Value("string"),
                              "group": datasets.Value("string")})


def write_rows(path: str, rows: list[Row]) -> str:
    """Write rows as a parquet file in the llava-instruct-mix schema; returns the path."""
    import datasets

    from iada_jax.embedded.synthetic import png_bytes

    cols = {k: [] for k in ("images", "prompt", "completion", "kind", "group")}
    for r in rows:
        img = r.image()
        cols["images"].append([] if img is None else [{"bytes": png_bytes(img), "path": None}])
        cols["prompt"].append([{"role": "user", "content": r.question}])
        cols["completion"].append([{"role": "assistant", "content": r.answer}])
        cols["kind"].append(r.kind)
        cols["group"].append(r.group)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path


# Mixes of the study's data sets ({group: weight}).
STAGE0_MIX = {"perception": 0.4, "reasoning": 0.45, "text": 0.15}


def stage1_mix(short_fraction: float) -> dict[str, float]:
    """Descriptive instructions with `short_fraction` of short perception answers."""
    return {"descriptive": 1.0 - short_fraction, "perception": short_fraction}


def heldout_rows(group: str, num: int, seed: int = 0, image_size: int = 48) -> list[Row]:
    """A held-out set of one group: rows of the "test" split (Row.split)."""
    return sample_rows(num, {group: 1.0}, seed=seed * 1000 + 101 + GROUPS.index(group), image_size=image_size,
                       split="test")


def normalize_answer(text: str) -> str:
    """Exact match up to case, surrounding space and a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def corpus_text() -> str:
    """Every question and answer word of the world, for a tokenizer whose merges cover it."""
    rng = random.Random(0)
    lines = []
    for group in ("perception", "reasoning", "text", "descriptive"):
        for _ in range(400):
            r = sample_row(rng, group)
            lines += [r.question, r.answer]
    lines += [f"The answer is {w}." for w in (*SHAPES, *COLOURS, *NUMBERS, "yes", "no", "none")]
    lines += [cell_name(r, c) for r in range(GRID) for c in range(GRID)]
    lines += ["system\nuser\nassistant\nYou are a helpful assistant."] * 50  # the chat template's words
    return "\n".join(lines) + "\n"
