"""Our SFT tokens and labels against TRL 1.16's `DataCollatorForVisionLanguageModeling` (what
`SFTTrainer` uses for VLMs), on the same rows with the same processor (a Qwen3VLProcessor around
the embedded tokenizer and a PIL Qwen2VL image processor of the tiny model's geometry), for both
llava-instruct-mix layouts: trl-lib prompt/completion and HuggingFaceH4 `messages` with image
entries. Rows go through a parquet file and `datasets`, as in training (image entries come back
as `{"index", "text", "type"}` structs, images as `{"bytes", "path"}` for us and as PIL for TRL)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.sft import BadRow, build_example

trl = pytest.importorskip("trl", reason="trl is in the test extras; the reference for tokens and labels")

MIN_PIXELS, MAX_PIXELS = 1024, 4096


def _jpeg(size, seed) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _text(parts):
    return [{"index": None, "text": t, "type": "text"} if isinstance(t, str) else {"index": t, "text": None,
                                                                                  "type": "image"} for t in parts]


TRL_LIB_ROWS = [  # prompt/completion, plain-string content: images go before the first user text
    {"images": [(64, 48)], "prompt": [{"role": "user", "content": "What colour is the ball?"}],
     "completion": [{"role": "assistant", "content": "Red."}]},
    {"images": [(40, 72)], "prompt": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How many cats?"}, {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "And dogs?"}],
     "completion": [{"role": "assistant", "content": "One dog, lying on the sofa."}]},
    {"images": [], "prompt": [{"role": "user", "content": "What is 3 + 4?"}],
     "completion": [{"role": "assistant", "content": "7"}]},
]
H4_ROWS = [  # messages with image entries already in place, possibly mid-text
    {"images": [(64, 64)], "messages": [
        {"role": "user", "content": _text([0, "Describe the picture."])},
        {"role": "assistant", "content": _text(["A square on grass."])},
        {"role": "user", "content": _text(["What colour is the square?"])},
        {"role": "assistant", "content": _text(["Blue."])}]},
    {"images": [(48, 64), (64, 32)], "messages": [
        {"role": "user", "content": _text(["Compare", 0, "with", 1, "please."])},
        {"role": "assistant", "content": _text(["The first is taller."])}]},
]


def _dataset(rows, tmp_path, name):
    import datasets

    stored = [dict(r, images=[{"bytes": _jpeg(s, i * 10 + k), "path": None} for k, s in enumerate(r["images"])])
              for i, r in enumerate(rows)]
    path = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_list(stored).cast_column("images", datasets.Sequence(datasets.Image())).to_parquet(str(path))
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return ds, ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))


def _tokenizer(embedded, template):
    """The embedded tokenizer with its own template, or with the original Qwen3-VL-Instruct
    template that TRL ships (trl/chat_templates/qwen3_vl.jinja)."""
    import copy
    import os

    tok = copy.deepcopy(embedded[2])
    if template == "qwen3_vl":
        tok.chat_template = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3_vl.jinja")).read()
    return tok


def _processor(tok):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl import Qwen3VLProcessor

    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3,
                                               size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})

    class ImagesOnlyProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without its video processor, which needs torchvision (not installed);
        no video is processed here, and the image and text paths are the class's own."""

        def check_argument_for_proper_class(self, name, arg):
            return None

    return ImagesOnlyProcessor(image_processor=image_processor, tokenizer=tok, video_processor=object(),
                               chat_template=tok.chat_template)


def _ours(tok, row, messages_loss="all"):
    cfg = ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ex = build_example(tok, row, cfg, merge_size=2, max_length=4096, messages_loss=messages_loss)
    return ex, np.where(ex.loss_mask == 1, ex.input_ids, -100)


