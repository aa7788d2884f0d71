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
from iada_jax.data.sft import BadRow, build_example
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


def test_messages_rows_supervise_every_assistant_turn(embedded):
    _, _, tok, _ = embedded
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "And?"}, {"role": "assistant", "content": "no"},
    ]}
    ex = build_example(tok, row, image_cfg(), merge_size=2, max_length=512)
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
    assert sorted(data.bucket_of) == [0, 4]
    assert dict(data.skipped) == {"bad_image": 2, "empty_completion": 1}
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(row("missing.png")) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        SFTData(DataConfig(path=str(only_bad), max_length=128, batch_size=2), tok, image_cfg(), model.config,
                log=lambda *a: None)


def test_padded_static_batch_gives_the_logits_of_the_unpadded_samples(embedded):
    """collate pads text to the bucket and the vision inputs to a power-of-two bucket of
    patches and frames; every sample's logits equal those of the sample alone, unpadded."""
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
    batch = collate(examples, 160, model.config, max_images=2)
    assert batch.vision.pixel_values.shape[0] == 512  # 256 + 192 patches -> bucket 512
    logits = np.asarray(forward(model.params, jax.tree.map(np.asarray, batch), cfg=model.config, fwd=model.fwd)[0])
    for b, ex in enumerate(examples):
        alone = model.logits(ex.input_ids[None], pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw)[0]
        n = len(ex.input_ids)
        err = np.abs(logits[b, :n] - alone).max() / np.abs(alone).max()
        assert err < 1e-5, f"sample {b}: relative diff {err:.2e}"


def test_epoch_plan_is_deterministic_and_buckets_are_static(embedded):
    ckpt, data_path, tok, model = embedded
    data = SFTData(DataConfig(path=data_path, max_length=128, batch_size=4, buckets=(96, 128), seed=3), tok,
                   image_cfg(), model.config, log=lambda *a: None)
    plan = data.epoch_plan(0)
    assert plan == data.epoch_plan(0) and plan != data.epoch_plan(1)
    assert all(len(rows) == 4 and length in (96, 128) for length, rows in plan)
    (pos, batch), = [x for _, x in zip(range(1), data.iterate(start=(0, 1)))]
    assert pos == (0, 1) and batch.input_ids.shape == (4, plan[1][0])
