"""`Batch`: the one contract between the data pipeline and the model."""

from __future__ import annotations

import jax
from flax import struct

from iada_jax.data.vision_inputs import VisionInputs

Array = jax.Array


@struct.dataclass
class Batch:
    """A padded batch. Shapes are static per bucket; everything here lives on device.

    input_ids       [B, T] int32   token ids (padding positions hold any valid id)
    attention_mask  [B, T] int32   1 for real tokens, 0 for padding (left or right)
    position_ids    [3, B, T] int32  M-RoPE (T, H, W) rows from `positions.get_rope_index`
    vision          VisionInputs of all images, then all videos, of the batch (None if text only)
    visual_index    [Nv] int32     flat (b * T + t) position of each merged visual token, in the
                                   order the vision tower emits them (images, then videos)
    loss_mask       [B, T] int32   1 where the token is a supervised target (an answer token);
                                   IADA's `prompt` scope reads the tokens before a sample's
                                   first 1. None at inference: the whole input is the prompt.
    segment_ids     [B, T] int32   packed rows (data/packing.py): 0 padding, k >= 1 the k-th
                                   sample of the row; attention and IADA stay inside a sample.
                                   None: one sample per row.
    sample_lengths  [B, K] int32   packed rows: the tokens of each sample, in row order, 0 for
                                   an unused slot (K, the most samples a row holds, is static).
    """

    input_ids: Array
    attention_mask: Array
    position_ids: Array
    vision: VisionInputs | None = None
    visual_index: Array | None = None
    loss_mask: Array | None = None
    segment_ids: Array | None = None
    sample_lengths: Array | None = None