@pytest.mark.parametrize("template", ["embedded", "qwen3_vl"])
@pytest.mark.parametrize("layout", ["trl-lib", "h4"])
def test_tokens_labels_and_pixels_equal_trl_collator(embedded, tmp_path, layout, template):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    tok = _tokenizer(embedded, template)
    processor = _processor(tok)
    rows = TRL_LIB_ROWS if layout == "trl-lib" else H4_ROWS
    decoded, undecoded = _dataset(rows, tmp_path, layout)
    # SFTTrainer passes completion_only_loss=True for prompt/completion data (its default None).
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=layout == "trl-lib")
    for i in range(len(rows)):
        theirs = collator([dict(decoded[i])])
        ex, labels = _ours(tok, undecoded[i])
        assert ex.input_ids.tolist() == theirs["input_ids"][0].tolist(), (layout, i)
        assert labels.tolist() == theirs["labels"][0].tolist(), (layout, i)
        if rows[i]["images"]:
            ex_pixels = build_example(tok, decoded[i], ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=MIN_PIXELS,
                                                                            max_pixels=MAX_PIXELS), 2, 4096)
            np.testing.assert_array_equal(ex_pixels.image_grid_thw, theirs["image_grid_thw"].numpy())
            np.testing.assert_allclose(ex_pixels.pixel_values, theirs["pixel_values"].numpy(), atol=1e-6)
    if layout == "h4":  # the image entries stayed where they were: text, image, text, image, text
        text = tok.decode(_ours(tok, undecoded[1])[0].input_ids)
        assert "Compare<|vision_start|><|image_pad|>" in text and "<|vision_end|>with<|vision_start|>" in text


def test_messages_loss_assistant_supervises_only_the_answers(embedded, tmp_path):
    _, _, tok, _ = embedded
    _, undecoded = _dataset(H4_ROWS, tmp_path, "h4")
    ex, _ = _ours(tok, undecoded[0], messages_loss="assistant")
    supervised = tok.decode(ex.input_ids[ex.loss_mask == 1])
    assert supervised == "A square on grass.<|im_end|>\nBlue.<|im_end|>\n"


@pytest.mark.parametrize("row, reason", [
    # two image entries, one image: TRL raises "Number of images provided (1) does not match ..."
    ({"images": [{"bytes": _jpeg((64, 64), 0), "path": None}], "messages": [
        {"role": "user", "content": _text([0, 1, "Both?"])}, {"role": "assistant", "content": "yes"}]},
     "placeholder_mismatch"),
    # an image given to a conversation whose only user turn already has list content without one
    ({"images": [{"bytes": _jpeg((64, 64), 0), "path": None}], "messages": [
        {"role": "user", "content": _text(["Hi"])}, {"role": "assistant", "content": "yes"}]},
     "placeholder_mismatch"),
    ({"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "x"}]}, "bad_role"),
])
def test_rows_trl_refuses_are_bad_rows_with_a_reason(embedded, row, reason):
    _, _, tok, _ = embedded
    with pytest.raises(BadRow) as e:
        _ours(tok, row)
    assert e.value.reason == reason


def test_whatever_the_chat_template_raises_is_a_bad_row(embedded):
    """A conversation opening with an assistant turn, under a template that refuses it (as
    stricter Qwen templates do with raise_exception): a counted bad row, not a stopped load."""
    tok = _tokenizer(embedded, "embedded")
    tok.chat_template = ("{%- if messages[0].role == 'assistant' -%}{{ raise_exception('Conversations must "
                         "start with a user turn') }}{%- endif -%}" + tok.chat_template)
    row = {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Bye"}]}
    with pytest.raises(BadRow) as e:
        _ours(tok, row, messages_loss="all")
    assert e.value.reason == "render_error" and "must start with a user turn" in str(e.value)
    # Supervising assistant turns renders the conversation before each one: before the first,
    # nothing, which transformers itself refuses ("Cannot apply chat template to an empty
    # conversation"): also a bad row.
    with pytest.raises(BadRow) as e:
        _ours(embedded[2], row, messages_loss="assistant")
    assert e.value.reason == "render_error"
