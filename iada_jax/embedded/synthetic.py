"""A tiny synthetic visual-QA data set in the `trl-lib/llava-instruct-mix` schema.

Why: the training pipeline (reader -> chat template -> image processing -> IADA fine-tuning)
needs end-to-end data that a few-kilobyte model can actually learn, without the hub. Each
image shows 1-3 flat shapes of distinct kinds, colours and positions on a white background,
and each question has a one-word answer that is fully determined by the image, so a falling
loss means the model reads the picture.

Schema (reference notes section 5): `images` = [one image], `prompt` = [{"role": "user",
"content": str}] (plain string, no image placeholder: TRL inserts `{"type": "image"}`),
`completion` = [{"role": "assistant", "content": str}].
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # exact RGB values: drawing is not anti-aliased, so a pixel tells its colour
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUND = (255, 255, 255)
POSITIONS = ("left", "right", "top", "bottom", "center")
# Question kind -> template; every answer is a single word.
QUESTION_KINDS = {
    "colour_of": "What colour is the {shape}?",  # -> colour
    "count": "How many shapes are there?",  # -> "1" | "2" | "3"
    "where": "Where is the {shape}?",  # -> position
    "shape_of": "What shape is {colour}?",  # -> shape
    "is_there": "Is there a {shape}?",  # -> "yes" | "no"
}
NUMBERS = ("1", "2", "3")


@dataclass(frozen=True)
class Item:
    """One drawn shape."""

    shape: str
    colour: str
    position: str


def centre(position: str, size: tuple[int, int]) -> tuple[int, int]:
    """Pixel centre of a position slot: quarter/three-quarter points, so shapes never overlap."""
    w, h = size
    return {
        "left": (w // 4, h // 2), "right": (3 * w // 4, h // 2), "top": (w // 2, h // 4),
        "bottom": (w // 2, 3 * h // 4), "center": (w // 2, h // 2),
    }[position]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill: tuple[int, int, int]) -> None:
    """A circle, square or triangle (apex up; the centre pixel lies inside) spanning 2r+1
    pixels around (cx, cy), not anti-aliased."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render(items: list[Item], size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Draw `items` on a plain background. Slot centres are >= min(size)//4 apart and each shape
    spans 2r+1 pixels with 2r < that spacing, so shapes never touch (r = 7 at 64x64)."""
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = max(1, (min(size) // 4 - 1) // 2)
    for it in items:
        draw_shape(draw, it.shape, *centre(it.position, size), r, COLOURS[it.colour])
    return img


def make_scene(rng: random.Random) -> list[Item]:
    """1-3 items with distinct shapes, colours and positions (so every question is unambiguous)."""
    n = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    positions = rng.sample(POSITIONS, n)
    return [Item(s, c, p) for s, c, p in zip(shapes, colours, positions)]


def ask(items: list[Item], kind: str, rng: random.Random) -> tuple[str, str]:
    """(question, one-word answer) of `kind` about the scene."""
    it = rng.choice(items)
    if kind == "colour_of":
        return QUESTION_KINDS[kind].format(shape=it.shape), it.colour
    if kind == "count":
        return QUESTION_KINDS[kind], str(len(items))
    if kind == "where":
        return QUESTION_KINDS[kind].format(shape=it.shape), it.position
    if kind == "shape_of":
        return QUESTION_KINDS[kind].format(colour=it.colour), it.shape
    if kind == "is_there":
        shape = rng.choice(SHAPES)
        return QUESTION_KINDS[kind].format(shape=shape), "yes" if any(i.shape == shape for i in items) else "no"
    raise ValueError(f"unknown question kind {kind!r}")


def generate(num_rows: int = 256, seed: int = 0, image_size: tuple[int, int] = (64, 64)):
    """Yield (items, kind, question, answer, PIL image) rows; kinds cycle so they stay balanced.

    Exposed so tests (and evaluation) can see the scene behind each data-set row.
    """
    rng = random.Random(seed)
    kinds = list(QUESTION_KINDS)
    for i in range(num_rows):
        items = make_scene(rng)
        kind = kinds[i % len(kinds)]
        question, answer = ask(items, kind, rng)
        yield items, kind, question, answer, render(items, tuple(image_size))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def features():
    """The `datasets` features of llava-instruct-mix (images as a list of Image)."""
    import datasets

    msg = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features({
        "images": datasets.List(datasets.Image()),
        "prompt": datasets.List(msg),
        "completion": datasets.List(msg),
    })


def make_synthetic_dataset(
    out_dir: str, num_rows: int = 256, seed: int = 0, image_size: tuple[int, int] = (64, 64)
) -> str:
    """Write `out_dir/train.parquet` (deterministic in `seed`) and return its path.

    Load it with `datasets.load_dataset("parquet", data_files=path, split="train")`.
    """
    import datasets

    cols = {"images": [], "prompt": [], "completion": []}
    for _, _, question, answer, img in generate(num_rows, seed, image_size):
        cols["images"].append([{"bytes": png_bytes(img), "path": None}])
        cols["prompt"].append([{"role": "user", "content": question}])
        cols["completion"].append([{"role": "assistant", "content": answer}])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train.parquet")
    datasets.Dataset.from_dict(cols, features=features()).to_parquet(path)
    return path


def corpus_text() -> str:
    """English text for training the tiny BPE tokenizer: every question and answer word
    (each in its data-set spelling and spacing) plus some general prose, so the learned
    merges serve the synthetic data and ordinary chat text alike."""
    lines = [
        "The quick brown fox jumps over the lazy dog. What is in the image ?",
        "This picture shows simple shapes on a white background. Look at the image and answer",
        "the question with one word. There is a circle, a square and a triangle in this picture.",
        "You are a helpful assistant. Describe the image. The answer is short.",
    ]
    for kind, template in QUESTION_KINDS.items():
        for shape in SHAPES:
            for colour in COLOURS:
                lines.append(template.format(shape=shape, colour=colour))
    words = list(SHAPES) + list(COLOURS) + list(POSITIONS) + list(NUMBERS) + ["yes", "no"]
    lines += [f"The answer is {w}. {w}" for w in words]
    for shape in SHAPES:
        for colour in COLOURS:
            for pos in POSITIONS:
                lines.append(f"The {colour} {shape} is at the {pos} of the image.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m iada_jax.embedded.synthetic",
                                 description="Write OUT_DIR/train.parquet: synthetic visual questions (llava-instruct-mix schema).")
    ap.add_argument("out_dir")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64, help="square images of this many pixels per side")
    args = ap.parse_args(argv)
    path = make_synthetic_dataset(args.out_dir, args.rows, args.seed, (args.image_size, args.image_size))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
