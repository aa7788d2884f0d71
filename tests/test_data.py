"""SFT data: rendering with the chat template, completion-only labels, placeholder
expansion, bad rows, and static-shape batches that equal the unpadded forward."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from PIL import Image

from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.loader import DataConfig, SFTData, collate
from iada_jax.data.sft import BadRow, Example, build_example
from iada_jax.embedded import PREPROCESSOR_CONFIG
from iada_jax.model.qwen3_vl import forward



def image_cfg():
    size = PREPROCESSOR_CONFIG["size"]
    return ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=size["shortest_edge"],
                                max_pixels=size["longest_edge"])


def png(color=(255, 0, 0), size=(64, 64)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_only_the_completion_carries_loss_and_placeholders_match_the_grid(embedded):
    _, _, tok, model = embedded
    row = {"images": [png()], "prompt": [{"role": "user", "content": "What colour is the circle?"}],
           "completion": [{"role": "assistant", "content": "red"}]}
    ex = build_example(tok, row, image_cfg(), merge_size=2, max_length=512)
    ids, mask = ex.input_ids, ex.loss_mask
    # A 64x64 image: grid (1, 16, 16) -> 256 patches -> 64 merged tokens.
    assert ex.image_grid_thw.tolist() == [[1, 16, 16]]
    assert (ids == model.config.image_token_id).sum() == 64
    supervised = tok.decode(ids[mask == 1])
    context = tok.decode(ids[mask == 0])
    assert supervised == "red<|im_end|>\n"
    assert context == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 64 + "<|vision_end|>"
                       "What colour is the circle?<|im_end|>\n<|im_start|>assistant\n")
    assert mask.tolist() == [0] * (len(ids) - int(mask.sum())) + [1] * int(mask.sum())  # one answer span


def test_messages_rows_supervise_every_assistant_turn_with_messages_loss_assistant(embedded):
    _, _, tok, _ = embedded
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "And?"}, {"role": "assistant", "content": "no"},
    ]}
    ex = build_example(tok, row, image_cfg(), merge_size=2, max_length=512, messages_loss="assistant")
    spans, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans.append(tok.decode(cur)) if cur else None
    assert spans == ["yes<|im_end|>\n", "no<|im_end|>\n"]
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("row, reason", [
    ({"images": [{"bytes": b"not an image", "path": None}], "prompt": [{"role": "user", "content": "q"}],
      "completion": [{"role": "assistant", "content": "a"}]}, "bad_image"),
    ({"images": [{"bytes": None, "path": "/nonexistent.png"}], "prompt": [{"role": "user", "content": "q"}],
      "completion": [{"role": "assistant", "content": "a"}]}, "bad_image"),
    ({"images": [], "prompt": [{"role": "user", "content": "q"}],
      "completion": [{"role": "assistant", "content": "  "}]}, "empty_completion"),
    ({"images": [], "prompt": [{"role": "user", "content": "q" * 600}],
      "completion": [{"role": "assistant", "content": "a"}]}, "too_long"),
    ({"text": "hello"}, "bad_schema"),
])
def test_bad_rows_are_refused_with_a_reason(embedded, row, reason):
    _, _, tok, _ = embedded
    with pytest.raises(BadRow) as e:
        build_example(tok, row, image_cfg(), merge_size=2, max_length=256)
    assert e.value.reason == reason


def test_bad_rows_are_skipped_and_counted_and_no_usable_rows_is_an_error(embedded, tmp_path):
    """A jsonl file with image paths: a missing file, a corrupt file and an empty answer are
    skipped and counted; a file with no usable row is a clear error."""
    import json

    _, _, tok, model = embedded
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")

    def row(image, answer="green"):
        return {"images": [str(tmp_path / image)], "prompt": [{"role": "user", "content": "What colour?"}],
                "completion": [{"role": "assistant", "content": answer}]}

    path = tmp_path / "mixed.jsonl"
    rows = [row("ok.png"), row("missing.png"), row("corrupt.png"), row("ok.png", answer=""), row("ok.png")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = SFTData(DataConfig(path=str(path), max_length=128, batch_size=2), tok, image_cfg(), model.config,
                   log=lambda *a: None)
    assert data.usable_rows.tolist() == [0, 4]
    assert dict(data.skipped) == {"bad_image": 2, "empty_completion": 1}
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(row("missing.png")) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        SFTData(DataConfig(path=str(only_bad), max_length=128, batch_size=2), tok, image_cfg(), model.config,
                log=lambda *a: None)


def test_padded_static_batch_gives_the_logits_of_the_unpadded_samples(embedded):
    """collate pads text to the bucket and lays the images out in frames of one bucketed length
    (padding rows in each frame's slack, a padding frame for the text-only row); every sample's
    logits equal those of the sample alone, unpadded."""
    _, _, tok, model = embedded
    rows = [
        {"images": [png((255, 0, 0))], "prompt": [{"role": "user", "content": "What colour?"}],
         "completion": [{"role": "assistant", "content": "red"}]},
        {"images": [png((0, 0, 255), size=(48, 64))], "prompt": [{"role": "user", "content": "Where?"}],
         "completion": [{"role": "assistant", "content": "left"}]},
        {"images": [], "prompt": [{"role": "user", "content": "Count to two."}],
         "completion": [{"role": "assistant", "content": "1 2"}]},
    ]
    examples = [build_example(tok, r, image_cfg(), merge_size=2, max_length=256) for r in rows]
    batch = collate(examples, 160, model.config, max_images=1)
    assert batch.vision.frame_lengths.tolist() == [256, 192, 0]  # 3 frames of 256 rows: 768, not 1024
    assert batch.vision.pixel_values.shape[0] == 3 * 256
    logits = np.asarray(forward(model.params, jax.tree.map(np.asarray, batch), cfg=model.config, fwd=model.fwd)[0])
    for b, ex in enumerate(examples):
        alone = model.logits(ex.input_ids[None], pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw)[0]
        n = len(ex.input_ids)
        err = np.abs(logits[b, :n] - alone).max() / np.abs(alone).max()
        assert err < 1e-5, f"sample {b}: relative diff {err:.2e}"


def test_uint8_pixels_normalised_on_the_device_give_the_same_logits(embedded):
    """The loader's batches carry uint8 pixel rows of one temporal slice and the normalisation
    table (an eighth of the bytes): the tower's float32 pixels, and so the logits, equal those
    of the processor's float32 rows bit for bit."""
    from iada_jax.model.vision import vision_pixels

    _, _, tok, model = embedded
    rows = [
        {"images": [png((200, 30, 7))], "prompt": [{"role": "user", "content": "What colour?"}],
         "completion": [{"role": "assistant", "content": "red"}]},
        {"images": [{"bytes": _noise_png((48, 64)), "path": None}], "prompt": [{"role": "user", "content": "Where?"}],
         "completion": [{"role": "assistant", "content": "left"}]},
        {"images": [], "prompt": [{"role": "user", "content": "Count."}], "completion": [{"role": "assistant", "content": "1"}]},
    ]
    floats = [build_example(tok, r, image_cfg(), merge_size=2, max_length=256) for r in rows]
    raws = [build_example(tok, r, image_cfg(), merge_size=2, max_length=256, raw_pixels=True) for r in rows]
    assert raws[0].pixel_values.dtype == np.uint8 and floats[0].pixel_values.dtype == np.float32
    a, b = collate(floats, 160, model.config), collate(raws, 160, model.config)
    assert b.vision.pixel_values.nbytes * 8 == a.vision.pixel_values.nbytes  # uint8, one temporal slice
    np.testing.assert_array_equal(np.asarray(vision_pixels(jax.tree.map(np.asarray, b.vision), 2)),
                                  a.vision.pixel_values)
    run = lambda batch: np.asarray(forward(model.params, jax.tree.map(np.asarray, batch), cfg=model.config,  # noqa: E731
                                           fwd=model.fwd)[0])
    np.testing.assert_array_equal(run(a), run(b))


def _noise_png(size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_epoch_plan_is_deterministic_and_buckets_are_static(embedded):
    ckpt, data_path, tok, model = embedded
    data = SFTData(DataConfig(path=data_path, max_length=128, batch_size=4, buckets=(96, 128), seed=3), tok,
                   image_cfg(), model.config, log=lambda *a: None)
    plan = data.epoch_plan(0)
    assert plan == data.epoch_plan(0) and plan != data.epoch_plan(1)
    assert all(len(rows) == 4 and length in (96, 128) for length, rows in plan)
    (pos, batch), = [x for _, x in zip(range(1), data.iterate(start=(0, 1)))]
    assert pos == (0, 1) and batch.input_ids.shape == (4, plan[1][0])


def test_frame_buckets_pad_little_and_stay_few():
    from iada_jax.data.vision_inputs import frame_bucket

    buckets = {frame_bucket(n) for n in range(1, 20001)}
    assert all(b % 4 == 0 for b in buckets)  # whole 2x2 merge windows
    assert all(frame_bucket(n) >= n and frame_bucket(n) <= max(64, 1.25 * n) for n in range(1, 20001))
    assert len(buckets) <= 4 * 9  # four per doubling from 64 to 20000 patches


def test_eight_coco_sized_images_cost_little_beyond_their_patches():
    """8 images of 480x640 (1,200 patches each): 8 frames of 1,280 rows (the power-of-two layout
    used 16 frames of 2,048: 1.7x the rows, 5.8x the attention)."""
    from iada_jax.config import Qwen3VLConfig

    cfg = Qwen3VLConfig.qwen3_vl_2b()
    grid = np.asarray([[1, 30, 40]] * 8)
    examples = [Example(np.asarray([cfg.vision_start_token_id] + [cfg.image_token_id] * 300 + [5, 6]), np.zeros(303, np.int32),
                        np.zeros((1200, cfg.vision.patch_dim), np.float32), grid[:1]) for _ in range(8)]
    batch = collate(examples, 512, cfg, max_images=1)
    lengths = batch.vision.frame_lengths
    rows = batch.vision.pixel_values.shape[0]
    assert lengths.tolist() == [1200] * 8 and rows == 8 * 1280
    assert rows / 9600 < 1.1 and 8 * 1280**2 / (8 * 1200**2) < 1.15
    index = np.asarray(batch.visual_index)
    assert (index < 8 * 512).sum() == 8 * 300  # every real merged token lands on its placeholder
