"""Visual-instruction SFT examples: read rows, render them with the checkpoint's chat
template, expand image placeholders, and mark the supervised tokens. The reference is TRL
1.16's `DataCollatorForVisionLanguageModeling` (trl/trainer/sft_trainer.py) with
`prepare_multimodal_messages` (trl/data_utils.py): same tokens, same labels.

Two row layouts:
- prompt/completion (`trl-lib/llava-instruct-mix`): `images`, `prompt` (the messages before
  the answer), `completion` (the answer message). The loss covers only the completion, i.e.
  the answer plus `<|im_end|>\\n` (TRL's `completion_only_loss`, its default for this layout).
- `messages` (`HuggingFaceH4/llava-instruct-mix-vsft`): a whole conversation. TRL supervises
  every token but padding (`messages_loss="all"`, its default); `"assistant"` supervises only
  the assistant turns (text and `<|im_end|>\\n`), what TRL's `assistant_only_loss` does with a
  template that has generation markers (Qwen3-VL's has none).
Images: as TRL, `{"type": "image"}` entries already in the content stay where they are and take
the row's images in order; only when a user message has plain-string content are the images
put before its text (the first such message). A count mismatch is a bad row.

Image items are PIL images, `{"bytes", "path"}` dicts (the `datasets` Image storage) or paths.
Every problem with a row is a `BadRow` with a reason (the skip counter's key), never a crash.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from iada_jax.data.image_processing import ImageProcessorConfig, normalize_table, preprocess_images, smart_resize

IMAGE_PAD = "<|image_pad|>"
MESSAGES_LOSS = ("all", "assistant")
HEADER_BYTES = 1 << 16  # image headers are read from this prefix of the bytes (the whole file if needed)


class BadRow(ValueError):
    """A row that cannot become a training example; `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Example:
    """One tokenised sample: ids [T], loss_mask [T] (1 = supervised), its images' pixels."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    pixel_values: np.ndarray | None  # [N, patch_dim] float32, or uint8 with pixel_table
    image_grid_thw: np.ndarray | None  # [I, 3]
    pixel_table: np.ndarray | None = None  # [C, 256]: normalises uint8 pixel_values (VisionInputs)


# ---------------------------------------------------------------------- images
def row_images(row: dict) -> list:
    """The row's image items: an `images` list, or a single `image` (as TRL accepts)."""
    items = row.get("images")
    if items is None and row.get("image") is not None:
        items = [row["image"]]
    return list(items or [])


def _open(item, prefix: bool = False) -> Image.Image:
    if isinstance(item, dict) and item.get("bytes") is not None:
        data = item["bytes"]
        return Image.open(io.BytesIO(data[:HEADER_BYTES] if prefix else data))
    if isinstance(item, dict) and item.get("path"):
        return Image.open(item["path"])
    if isinstance(item, (str, os.PathLike)):
        return Image.open(item)
    raise BadRow("bad_image", f"cannot read an image from {type(item).__name__}")


def _unreadable(e: Exception) -> BadRow:
    if isinstance(e, UnidentifiedImageError):  # its message holds a memory address: say it plainly
        return BadRow("bad_image", "unreadable image (not a format PIL can read)")
    return BadRow("bad_image", f"unreadable image ({type(e).__name__}: {e})")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data) -> tuple[int, int] | None:
    """(height, width) of a JPEG (its frame header) or PNG (IHDR) from its first bytes, as PIL
    reports them; None for other formats or a header beyond HEADER_BYTES (then PIL reads it).
    Reads 2 KB first (a typical JPEG's frame header is within its first few hundred bytes),
    so the index touches one page of each image."""
    for window in (2048, HEADER_BYTES):
        b = bytes(data[:window])
        size = _header_size(b)
        if size != "more":
            return size
        if len(b) < window:  # the whole file was read
            return None
    return None


def _header_size(b: bytes):
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR" and len(b) >= 24:
        w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
        return (h, w) if h and w else None
    if b[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(b)
    while i + 9 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            h, w = int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big")
            return (h, w) if h and w else None
        if marker in (0xD9, 0xDA):  # end of image or start of scan before a frame header
            return None
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return "more"  # the frame header lies beyond these bytes


def image_size(item) -> tuple[int, int]:
    """(height, width) from the image's header; pixels are not decoded."""
    if isinstance(item, Image.Image):
        return item.height, item.width
    if isinstance(item, dict) and item.get("bytes") is not None:
        size = header_size(item["bytes"])
        if size is not None:
            return size
    path = item.get("path") if isinstance(item, dict) and item.get("bytes") is None else item
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        with open(path, "rb") as f:
            size = header_size(f.read(HEADER_BYTES))
        if size is not None:
            return size
    try:
        try:
            with _open(item, prefix=True) as image:
                return image.height, image.width
        except BadRow:
            raise
        except Exception:  # a header longer than the prefix: read it from the whole file
            with _open(item) as image:
                return image.height, image.width
    except BadRow:
        raise
    except Exception as e:  # missing, unknown or corrupt files
        raise _unreadable(e) from None


def load_image(item) -> Image.Image:
    """The decoded RGB image of a PIL image, {"bytes", "path"} or a path."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    try:
        image = _open(item)
        image.load()
    except BadRow:
        raise
    except Exception as e:  # missing, truncated or corrupt files
        raise _unreadable(e) from None
    return image if image.mode == "RGB" else image.convert("RGB")  # convert copies even an RGB image


def image_grid(size: tuple[int, int], cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the processor gives an image of this (height, width)."""
    try:
        h, w = smart_resize(size[0], size[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:  # e.g. an extreme aspect ratio
        raise BadRow("bad_image", str(e)) from None
    return (1, h // cfg.patch_size, w // cfg.patch_size)


# ---------------------------------------------------------------------- rendering
def prepare_messages(messages: list[dict], n_images: int) -> list[dict]:
    """TRL `prepare_multimodal_messages` without the image payloads: content as lists of parts;
    `n_images` image entries before the text of the first user message with plain-string
    content; existing `{"type": "image"}` entries kept in place. The entries must number
    `n_images`."""
    out, included = [], False
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role == "user":
            if isinstance(content, str) and not included:
                m = {**m, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": content}]}
                included = True
            elif isinstance(content, str):
                m = {**m, "content": [{"type": "text", "text": content}]}
        elif role in ("assistant", "system", "tool"):
            if isinstance(content, str):
                m = {**m, "content": [{"type": "text", "text": content}]}
        else:
            raise BadRow("bad_role", f"message role {role!r}; expected system, user, assistant or tool")
        out.append(m)
    entries = sum(sum(1 for part in m["content"] if part.get("type") == "image" and "image" not in part)
                  for m in out if m.get("content") and m["role"] != "tool")
    if entries != n_images:
        raise BadRow("placeholder_mismatch", f"{n_images} images but {entries} image entries in the messages")
    return out


def _apply_chat_template(tokenizer, messages, add_generation_prompt=False, continue_final_message=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)


class ChatRenderer:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)`, faster on plain rows: the
    same compiled template (transformers' cache) called with what apply_chat_template passes it
    (messages without None-valued keys, tools=None, documents=None, the special tokens), minus
    the defensive deep copy of the messages, which is an identity for rows read from Arrow
    (str, int, None, lists, dicts). Reasoning fields and continued final messages, which
    apply_chat_template rewrites, go through it. The first VERIFY renders are compared with
    apply_chat_template's and any difference switches the fast path off for good."""

    VERIFY = 64

    def __init__(self, tokenizer):
        from transformers.utils import chat_template_utils as ctu

        self.tokenizer, self.checked = tokenizer, 0
        try:
            self.compiled = ctu._compile_jinja_template(tokenizer.get_chat_template())
            self.kwargs = ctu._plain_template_data(dict(tokenizer.special_tokens_map))
            self.reasoning = tuple(getattr(ctu, "_REASONING_FIELDS", ("reasoning_content", "thinking", "reasoning")))
            self.fast = True
        except Exception:  # no template, or a transformers without these internals
            self.fast = False

    def __call__(self, messages, add_generation_prompt=False, continue_final_message=False) -> str:
        if (not self.fast or continue_final_message or not messages
                or any(key in m for m in messages for key in self.reasoning)):
            return _apply_chat_template(self.tokenizer, messages, add_generation_prompt, continue_final_message)
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        out = self.compiled.render(messages=plain, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.kwargs)
        if self.checked < self.VERIFY:
            self.checked += 1
            reference = _apply_chat_template(self.tokenizer, messages, add_generation_prompt)
            if reference != out:
                self.fast = False
                return reference
        return out


_RENDERERS: dict[tuple[int, str], ChatRenderer] = {}


def _render(tokenizer, messages, add_generation_prompt=False, continue_final_message=False) -> str:
    key = (id(tokenizer), tokenizer.chat_template or "")
    renderer = _RENDERERS.get(key)
    if renderer is None or renderer.tokenizer is not tokenizer:
        renderer = _RENDERERS[key] = ChatRenderer(tokenizer)
    return renderer(messages, add_generation_prompt, continue_final_message)


def _common_prefix(a: str, b: str) -> str:
    if b.startswith(a):  # the usual case, in C
        return a
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _segments(tokenizer, row: dict, n_images: int, messages_loss: str) -> list[tuple[str, bool]]:
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) or isinstance(completion, str):
            raise BadRow("bad_schema", "prompt and completion must be lists of messages")
        if not completion or not any(_has_text(m.get("content")) for m in completion):
            raise BadRow("empty_completion", "the completion is empty")
        if not prompt:
            raise BadRow("bad_schema", "the prompt has no message")
        prompt = prepare_messages(prompt, n_images)
        completion = prepare_messages(completion, 0)
        # As TRL's `apply_chat_template` (trl/data_utils.py): a prompt ending with an assistant
        # message is continued, one ending with user or tool gets the generation prompt.
        last = prompt[-1]["role"]
        if last not in ("user", "tool", "assistant"):
            raise BadRow("bad_schema", f"the prompt ends with a {last!r} message")
        p = _render(tokenizer, prompt, add_generation_prompt=last != "assistant",
                    continue_final_message=last == "assistant")
        pc = _render(tokenizer, prompt + completion)
        p = _common_prefix(p, pc)
        return [(p, False), (pc[len(p):], True)]
    if "messages" in row:
        messages = prepare_messages(row["messages"], n_images)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("empty_completion", "the conversation has no assistant turn")
        if messages_loss == "all":
            return [(_render(tokenizer, messages), True)]
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, messages[: i + 1])
            if not after.startswith(done) or not after.startswith(before):
                raise BadRow("render_error", "the chat template does not render the conversation incrementally")
            segments.append((before[len(done):], False))
            segments.append((after[len(before):], True))
            done = after
        return segments
    raise BadRow("bad_schema", f"row has columns {sorted(row)}; expected prompt+completion or messages")


