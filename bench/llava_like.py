"""A llava-instruct-mix-like data set at real scale, generated (nothing is downloaded), and a
tokenizer of realistic size to read it with.

    python -m bench.llava_like OUT --rows 259000 [--layout trl-lib|h4] [--shard-rows 10000]

Rows follow `trl-lib/llava-instruct-mix` (images + prompt + completion, plain-string content)
or `HuggingFaceH4/llava-instruct-mix-vsft` (images + messages with image entries). Each row has
one JPEG of a COCO-like size (640x480, 640x427, 480x640, 500x375, ...; about 10% small book-cover
sized images as OCR-VQA's), real JPEG bytes: a pool of textured base images, each row's bytes
made distinct by a comment segment carrying its row number (so no storage layer can share
them). Conversations mix the LLaVA kinds: multi-turn conversation, detailed description, and
short-answer VQA rounds ("Answer the question using a single word or phrase."), with total
message text at most 1000 characters (trl-lib's filter).

`bench_tokenizer(path)` trains a 32K byte-level BPE on generated text, with Qwen2's
pre-tokenisation pattern, Qwen's special tokens and the original Qwen3-VL-Instruct chat
template (TRL's copy): the real 151K Qwen vocabulary is not available offline, so token counts
are realistic in kind, not identical to Qwen's.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import sys
import time

import numpy as np

# (width, height, weight): COCO's common sizes, and small OCR-VQA-like covers.
SIZES = [(640, 480, 34), (640, 427, 20), (480, 640, 10), (427, 640, 5), (500, 375, 8), (640, 360, 5),
         (612, 612, 4), (640, 512, 4), (300, 450, 6), (260, 400, 4)]
POOL = 96  # base JPEGs
SYLLABLES = ["ka", "lo", "mi", "ten", "ra", "so", "vi", "du", "ne", "pa", "tor", "en", "al", "ri", "co", "man", "sa",
             "le", "the", "on", "in", "at", "bro", "wa", "ter", "ple", "str", "ing", "ed", "ly", "ous", "ion"]
COMMON = ("the a an of in on at with and is are was to for by this that there what which how many where "
          "who why image picture person man woman car dog cat table street building sky tree people red blue "
          "green white black left right front behind holding wearing sitting standing looking two three one")


def vocabulary(seed: int = 0, size: int = 4000) -> list[str]:
    rng = random.Random(seed)
    words = set(COMMON.split())
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


class Text:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = vocabulary()
        common = COMMON.split()
        # Zipf-like: frequent words first
        weights = [8.0 if w in common else 1.0 / (1 + i % 500) for i, w in enumerate(self.words)]
        self.cum = list(np.cumsum(weights))

    def sentence(self, lo: int, hi: int, end: str = ".") -> str:
        n = self.rng.randint(lo, hi)
        words = self.rng.choices(self.words, cum_weights=self.cum, k=n)
        text = " ".join(words)
        if self.rng.random() < 0.3:
            text += f", {self.rng.randint(1, 99)}"
        return text[0].upper() + text[1:] + end

    def paragraph(self, lo_words: int, hi_words: int) -> str:
        out, target = [], self.rng.randint(lo_words, hi_words)
        while sum(len(s.split()) for s in out) < target:
            out.append(self.sentence(5, 16))
        return " ".join(out)


def conversation(text: Text) -> list[tuple[str, str]]:
    """(question, answer) rounds of one of the LLaVA kinds, at most 1000 characters in all."""
    kind = text.rng.choices(("conversation", "detail", "vqa"), (40, 15, 45))[0]
    if kind == "conversation":
        rounds = [(text.sentence(6, 18, "?"), text.paragraph(15, 70)) for _ in range(text.rng.randint(1, 4))]
    elif kind == "detail":
        rounds = [(text.sentence(5, 10, "."), text.paragraph(60, 140))]
    else:
        rounds = [(text.sentence(4, 10, "?") + "\nAnswer the question using a single word or phrase.",
                   text.sentence(1, 3, "")) for _ in range(text.rng.randint(1, 8))]
    while len(rounds) > 1 and sum(len(q) + len(a) for q, a in rounds) > 1000:
        rounds.pop()
    q, a = rounds[0]
    if len(q) + len(a) > 1000:
        rounds = [(q, a[: 1000 - len(q)])]
    return rounds


@functools.lru_cache(maxsize=2)  # once per process
def base_jpegs(seed: int = 0, size: tuple[int, int] | None = None) -> list[bytes]:
    """POOL textured JPEGs (smooth gradients, shapes, sensor-like noise) of the COCO-like sizes,
    or all of one (width, height)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    sizes = [s for s in SIZES for _ in range(max(1, POOL * s[2] // sum(x[2] for x in SIZES)))][:POOL]
    if size is not None:
        sizes = [(size[0], size[1], 1)] * POOL
    out = []
    for w, h, _ in sizes:
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * 90 + 128 + 40 * np.cos(5 * y)
                         for _ in range(3)], -1)
        image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            draw.ellipse([x0, y0, x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))],
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def unique(jpeg: bytes, row: int) -> bytes:
    """The same picture with a comment segment naming the row: distinct bytes, same pixels."""
    comment = f"row {row}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def make_rows(start: int, stop: int, layout: str, pool: list[bytes], seed: int) -> list[dict]:
    text = Text(seed * 1_000_003 + start)
    rows = []
    for r in range(start, stop):
        image = {"bytes": unique(pool[(r * 7919) % len(pool)], r), "path": None}
        rounds = conversation(text)
        if layout == "trl-lib":
            prompt = []
            for q, a in rounds[:-1]:
                prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            prompt.append({"role": "user", "content": rounds[-1][0]})
            rows.append({"images": [image], "prompt": prompt,
                         "completion": [{"role": "assistant", "content": rounds[-1][1]}]})
        else:
            messages = []
            for i, (q, a) in enumerate(rounds):
                content = ([{"index": 0, "text": None, "type": "image"}] if i == 0 else []) + [
                    {"index": None, "text": q, "type": "text"}]
                messages += [{"role": "user", "content": content},
                             {"role": "assistant", "content": [{"index": None, "text": a, "type": "text"}]}]
            rows.append({"images": [image], "messages": messages})
    return rows


