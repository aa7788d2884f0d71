"""Image preprocessing equals transformers' PIL image processor (Qwen2VLImageProcessorPil) exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from iada_jax.data.image_processing import (
    ImageProcessorConfig,
    preprocess_images,
    preprocess_video,
    smart_resize,
)

MIN_PIXELS, MAX_PIXELS = 64 * 64, 160 * 160  # small limits, so both are easy to trigger


def random_image(rng, width, height, mode="RGB"):
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def hf_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, **kw)


@pytest.mark.parametrize("width,height,limit", [
    (96, 128, None),   # inside the limits
    (130, 97, None),   # rounding to multiples of 32 (banker's rounding)
    (20, 30, "min"),   # below min_pixels: upscaled
    (12, 100, "min"),  # thin and small
    (500, 333, "max"),  # above max_pixels: downscaled
    (900, 120, "max"),  # wide
])
def test_matches_transformers_pil_processor(width, height, limit):
    rng = np.random.default_rng(width * height)
    images = [random_image(rng, width, height), random_image(rng, height, width, mode="L")]
    cfg = ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pv, grid = preprocess_images(images, cfg)
    ref = hf_processor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})(images=images, return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(pv, ref["pixel_values"])
    area = grid[0, 1] * grid[0, 2] * 16 * 16
    raw = width * height
    if limit == "min":
        assert raw < MIN_PIXELS and area >= MIN_PIXELS
    elif limit == "max":
        assert raw > MAX_PIXELS and area <= MAX_PIXELS
    else:
        assert MIN_PIXELS <= area <= MAX_PIXELS


def test_reads_hub_style_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, '
        '"temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}')
    cfg = ImageProcessorConfig.from_pretrained(str(tmp_path), max_pixels=1605632)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor) == (65536, 1605632, 32)


def test_bad_images_are_named():
    rng = np.random.default_rng(0)
    cfg = ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="image 1: aspect ratio 250.0 exceeds 200"):
        preprocess_images([random_image(rng, 40, 40), random_image(rng, 1000, 4)], cfg)
    with pytest.raises(TypeError, match="image 0: expected a PIL.Image.Image"):
        preprocess_images([np.zeros((4, 4, 3))], cfg)
    with pytest.raises(ValueError, match="max_pixels=512 is below one merged patch"):
        ImageProcessorConfig(min_pixels=256, max_pixels=512)


def test_smart_resize_rounds_like_python():
    assert smart_resize(48, 48, 32, 0, 10**9) == (64, 64)  # round(1.5) = 2
    assert smart_resize(80, 80, 32, 0, 10**9) == (64, 64)  # round(2.5) = 2 (banker's)


def test_static_video_equals_its_frame_as_an_image():
    """A video of one repeated frame has the image's rows in every temporal step; odd frame
    counts are padded with the last frame."""
    rng = np.random.default_rng(1)
    frame = random_image(rng, 96, 64)
    cfg = ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image_pv, image_grid = preprocess_images([frame], cfg)
    video_pv, (t, gh, gw) = preprocess_video([frame] * 3, cfg)
    assert (t, gh, gw) == (2, image_grid[0, 1], image_grid[0, 2])
    np.testing.assert_array_equal(video_pv.reshape(2, gh * gw, -1)[0], image_pv)
    np.testing.assert_array_equal(video_pv.reshape(2, gh * gw, -1)[1], image_pv)