def _has_text(content) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(isinstance(p, dict) and str(p.get("text") or "").strip() for p in content or [])


def render_segments(tokenizer, row: dict, n_images: int, messages_loss: str = "all") -> list[tuple[str, bool]]:
    """The row's text as (segment, supervised) pairs, each image as one `<|image_pad|>`.
    Anything the chat template raises is a `render_error` bad row."""
    if messages_loss not in MESSAGES_LOSS:
        raise ValueError(f"messages_loss={messages_loss!r}; expected one of {MESSAGES_LOSS}")
    try:
        return _segments(tokenizer, row, n_images, messages_loss)
    except BadRow:
        raise
    except Exception as e:  # the template's own raise_exception, a missing key, a malformed message
        raise BadRow("render_error", f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------- tokens
def assemble(segment_ids: list[list[int]], supervised: list[bool], counts: list[int], pad_id: int,
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask from the tokenised segments (see `expand`). Raises BadRow."""
    ids = np.fromiter(itertools.chain.from_iterable(segment_ids), np.int32)
    mask = np.repeat(np.asarray(supervised, np.int32), [len(s) for s in segment_ids])
    return expand(ids, mask, counts, pad_id, max_length)


def expand(ids: np.ndarray, mask: np.ndarray, counts: list[int], pad_id: int,
           max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The row's tokens with each `<|image_pad|>` (tokenised alone) repeated to its image's token
    count, as the processor's expansion does (the pad is a special token, so expanding before or
    after tokenising gives the same ids), checked and truncated. Raises BadRow."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    pads = np.flatnonzero(ids == pad_id)
    if len(pads) != len(counts):
        raise BadRow("placeholder_mismatch", f"{len(counts)} images but {len(pads)} placeholders in the rendered text")
    if len(pads):
        repeats = np.ones(len(ids), np.int64)
        repeats[pads] = counts
        ids, mask = np.repeat(ids, repeats), np.repeat(mask, repeats)
    if not mask.any():
        raise BadRow("empty_completion", "no supervised token")
    first = int(np.argmax(mask))
    if first >= max_length:
        raise BadRow("too_long", f"the prompt is {first} tokens (images included), max_length={max_length}")
    if len(pads) and int(np.flatnonzero(ids == pad_id)[-1]) >= max_length:
        raise BadRow("too_long", f"image tokens reach past max_length={max_length}")
    # Truncate the supervised tail only, never an image (cutting image tokens breaks the grid match).
    return ids[:max_length], mask[:max_length]


def expanded_length(segment_ids: list[list[int]], supervised: list[bool], counts: list[int], pad_id: int,
                    max_length: int) -> int:
    """len(assemble(...)[0]), raising the same BadRows, without building the arrays: the
    index's version (tested equal on every row of the index tests)."""
    pads = [s.count(pad_id) for s in segment_ids]
    if sum(pads) != len(counts):
        raise BadRow("placeholder_mismatch", f"{len(counts)} images but {sum(pads)} placeholders in the rendered text")
    offset, k, first, last_image = 0, 0, None, -1
    for ids, sup, n in zip(segment_ids, supervised, pads):
        if sup and ids and first is None:
            first = offset
        extra = sum(counts[k:k + n]) - n
        if n:
            last_image = offset + len(ids) - 1 - ids[::-1].index(pad_id) + extra
        offset += len(ids) + extra
        k += n
    if first is None:
        raise BadRow("empty_completion", "no supervised token")
    if first >= max_length:
        raise BadRow("too_long", f"the prompt is {first} tokens (images included), max_length={max_length}")
    if last_image >= max_length:
        raise BadRow("too_long", f"image tokens reach past max_length={max_length}")
    return min(offset, max_length)


def tokenize_segments(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`. For a fast tokenizer whose backend
    neither truncates nor pads (what that call sets up), the backend's batch encoding without
    offsets, which gives the same ids in about 40% of the time (the index's largest cost)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def example_pixels(items: list, image_config: ImageProcessorConfig, merge_size: int, with_pixels: bool = True,
                   raw_pixels: bool = False) -> tuple[np.ndarray | None, np.ndarray | None, list[int]]:
    """(pixel_values, image_grid_thw, visual tokens per image) of a row's image items: decoded
    and preprocessed, or (with_pixels=False) only their grids from the headers. Raises BadRow."""
    if not items:
        return None, None, []
    pixel_values = None
    if with_pixels:
        images = [load_image(x) for x in items]
        try:
            pixel_values, grid = preprocess_images(images, image_config, raw=raw_pixels)
        except ValueError as e:  # e.g. an extreme aspect ratio
            raise BadRow("bad_image", str(e)) from None
    else:
        grid = np.asarray([image_grid(image_size(x), image_config) for x in items], np.int64)
    return pixel_values, grid, [int(np.prod(g)) // merge_size**2 for g in grid]


def build_example(tokenizer, row: dict, image_config: ImageProcessorConfig, merge_size: int,
                  max_length: int, with_pixels: bool = True, messages_loss: str = "all",
                  raw_pixels: bool = False) -> Example:
    """Render, tokenise, expand placeholders to the grid's token count, mask. Raises BadRow.
    raw_pixels: uint8 pixel rows and the table that normalises them on the device (training
    batches: an eighth of the bytes), else the processor's float32 rows."""
    items = row_images(row)
    pixel_values, grid, counts = example_pixels(items, image_config, merge_size, with_pixels, raw_pixels)
    segments = render_segments(tokenizer, row, len(items), messages_loss)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    ids, mask = assemble(tokenize_segments(tokenizer, [t for t, _ in segments]), [s for _, s in segments],
                         counts, pad_id, max_length)
    table = normalize_table(image_config) if raw_pixels and pixel_values is not None else None
    return Example(ids, mask, pixel_values, grid, table)
