"""The tiny tokenizer and the synthetic llava-instruct-mix data set.

Why: the end-to-end training tests rely on (a) token ids that fit the tiny models' 300-id
vocabulary with Qwen3-VL's special tokens at the ids `tiny_hf` declares, (b) a chat template
that renders byte-for-byte like Qwen3-VL-Instruct's, and (c) data whose answers really are
determined by the image. The image checks below re-derive every answer from the pixels alone.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from iada_jax.embedded.synthetic import COLOURS, POSITIONS, QUESTION_KINDS, centre, make_synthetic_dataset
from iada_jax.embedded.tiny_hf import SPECIAL_IDS, TEXT_VOCAB
from iada_jax.embedded.tiny_tokenizer import build_tokenizer

IMAGE_Q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image ?"}]}]
IMAGE_Q_RENDERED = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image ?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEXTS = ["What colour is the circle?", "Hello,  world !\n\tx = 1 + 2 ; done.", " leading space", "a" * 50, ""]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    return path, build_tokenizer(path)


@pytest.fixture(scope="module")
def reloaded(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("syn")
    path = make_synthetic_dataset(str(root / "out"), num_rows=60, seed=0)
    return path, datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(root / "cache"))


def test_special_token_ids(tok_dir):
    tok = tok_dir[1]
    expected = {"<|endoftext|>": 280, "<|im_start|>": 281, "<|im_end|>": 282, "<|vision_pad|>": 294,
                "<|image_pad|>": SPECIAL_IDS["image_token_id"], "<|video_pad|>": SPECIAL_IDS["video_token_id"],
                "<|vision_start|>": SPECIAL_IDS["vision_start_token_id"],
                "<|vision_end|>": SPECIAL_IDS["vision_end_token_id"]}
    for t, i in expected.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]  # one id when it appears in text
    assert len(tok) == 300 and sorted(tok.get_vocab().values()) == list(range(300))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 282
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 280
    assert tok.bos_token is None and tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(list(range(283, 290)) + list(range(295, 300))) == [
        f"<|reserved_{k}|>" for k in range(12)]


def test_ordinary_tokens_below_text_vocab(tok_dir):
    tok = tok_dir[1]
    special = set(tok.all_special_ids) | set(range(TEXT_VOCAB, 300))
    assert {i for t, i in tok.get_vocab().items() if not t.startswith("<|")} == set(range(TEXT_VOCAB))
    assert special == set(range(TEXT_VOCAB, 300))
    assert tok.encode("".join(map(chr, range(32, 127))), add_special_tokens=False)  # no unknowns
    for s in TEXTS:
        assert all(i < TEXT_VOCAB for i in tok.encode(s, add_special_tokens=False))
    # the learned merges serve the data: a question is shorter than its byte count
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())


@pytest.mark.parametrize("s", TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"])
def test_round_trip(tok_dir, s):
    tok = tok_dir[1]
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_chat_template_image_question(tok_dir):
    tok = tok_dir[1]
    assert tok.apply_chat_template(IMAGE_Q, add_generation_prompt=True, tokenize=False) == IMAGE_Q_RENDERED
    ids = tok.apply_chat_template(IMAGE_Q, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok.encode(IMAGE_Q_RENDERED) and ids[6:9] == [292, 290, 293]
    # an `image` / `image_url` key also counts as an image; video items get the video pad
    alt = [{"role": "user", "content": [{"image": "x.png"}, {"image_url": "u"}, {"type": "video"},
                                        {"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(alt, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
        "<|vision_end|><|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n")


def test_chat_template_system_and_turns(tok_dir):
    tok = tok_dir[1]
    convo = [{"role": "user", "content": "What shape is red?"}, {"role": "assistant", "content": "circle"}]
    # no default system prompt
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>user\nWhat shape is red?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n")
    sys_ = [{"role": "system", "content": "Be brief."}]
    assert tok.apply_chat_template(sys_ + convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat shape is red?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>\n")
    # TRL's prompt/completion split: the completion text is "answer<|im_end|>\n"
    p = tok.apply_chat_template(convo[:1], add_generation_prompt=True, tokenize=False)
    pc = tok.apply_chat_template(convo, tokenize=False)
    assert pc.startswith(p) and pc[len(p):] == "circle<|im_end|>\n"


def test_reload_from_disk(tok_dir, reloaded):
    path, tok = tok_dir
    assert os.path.exists(os.path.join(path, "chat_template.jinja"))
    assert reloaded.apply_chat_template(IMAGE_Q, add_generation_prompt=True, tokenize=False) == IMAGE_Q_RENDERED
    for s in TEXTS + [IMAGE_Q_RENDERED]:
        assert reloaded.encode(s) == tok.encode(s)
        assert reloaded.decode(reloaded.encode(s)) == s
    assert (reloaded.eos_token_id, reloaded.pad_token_id, len(reloaded)) == (282, 280, 300)
    assert reloaded.get_vocab() == tok.get_vocab()


def test_tokenizer_deterministic(tok_dir, tmp_path):
    assert build_tokenizer(str(tmp_path)).get_vocab() == tok_dir[1].get_vocab()


def test_dataset_schema(data):
    from PIL import Image

    _, ds = data
    assert ds.column_names == ["images", "prompt", "completion"] and len(ds) == 60
    for row in ds.select(range(5)):
        assert len(row["images"]) == 1 and isinstance(row["images"][0], Image.Image)
        assert row["images"][0].size == (64, 64) and row["images"][0].mode == "RGB"
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert row["prompt"][0]["content"].endswith("?")
        (c,) = row["completion"]
        assert c["role"] == "assistant" and c["content"] and " " not in c["content"]


def test_dataset_deterministic(data, tmp_path):
    import pyarrow.parquet as pq

    path, _ = data
    same = pq.read_table(make_synthetic_dataset(str(tmp_path / "a"), num_rows=60, seed=0))
    other = pq.read_table(make_synthetic_dataset(str(tmp_path / "b"), num_rows=60, seed=1))
    assert same.equals(pq.read_table(path))
    assert not other.equals(same)


def _blobs(img):
    """{colour name: (shape, position, centre pixel RGB)} read off the pixels alone.

    Shapes by how much of their bounding box they fill (square 1, circle ~pi/4, triangle ~1/2);
    position by the slot nearest the bounding-box centre."""
    a = np.asarray(img)
    out = {}
    for name, rgb in COLOURS.items():
        m = (a == rgb).all(-1)
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        fill = m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        pos = min(POSITIONS, key=lambda p: np.hypot(cx - centre(p, img.size)[0], cy - centre(p, img.size)[1]))
        out[name] = (shape, pos, tuple(a[int(cy), int(cx)]))
    # nothing but the background and the shape colours
    assert ((a == 255).all(-1) | np.any([(a == c).all(-1) for c in COLOURS.values()], 0)).all()
    return out


def test_answers_match_images(data):
    _, ds = data
    seen = set()
    for row in ds:
        q, ans = row["prompt"][0]["content"], row["completion"][0]["content"]
        blobs = _blobs(row["images"][0])
        by_shape = {s: (c, p) for c, (s, p, _) in blobs.items()}
        assert len(by_shape) == len(blobs)  # distinct shapes
        word = q.rstrip("?").split()[-1]
        if q == QUESTION_KINDS["count"]:
            kind = "count"
            assert ans == str(len(blobs))
        elif q.startswith("What colour"):
            kind = "colour_of"
            assert by_shape[word][0] == ans and blobs[ans][2] == COLOURS[ans]  # centre pixel colour
        elif q.startswith("Where"):
            kind = "where"
            assert by_shape[word][1] == ans
        elif q.startswith("What shape"):
            kind = "shape_of"
            assert blobs[word][0] == ans
        else:
            kind = "is_there"
            assert q == QUESTION_KINDS[kind].format(shape=word) and ans == ("yes" if word in by_shape else "no")
        seen.add(kind)
    assert seen == set(QUESTION_KINDS)
