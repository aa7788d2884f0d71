"""Host-side vision inputs: everything that depends on the image grids, computed in numpy.

The vision tower then runs on fixed-shape arrays with no host integers inside the program
(PERF_NOTES: a tower that loops over windows with host integers recompiles per grid).

Mirrors transformers 5.23.0 `vision_utils`: `get_vision_interpolation_indices_and_weights`
(bilinear, align_corners=True), `get_vision_position_ids` and `get_vision_cu_seqlens`
(one attention segment per image and per temporal frame).
"""

from __future__ import annotations

import numpy as np
from flax import struct

from iada_jax.config import VisionConfig


@struct.dataclass
class VisionInputs:
    """All images and video frames of a batch packed into one sequence of N patches.

    pixel_values  [N, C*T*p*p]  rows as the HF processor emits them (merge-window order)
    pos_index     [N, 4] int32  bilinear taps into the learned position table
    pos_weight    [N, 4] f32    their weights
    rot_pos       [N, 2] int32  (row, col) patch coordinates for the 2-D rotary embedding
    frame_gather  [F, Lmax] int32  patch index of each slot of each frame (0 in padding slots)
    frame_valid   [F, Lmax] bool   real slots; attention is within a frame only
    patch_slot    [N] int32     flat slot (frame * Lmax + i) of each patch, to unpack
    """

    pixel_values: np.ndarray
    pos_index: np.ndarray
    pos_weight: np.ndarray
    rot_pos: np.ndarray
    frame_gather: np.ndarray
    frame_valid: np.ndarray
    patch_slot: np.ndarray


def patch_coordinates(t: int, h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each of the t*h*w patches, in merge-window order, repeated per frame."""
    within = np.arange(t * h * w) % (h * w)
    blocks_w = w // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    return block_row * merge + in_row, block_col * merge + in_col


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    # float32 throughout, in HF's operation order, so the weights are bit-identical.
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)


def build_vision_inputs(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg: VisionConfig) -> VisionInputs:
    """Validate `pixel_values` against `grid_thw` ([num_images_or_videos, 3]) and lay them out."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    m, side = cfg.spatial_merge_size, int(round(cfg.num_position_embeddings**0.5))
    for i, (t, h, w) in enumerate(grid_thw):
        if min(t, h, w) <= 0 or h % m or w % m:
            raise ValueError(f"grid {i} (t,h,w)=({t},{h},{w}): h and w must be positive multiples of "
                             f"spatial_merge_size={m} (grids are in patch units)")
    n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (n, cfg.patch_dim):
        raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}, but the grids "
                         f"{grid_thw.tolist()} need [{n}, {cfg.patch_dim}] (sum of t*h*w rows of C*T*p*p)")

    index, weight, rot = [], [], []
    for t, h, w in grid_thw:
        row, col = patch_coordinates(int(t), int(h), int(w), m)
        h_taps, h_w = _axis_taps(row, int(h), side)
        w_taps, w_w = _axis_taps(col, int(w), side)
        index.append((h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4))
        weight.append((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4))
        rot.append(np.stack([row, col], axis=-1))

    frame_sizes = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    n_frames, lmax = len(frame_sizes), int(frame_sizes.max())
    starts = np.concatenate([[0], np.cumsum(frame_sizes)[:-1]])
    slot = np.arange(lmax)
    frame_valid = slot[None, :] < frame_sizes[:, None]
    frame_gather = np.where(frame_valid, starts[:, None] + slot[None, :], 0)
    patch_slot = (np.arange(n_frames)[:, None] * lmax + slot[None, :])[frame_valid]
    return VisionInputs(
        pixel_values=pixel_values,
        pos_index=np.concatenate(index).astype(np.int32),
        pos_weight=np.concatenate(weight).astype(np.float32),
        rot_pos=np.concatenate(rot).astype(np.int32),
        frame_gather=frame_gather.astype(np.int32),
        frame_valid=frame_valid,
        patch_slot=patch_slot.astype(np.int32),
    )


def pad_vision_inputs(vis: VisionInputs, n_patches: int, n_frames: int, frame_len: int) -> VisionInputs:
    """Pad to static shapes [n_patches], [n_frames, frame_len], so one compiled step serves a
    whole bucket of image sizes. Padding patches are zero rows placed in padding frames of
    their own (attention stays within a frame, so they never touch a real patch); their merged
    tokens are dropped by the scatter into the text (see `pad_visual_index`)."""
    n, (f, lmax) = vis.pixel_values.shape[0], vis.frame_gather.shape
    pad = n_patches - n
    pad_frames = -(-pad // frame_len) if pad else 0
    if pad < 0 or lmax > frame_len or f + pad_frames > n_frames:
        raise ValueError(f"vision inputs ({n} patches, {f} frames of up to {lmax}) do not fit the bucket "
                         f"({n_patches} patches, {n_frames} frames of {frame_len})")
    gather = np.zeros((n_frames, frame_len), np.int32)
    valid = np.zeros((n_frames, frame_len), bool)
    gather[:f, :lmax], valid[:f, :lmax] = vis.frame_gather, vis.frame_valid
    extra = np.arange(pad)
    gather[f + extra // frame_len, extra % frame_len] = n + extra
    valid[f + extra // frame_len, extra % frame_len] = True
    patch_slot = np.zeros(n_patches, np.int32)
    frames, slots = np.nonzero(valid)
    patch_slot[gather[frames, slots]] = frames * frame_len + slots

    def grow(x):
        return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])

    return VisionInputs(
        pixel_values=grow(np.asarray(vis.pixel_values)), pos_index=grow(vis.pos_index), pos_weight=grow(vis.pos_weight),
        rot_pos=grow(vis.rot_pos), frame_gather=gather, frame_valid=valid, patch_slot=patch_slot,
    )


def pad_visual_index(visual_index: np.ndarray, n_merged: int, out_of_range: int) -> np.ndarray:
    """Flat text positions of the merged visual tokens, padded with `out_of_range` (= B * T):
    the scatters into the text use mode="drop", so padding tokens land nowhere."""
    out = np.full(n_merged, out_of_range, np.int32)
    out[: len(visual_index)] = visual_index
    return out
