"""The row index (data/index.py): the lengths it records are the lengths of the examples the
loader builds, it reads image headers only, it is cached and keyed by everything it depends
on, bad rows are counted with their reason and named, and `train.py --index-only` reports it."""

from __future__ import annotations

import io
import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from iada_jax.data import index as index_mod
from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.index import IndexSettings, build_index
from iada_jax.data.loader import DataConfig, SFTData, open_rows
from iada_jax.data.sft import BadRow, build_example

CFG = ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=1024, max_pixels=4096)


def jpeg(size=(64, 48), seed=0, comment: bytes = b"") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    if comment:  # COM segments right after SOI: the frame header moves past them
        segments = b"".join(b"\xff\xfe" + (len(c) + 2).to_bytes(2, "big") + c
                            for c in [comment[i:i + 60000] for i in range(0, len(comment), 60000)])
        data = data[:2] + segments + data[2:]
    return data


def rows_for_test():
    big_header = jpeg((40, 72), 7, comment=b"x" * 150_000)  # header beyond the 64 KB prefix
    full = jpeg((64, 64), 8)
    truncated = full[:len(full) // 2]  # a valid header, a body cut short: only decoding finds out
    q = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    a = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [
        {"images": [jpeg(seed=1)], "prompt": q("What colour?"), "completion": a("Red.")},
        {"images": [big_header], "prompt": q("Tall or wide?"), "completion": a("Tall, and narrow.")},
        {"images": [], "prompt": q("2+2?"), "completion": a("4")},
        {"images": [b"not an image"], "prompt": q("?"), "completion": a("x")},
        {"images": [jpeg(seed=2)], "prompt": q("Long?"), "completion": a("word " * 300)},  # truncated answer
        {"images": [jpeg(seed=3)], "prompt": q("q " * 200), "completion": a("x")},  # prompt too long
        {"images": [truncated], "prompt": q("Broken?"), "completion": a("Yes.")},
        {"images": [jpeg(seed=4), jpeg(seed=5)], "prompt": q("Two?"), "completion": a("Two.")},
        {"images": [jpeg(seed=6)], "prompt": q("Empty?"), "completion": a("  ")},
    ]
    return [dict(r, images=[{"bytes": b, "path": None} for b in r["images"]]) for r in rows]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "rows.parquet"
    ds = datasets.Dataset.from_list(rows_for_test() * 3)  # 27 rows: several chunks of 4
    ds.cast_column("images", datasets.List(datasets.Image())).to_parquet(str(path))
    return str(path)


def settings(max_length=256, **image):
    return IndexSettings(max_length=max_length, image=ImageProcessorConfig(**{**CFG.__dict__, **image}), merge_size=2)


def test_index_lengths_are_the_loaders_lengths_and_bad_rows_have_reasons(embedded, data_file, tmp_path, monkeypatch):
    _, _, tok, _ = embedded
    rows = open_rows(data_file)
    monkeypatch.setattr(index_mod, "CHUNK", 4)  # 7 chunks over 2 spawned worker processes
    logs = []
    index = build_index(rows, tok, settings(), source=data_file, workers=2, cache_dir=str(tmp_path), log=logs.append)
    assert any("rows/s" in line for line in logs) and any("saved to" in line for line in logs)
    arrow = rows.with_format("arrow")
    for i in range(len(rows)):
        row = arrow[i].to_pylist()[0]
        try:
            ex = build_example(tok, row, CFG, 2, 256, with_pixels=False)
        except BadRow as e:
            assert index.reason_names[index.reasons[i]] == e.reason, i
            assert index.details[i] == e.detail
            continue
        assert index.reasons[i] == 0, (i, index.details.get(i))
        assert index.lengths[i] == len(ex.input_ids), i
        grid = np.zeros((0, 3), np.int64) if ex.image_grid_thw is None else ex.image_grid_thw
        assert index.images[i] == len(grid)
        assert index.visual_tokens[i] == int(np.prod(grid, axis=1).sum()) // 4
    assert dict(index.skipped()) == {"bad_image": 3, "too_long": 3, "empty_completion": 3}
    assert index.lengths[4] == 256  # the answer is cut at max_length, the prompt is whole
    assert index.images[1] == 1 and index.visual_tokens[1] > 0  # the 150 KB header was read in full
    assert index.reasons[6] == 0  # the truncated body is not found without decoding


def test_the_cache_is_reused_and_keyed_by_what_the_index_depends_on(embedded, data_file, tmp_path):
    _, _, tok, _ = embedded
    rows = open_rows(data_file)
    first = build_index(rows, tok, settings(), source=data_file, workers=1, cache_dir=str(tmp_path), log=lambda *a: None)
    logs = []
    again = build_index(rows, tok, settings(), source=data_file, workers=1, cache_dir=str(tmp_path), log=logs.append)
    assert "from the cache" in logs[0] and again.path == first.path
    for name in ("lengths", "images", "visual_tokens", "frame_patches", "reasons", "tokens", "token_mask",
                 "token_offsets"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.details == first.details
    keys = {first.key}
    for changed in (settings(max_length=128), settings(max_pixels=2048), settings(min_pixels=2048),
                    IndexSettings(256, CFG, 2, messages_loss="assistant")):
        keys.add(build_index(rows, tok, changed, source=data_file, workers=1, cache_dir=str(tmp_path),
                             log=lambda *a: None).key)
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    keys.add(build_index(rows, other, settings(), source=data_file, workers=1, cache_dir=str(tmp_path),
                         log=lambda *a: None).key)
    assert len(keys) == 6 and len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 6
    assert build_index(rows, tok, settings(max_length=128), source=data_file, workers=1, cache_dir=str(tmp_path),
                       log=lambda *a: None).lengths[4] == 128


def test_an_image_that_only_decoding_finds_broken_is_an_empty_named_row(embedded, data_file):
    _, _, tok, model = embedded
    logs = []
    data = SFTData(DataConfig(path=data_file, max_length=256, batch_size=2, buckets=(256,), workers=1,
                              max_images=2), tok, CFG, model.config, log=logs.append)
    assert "row 3: bad_image" in logs[-1]  # the log names bad rows
    batch = data.make_batch(256, [6, 0])
    assert any("row 6 is unusable at load time" in line for line in logs)
    assert batch.attention_mask[0].sum() == 0 and batch.loss_mask[0].sum() == 0
    assert batch.attention_mask[1].sum() == data.index.lengths[0]
    described = data.describe()
    assert "skipped        3 bad_image" in described and "row 3:" in described and "padding" in described


def test_train_index_only_reports_and_the_config_records_the_pixel_limits(embedded, tmp_path, capsys):
    import train

    ckpt, data, _, _ = embedded
    rc = train.main(["--model", ckpt, "--data", data, "--out", str(tmp_path / "run"), "--index-only",
                     "--max-length", "128", "--min-pixels", "1024", "--max-pixels", "4096", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "usable: 48" in out and "length bucket" in out and "images per row: 1: 48" in out
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing trained
    # Images enlarged to 16384 pixels (256 visual tokens) push every row past max_length: the
    # limits reach the index, and an unusable data set is an error naming rows.
    rc = train.main(["--model", ckpt, "--data", data, "--out", str(tmp_path / "run"), "--index-only",
                     "--max-length", "128", "--min-pixels", "16384", "--max-pixels", "16384", "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 1 and "no usable rows" in captured.err and "row 0: too_long" in captured.err


def test_config_json_records_pixel_limits_and_index(embedded, tmp_path):
    from iada_jax.train.loop import TrainConfig, fit

    ckpt, data, _, _ = embedded
    cfg = TrainConfig(model=ckpt, data=data, out=str(tmp_path / "r"), dtype="float32", param_dtype="float32",
                      remat="none", max_length=128, buckets=(128,), batch_size=8, grad_accum=1, steps=1,
                      progress=False, workers=1, mesh_data=1, min_pixels=1024, max_pixels=4096, block_size=2)
    fit(cfg, log=lambda *a: None)
    saved = json.load(open(tmp_path / "r" / "config.json"))
    assert saved["train"]["min_pixels"] == 1024 and saved["image"]["max_pixels"] == 4096
    assert saved["index"].endswith(".npz") and os.path.isfile(saved["index"])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "progressive", "cmyk", "exif", "gif"])
def test_header_sizes_equal_pil(fmt):
    from iada_jax.data.sft import header_size, image_size

    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (427, 640), (1, 1), (3000, 17)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
        buf = io.BytesIO()
        if fmt == "progressive":
            image.save(buf, format="JPEG", progressive=True)
        elif fmt == "cmyk":
            image.convert("CMYK").save(buf, format="JPEG")
        elif fmt == "exif":
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated: PIL (and the processor) still report the stored size
            image.save(buf, format="JPEG", exif=exif.tobytes())
        else:
            image.save(buf, format=fmt)
        data = buf.getvalue()
        assert image_size({"bytes": data, "path": None}) == (h, w) == Image.open(io.BytesIO(data)).size[::-1]
        assert header_size(data) == (None if fmt == "gif" else (h, w))


@pytest.mark.parametrize("template", ["embedded", "qwen3_vl"])
def test_fast_rendering_and_tokenising_equal_transformers(embedded, template):
    """The index's renderer (the compiled template called directly) and batch tokenisation (the
    backend without offsets) give apply_chat_template's text and tokenizer()'s ids, past the
    renderer's own verification window."""
    import copy

    import trl

    from iada_jax.data.sft import ChatRenderer, tokenize_segments

    tok = copy.deepcopy(embedded[2])
    if template == "qwen3_vl":
        tok.chat_template = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3_vl.jinja")).read()
    renderer = ChatRenderer(tok)
    rng = np.random.default_rng(0)
    words = ["cat", "on", "the", "mat", "42", "Über", "naïve", "\n", "  ", "?", "<|im_end|>", "x" * 30]
    texts = []
    for k in range(ChatRenderer.VERIFY + 40):
        turns = []
        if k % 3 == 0:
            turns.append({"role": "system", "content": "Be brief.", "name": None})
        for t in range(1 + k % 4):
            say = lambda: " ".join(rng.choice(words, 1 + k % 7))  # noqa: E731
            content = say() if t % 2 else [{"type": "image", "text": None}, {"type": "text", "text": say()}]
            turns += [{"role": "user", "content": content}, {"role": "assistant", "content": say()}]
        gen = k % 2 == 0
        messages = turns[:-1] if gen else turns
        out = renderer(messages, add_generation_prompt=gen)
        assert out == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen), k
        texts.append(out)
    assert renderer.fast and renderer.checked == ChatRenderer.VERIFY
    assert tokenize_segments(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_expanded_length_is_the_assembled_length_with_the_same_refusals():
    from iada_jax.data.sft import assemble, expanded_length

    rng = np.random.default_rng(0)
    pad = 7
    for trial in range(3000):
        segments = [list(rng.choice([1, 2, 3, pad], rng.integers(0, 12), p=[.3, .3, .3, .1]))
                    for _ in range(rng.integers(1, 5))]
        supervised = [bool(x) for x in rng.integers(0, 2, len(segments))]
        n_pads = sum(s.count(pad) for s in segments) + int(rng.integers(-1, 2) if trial % 5 == 0 else 0)
        counts = [int(c) for c in rng.integers(1, 6, max(n_pads, 0))]
        max_length = int(rng.integers(1, 40))
        try:
            want = len(assemble(segments, supervised, counts, pad, max_length)[0])
        except BadRow as e:
            with pytest.raises(BadRow) as got:
                expanded_length(segments, supervised, counts, pad, max_length)
            assert (got.value.reason, got.value.detail) == (e.reason, e.detail), trial
            continue
        assert expanded_length(segments, supervised, counts, pad, max_length) == want, trial


def test_forked_workers_before_jax_starts_give_the_same_index(embedded, data_file, tmp_path):
    """train.py indexes before JAX starts its runtime, so the workers are forked (no start-up);
    in a process whose JAX runtime runs (this one) they are spawned. Same index either way."""
    import subprocess
    import sys

    _, _, tok, _ = embedded
    tok.save_pretrained(tmp_path / "tok")
    script = f"""
import json, sys
from transformers import AutoTokenizer
from iada_jax.data import index as ix
from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.loader import open_rows
ix.CHUNK = 4
ctx = ix._process_context().get_start_method()
s = ix.IndexSettings(256, ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=1024, max_pixels=4096), 2)
index = ix.build_index(open_rows({data_file!r}), AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r}), s,
                       workers=2, cache_dir="", log=lambda *a: None)
print(json.dumps({{"ctx": ctx, "lengths": index.lengths.tolist(), "reasons": index.skipped()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    forked = json.loads(out.stdout.strip().splitlines()[-1])
    here = build_index(open_rows(data_file), tok, settings(), workers=1, cache_dir="", log=lambda *a: None)
    assert forked["ctx"] == "fork" and index_mod._process_context().get_start_method() == "spawn"
    assert forked["lengths"] == here.lengths.tolist() and forked["reasons"] == dict(here.skipped())


def test_the_loaders_examples_from_index_tokens_equal_build_example(embedded, data_file, tmp_path):
    """The loader takes each row's tokens from the index (no second rendering or tokenising)
    and decodes its images: every usable row's example equals build_example's."""
    _, _, tok, model = embedded
    data = SFTData(DataConfig(path=data_file, max_length=256, batch_size=2, buckets=(256,), workers=1, max_images=2,
                              index_cache=str(tmp_path)), tok, CFG, model.config, log=lambda *a: None)
    again = SFTData(DataConfig(path=data_file, max_length=256, batch_size=2, buckets=(256,), workers=1, max_images=2,
                               index_cache=str(tmp_path)), tok, CFG, model.config, log=lambda *a: None)
    assert isinstance(again.index.tokens, np.memmap)  # the cached tokens are mapped, not read
    arrow = open_rows(data_file).with_format("arrow")
    checked = 0
    for i in np.flatnonzero(data.index.usable):
        if i % 9 == 6:
            continue  # the truncated JPEG: an empty row at load time (tested above)
        want = build_example(tok, arrow[int(i)].to_pylist()[0], CFG, 2, 256, raw_pixels=True)
        for loader in (data, again):
            got = loader.load_example(int(i))
            np.testing.assert_array_equal(got.input_ids, want.input_ids)
            np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
            if want.pixel_values is not None:
                np.testing.assert_array_equal(got.pixel_values, want.pixel_values)
                np.testing.assert_array_equal(got.image_grid_thw, want.image_grid_thw)
        checked += 1
    again._image_column = None  # the path for data sets with an index mapping (select, shuffle)
    np.testing.assert_array_equal(again.load_example(1).pixel_values, data.load_example(1).pixel_values)
    assert checked == 15  # rows 0, 1, 2, 4 and 7 of each of the three copies