def _features(layout: str):
    import datasets

    return datasets.Features({"images": datasets.List(datasets.Image())} | (
        {"prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
         "completion": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
        if layout == "trl-lib" else
        {"messages": [{"role": datasets.Value("string"), "content": [{"index": datasets.Value("int64"),
                                                                      "text": datasets.Value("string"),
                                                                      "type": datasets.Value("string")}]}]}))


def _write_shard(job) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, start, stop, layout, seed, size = job
    pool = base_jpegs(seed, size)
    schema = _features(layout).arrow_schema  # carries the `datasets` features (Image) in its metadata
    pq.write_table(pa.Table.from_pylist(make_rows(start, stop, layout, pool, seed), schema=schema), path + ".tmp",
                   row_group_size=1000)
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)


def write(out: str, rows: int, layout: str = "trl-lib", shard_rows: int = 10000, seed: int = 0, processes: int = 2,
          image_size: tuple[int, int] | None = None, log=print) -> str:
    """Parquet shards train-XXXXX-of-YYYYY.parquet in `out` (the hub's layout); returns `out`."""
    import multiprocessing

    os.makedirs(out, exist_ok=True)
    shards = (rows + shard_rows - 1) // shard_rows
    jobs = [(os.path.join(out, f"train-{k:05d}-of-{shards:05d}.parquet"), k * shard_rows,
             min(rows, (k + 1) * shard_rows), layout, seed, image_size) for k in range(shards)]
    t0, total, done = time.perf_counter(), 0, 0
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for job, size in zip(jobs, pool.imap(_write_shard, jobs)):
            total, done = total + size, done + job[2] - job[1]
            log(f"llava_like: {done}/{rows} rows, {total / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(out, "llava_like.json"), "w") as f:
        json.dump({"rows": rows, "layout": layout, "seed": seed, "bytes": total, "mean_row_bytes": total / max(rows, 1),
                   "seconds": time.perf_counter() - t0}, f)
    return out


def bench_tokenizer(path: str, vocab_size: int = 32000) -> str:
    """A Qwen-like tokenizer folder (BPE trained on generated text, Qwen special tokens and ids'
    order, the original Qwen3-VL chat template); built once."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import trl

    text = Text(12345)  # not the data's seed
    corpus = [" ".join(q + " " + a for q, a in conversation(text)) for _ in range(20000)]
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen_split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3_vl.jinja")).read()
    fast.save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llava_like", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=259_000)
    ap.add_argument("--layout", choices=("trl-lib", "h4"), default="trl-lib")
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", help="WIDTHxHEIGHT for every image (default: the COCO-like mix)")
    args = ap.parse_args(argv)
    size = tuple(int(x) for x in args.image_size.split("x")) if args.image_size else None
    write(args.out, args.rows, args.layout, args.shard_rows, args.seed, image_size=size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
