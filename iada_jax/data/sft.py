"""Visual-instruction SFT examples: read rows, render them with the checkpoint's chat
template, expand image placeholders, and mark the supervised tokens.

Two row schemas:
- `trl-lib/llava-instruct-mix`: `images` (list of images), `prompt` (messages before the
  answer), `completion` (the answer message). As TRL's VLM collator: the images go before
  the text of the first user message; the loss covers only the completion, i.e. the answer
  plus `<|im_end|>\\n` (QWEN3VL_REFERENCE.md §5).
- `messages` (+ optional `images`): a whole conversation; every assistant turn is supervised
  (its text and `<|im_end|>\\n`), everything else is context.
Images are PIL images, `{"bytes", "path"}` dicts (the `datasets` Image storage) or paths.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

from iada_jax.data.image_processing import ImageProcessorConfig, preprocess_images, smart_resize

IMAGE_PAD = "<|image_pad|>"


class BadRow(ValueError):
    """A row that cannot become a training example; `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass
class Example:
    """One tokenised sample: ids [T], loss_mask [T] (1 = supervised), its images' pixels."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    pixel_values: np.ndarray | None  # [N, patch_dim]
    image_grid_thw: np.ndarray | None  # [I, 3]


def _open(item) -> Image.Image:
    if isinstance(item, dict) and item.get("bytes") is not None:
        return Image.open(io.BytesIO(item["bytes"]))
    if isinstance(item, dict) and item.get("path"):
        return Image.open(item["path"])
    if isinstance(item, (str, os.PathLike)):
        return Image.open(item)
    raise BadRow("bad_image", f"cannot read an image from {type(item).__name__}")


def load_image(item, decode: bool = True) -> Image.Image:
    """An RGB PIL image from a PIL image, {"bytes", "path"} or a path. decode=False checks
    the file's integrity (PIL verify) and returns it opened but not decoded (size known)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB") if decode else item
    try:
        image = _open(item)
        if not decode:
            image.verify()  # consumes the file object: reopen for the caller
            return _open(item)
        image.load()
    except BadRow:
        raise
    except Exception as e:  # missing, truncated or corrupt files
        raise BadRow("bad_image", f"unreadable image ({e})") from None
    return image.convert("RGB")


def _grid(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return (1, h // cfg.patch_size, w // cfg.patch_size)


def _with_images(messages: list[dict], n_images: int) -> list[dict]:
    """TRL `prepare_multimodal_messages`: image items before the text of the first user message."""
    out, placed = [], n_images == 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not placed and m["role"] == "user":
            content = [{"type": "image"}] * n_images + list(content)
            placed = True
        out.append({"role": m["role"], "content": content})
    if not placed:
        raise BadRow("no_user_turn", "images given but no user message to put them in")
    return out


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def render_segments(tokenizer, row: dict, n_images: int) -> list[tuple[str, bool]]:
    """The row's text as (segment, supervised) pairs, images as single `<|image_pad|>`s."""
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not completion or not any(str(m.get("content") or "").strip() for m in completion):
            raise BadRow("empty_completion", "the completion is empty")
        prompt = _with_images(prompt, n_images)
        completion = _with_images(completion, 0)
        p = _render(tokenizer, prompt, add_generation_prompt=True)
        pc = _render(tokenizer, prompt + completion)
        p = _common_prefix(p, pc)
        return [(p, False), (pc[len(p):], True)]
    if "messages" in row:
        messages = _with_images(row["messages"], n_images)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("empty_completion", "the conversation has no assistant turn")
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, messages[: i + 1])
            segments.append((before[len(done):], False))
            segments.append((after[len(before):], True))
            done = after
        return segments
    raise BadRow("bad_schema", f"row has columns {sorted(row)}; expected prompt+completion or messages")


def build_example(tokenizer, row: dict, image_config: ImageProcessorConfig, merge_size: int,
                  max_length: int, with_pixels: bool = True) -> Example:
    """Render, expand placeholders to the grid's token count, tokenise, mask. Raises BadRow."""
    try:
        images = [load_image(x, decode=with_pixels) for x in (row.get("images") or [])]
    except BadRow:
        raise
    except Exception as e:  # missing file, unknown format
        raise BadRow("bad_image", str(e)) from None
    pixel_values = grid = None
    counts = []
    if images:
        try:
            if with_pixels:
                pixel_values, grid = preprocess_images(images, image_config)
            else:
                grid = np.asarray([_grid(im, image_config) for im in images], np.int64)
        except ValueError as e:  # e.g. an extreme aspect ratio
            raise BadRow("bad_image", str(e)) from None
        counts = [int(np.prod(g)) // merge_size**2 for g in grid]
    segments = render_segments(tokenizer, row, len(images))
    ids, mask, k = [], [], 0
    for text, supervised in segments:
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 + k > len(counts):
            raise BadRow("placeholder_mismatch", "more image placeholders than images")
        expanded = pieces[0]
        for piece in pieces[1:]:
            expanded += IMAGE_PAD * counts[k] + piece
            k += 1
        tokens = tokenizer(expanded, add_special_tokens=False)["input_ids"]
        ids += tokens
        mask += [int(supervised)] * len(tokens)
    if k != len(counts):
        raise BadRow("placeholder_mismatch", f"{len(counts)} images but {k} placeholders in the rendered text")
    first_supervised = mask.index(1) if 1 in mask else len(mask)
    if first_supervised >= max_length:
        raise BadRow("too_long", f"the prompt is {first_supervised} tokens (images included), max_length={max_length}")
    if not any(mask):
        raise BadRow("empty_completion", "no supervised token")
    # Truncate the answer, never the prompt (cutting image tokens would break the grid match).
    ids, mask = ids[:max_length], mask[:max_length]
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32),
                   pixel_values if with_pixels else None, grid)
