"""The public `load_pretrained(...).logits(...)` API: input validation a user hits first."""

from __future__ import annotations

import numpy as np
import pytest

import iada_jax


@pytest.fixture(scope="module")
def model(tiny_hf):
    path, _ = tiny_hf("default")
    return iada_jax.load_pretrained(path)


def test_logits_shape_and_dtype(model):
    out = model.logits(np.array([[1, 2, 3]]))
    assert out.shape == (1, 3, 300) and out.dtype == np.float32


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(input_ids=np.array([1, 2, 3])), ValueError, "2-D integer array"),
    (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[1, 1, 1]])), ValueError, "does not match"),
    (dict(input_ids=np.array([[1, 2], [3, 4]]), attention_mask=np.array([[1, 1], [0, 0]])), ValueError,
     "sample 1: attention_mask is all zeros"),
    (dict(input_ids=np.array([[1, 2], [3, 999]])), ValueError, "sample 1, position 1: token id 999 outside"),
    # A grid that does not match pixel_values (4 rows of 96 are 1x2x2 patches, not 1x2x4).
    (dict(input_ids=np.array([[1, 292] + [290] * 2 + [293]]), pixel_values=np.zeros((4, 96), np.float32),
          image_grid_thw=np.array([[1, 2, 4]])), ValueError, r"pixel_values has shape \[4, 96\], but the grids"),
    # More image placeholders than the images describe: the sample is named.
    (dict(input_ids=np.array([[1, 2, 3, 4], [1, 292, 290, 290]]), pixel_values=np.zeros((4, 96), np.float32),
          image_grid_thw=np.array([[1, 2, 2]])), ValueError, "sample 1: image placeholder"),
    # An image but no placeholder for it.
    (dict(input_ids=np.array([[1, 2]]), pixel_values=np.zeros((4, 96), np.float32),
          image_grid_thw=np.array([[1, 2, 2]])), ValueError, "1 image grid"),
    (dict(input_ids=np.array([[1, 2]]), pixel_values=np.zeros((4, 96), np.float32)), ValueError, "together"),
    (dict(input_ids=np.array([[1, 292, 290, 293]])), ValueError, "sample 0"),  # image placeholder, no grid
])
def test_bad_inputs_raise_clear_errors(model, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        model.logits(**kwargs)


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        iada_jax.load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype 'float16' not supported"):
        iada_jax.load_pretrained(tmp_path, dtype="float16")


def test_image_larger_than_max_pixels_is_refused_naming_the_sample(tiny_hf):
    from iada_jax.data.image_processing import ImageProcessorConfig

    path, _ = tiny_hf("default")
    m = iada_jax.load_pretrained(path)
    # 1 merged token per 2x2 patches of 4x4 pixels: a 1x4x4 grid is 16x16 pixels, 4 tokens.
    m.image_config = ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=64, max_pixels=200)
    ids = np.array([[1, 2, 3, 4, 5, 6, 7], [1, 292, 290, 290, 290, 290, 293]])
    with pytest.raises(ValueError, match=r"sample 1, image 0: grid \(t,h,w\)=\(1,4,4\) is 16x16 pixels per frame, "
                                         r"above max_pixels=200"):
        m.logits(ids, pixel_values=np.zeros((16, 96), np.float32), image_grid_thw=np.array([[1, 4, 4]]))
    m.image_config = ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=64, max_pixels=256)
    assert np.isfinite(m.logits(ids, pixel_values=np.zeros((16, 96), np.float32),
                                image_grid_thw=np.array([[1, 4, 4]]))).all()


def test_load_pretrained_reads_preprocessor_config(tiny_hf, tmp_path):
    import shutil

    path, _ = tiny_hf("default")
    folder = tmp_path / "with_pre"
    shutil.copytree(path, folder)
    (folder / "preprocessor_config.json").write_text('{"size": {"longest_edge": 4096, "shortest_edge": 1024}, '
                                                      '"patch_size": 4, "merge_size": 2}')
    m = iada_jax.load_pretrained(folder)
    assert (m.image_config.min_pixels, m.image_config.max_pixels) == (1024, 4096)
