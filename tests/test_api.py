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
