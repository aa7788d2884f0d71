"""Host-side vision inputs: everything that depends on the image grids, computed in numpy.

The vision tower then runs on fixed-shape arrays with no host integers inside the program
(PERF_NOTES: a tower that loops over windows with host integers recompiles per grid).

Layout: frame-major with slack. Every image (and every temporal frame of a video) is a frame
of `frame_len` rows: its real patches first, in the processor's order, then padding rows
(zero pixels); frames without an image are all padding. The tower's attention is within a
frame (a [F, L] reshape, no gather), the 2x2 merger sees whole windows (a frame's real patch
count and L are multiples of merge^2), and a padding row never touches a real one. L is a
bucket (`frame_bucket`: four steps per octave, at most a quarter of padding), not a power of
two, and a batch's F is fixed (batch size x images per sample), so the step compiles once per
(text bucket, frame bucket) while the tower computes little beyond the real patches.

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
    """All images and video frames of a batch, frame-major: frame f holds rows
    [f * L, f * L + frame_lengths[f]) of the patch sequence, its other rows are padding.

    pixel_values  [F * L, C*T*p*p]  rows as the HF processor emits them (merge-window order)
    pos_index     [F * L, 4] int32  bilinear taps into the learned position table
    pos_weight    [F * L, 4] f32    their weights (0 in padding rows)
    rot_pos       [F * L, 2] int32  (row, col) patch coordinates for the 2-D rotary embedding
    frame_lengths [F] int32         real patches of each frame (0: a padding frame)
    pixel_table   [C, 256] f32 or None: when given, pixel_values are still images' uint8 values,
                  one temporal slice, [F * L, C*p*p]; the tower normalises them through this
                  table (image_processing.normalize_table) and fills every temporal slice: the
                  processor's float32 rows from an eighth of the bytes
    """

    pixel_values: np.ndarray
    pos_index: np.ndarray
    pos_weight: np.ndarray
    rot_pos: np.ndarray
    frame_lengths: np.ndarray
    pixel_table: np.ndarray | None = None


def frame_bucket(n: int, minimum: int = 64) -> int:
    """The frame length L for a frame of n patches: `minimum` for small frames, else n rounded
    up to a quarter of its octave (2^k < n <= 2^(k+1): a multiple of 2^k / 4), so at most a
    quarter of a frame is padding and there are four buckets per doubling of the image area.
    Always a multiple of 4 (the 2x2 merge window)."""
    if n <= minimum:
        return minimum
    step = max(4, 2 ** (int(n - 1).bit_length() - 1) // 4)
    return -(-n // step) * step


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


def check_grids(pixel_values: np.ndarray | list[np.ndarray], grid_thw: np.ndarray, cfg: VisionConfig,
                raw: bool = False) -> np.ndarray:
    """Validate `pixel_values` (or its pieces) against `grid_thw` ([num_images_or_videos, 3]);
    the grids as int64."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid_thw):
        if min(t, h, w) <= 0 or h % m or w % m:
            raise ValueError(f"grid {i} (t,h,w)=({t},{h},{w}): h and w must be positive multiples of "
                             f"spatial_merge_size={m} (grids are in patch units)")
    n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    pieces = pixel_values if isinstance(pixel_values, (list, tuple)) else [pixel_values]
    width = cfg.patch_dim // cfg.temporal_patch_size if raw else cfg.patch_dim
    shape = [sum(len(x) for x in pieces), pieces[0].shape[1] if pieces[0].ndim == 2 else None]
    if any(x.ndim != 2 for x in pieces) or shape != [n, width]:
        raise ValueError(f"pixel_values has shape {shape}, but the grids {grid_thw.tolist()} need [{n}, {width}] "
                         f"(sum of t*h*w rows of {'C*p*p uint8' if raw else 'C*T*p*p'})")
    return grid_thw


def frame_sizes(grid_thw: np.ndarray) -> np.ndarray:
    """Patches of each frame (t frames of h*w per grid), in order."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])


def build_vision_inputs(pixel_values: np.ndarray | list[np.ndarray], grid_thw: np.ndarray, cfg: VisionConfig,
                        n_frames: int | None = None, frame_len: int | None = None,
                        pixel_table: np.ndarray | None = None) -> VisionInputs:
    """Lay the images out frame-major: n_frames frames (default: as many as the grids have) of
    frame_len rows (default: the largest frame), padding frames and rows after the real ones.
    pixel_values: all rows, or a list of consecutive pieces of them (e.g. one per sample: the
    rows are copied once, into their frames, never concatenated first)."""
    pieces = [np.asarray(x) for x in pixel_values] if isinstance(pixel_values, (list, tuple)) else [
        np.asarray(pixel_values)]
    grid_thw = check_grids(pieces, grid_thw, cfg, raw=pixel_table is not None)
    m, side = cfg.spatial_merge_size, int(round(cfg.num_position_embeddings**0.5))
    sizes = frame_sizes(grid_thw)
    n_frames = len(sizes) if n_frames is None else n_frames
    frame_len = int(sizes.max()) if frame_len is None else frame_len
    if len(sizes) > n_frames or sizes.max() > frame_len or frame_len % (m * m):
        raise ValueError(f"{len(sizes)} frames of up to {sizes.max()} patches do not fit {n_frames} frames of "
                         f"{frame_len} (a multiple of {m * m})")

    index, weight, rot = [], [], []
    for t, h, w in grid_thw:
        row, col = patch_coordinates(int(t), int(h), int(w), m)
        h_taps, h_w = _axis_taps(row, int(h), side)
        w_taps, w_w = _axis_taps(col, int(w), side)
        index.append((h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4))
        weight.append((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4))
        rot.append(np.stack([row, col], axis=-1))

    rows = real_patch_rows(sizes, frame_len)

    def place(packed, dtype):
        out = np.zeros((n_frames * frame_len,) + packed.shape[1:], dtype)
        out[rows] = packed
        return out

    lengths = np.zeros(n_frames, np.int32)
    lengths[:len(sizes)] = sizes
    return VisionInputs(
        pixel_values=_frames(pieces, sizes, n_frames, frame_len),
        pos_index=place(np.concatenate(index), np.int32),
        pos_weight=place(np.concatenate(weight), np.float32),
        rot_pos=place(np.concatenate(rot), np.int32),
        frame_lengths=lengths,
        pixel_table=None if pixel_table is None else np.asarray(pixel_table, np.float32),
    )


def _frames(pieces: list[np.ndarray], sizes: np.ndarray, n_frames: int, frame_len: int) -> np.ndarray:
    """The rows of `pieces` (in order) copied frame by frame into [n_frames * frame_len, D],
    zeros after each frame's real rows and in the padding frames."""
    out = np.empty((n_frames * frame_len, pieces[0].shape[1]), pieces[0].dtype)
    f = 0
    for piece in pieces:
        at = 0
        while at < len(piece):
            n, start = int(sizes[f]), f * frame_len
            out[start:start + n] = piece[at:at + n]
            out[start + n:start + frame_len] = 0
            at, f = at + n, f + 1
    out[f * frame_len:] = 0
    return out


def real_patch_rows(sizes: np.ndarray, frame_len: int) -> np.ndarray:
    """Row of each real patch (in processor order) in the frame-major layout."""
    starts = np.arange(len(sizes)) * frame_len
    return np.concatenate([s + np.arange(n) for s, n in zip(starts, sizes)]) if len(sizes) else np.zeros(0, np.int64)


def merged_rows(grid_thw: np.ndarray, frame_len: int, merge: int) -> np.ndarray:
    """Row of each real merged token (the order HF emits them) among the F * L / merge^2 merged
    rows the tower returns."""
    return real_patch_rows(frame_sizes(grid_thw) // merge**2, frame_len // merge**2)


def scatter_index(placeholders: np.ndarray, grid_thw: np.ndarray, frame_len: int, merge: int, n_frames: int,
                  out_of_range: int) -> np.ndarray:
    """For each of the tower's F * L / merge^2 merged rows, the flat text position (b * T + t)
    its token replaces, in the order of `placeholders`; `out_of_range` (= B * T) for padding
    rows, which the scatters into the text drop (mode="drop")."""
    out = np.full(n_frames * frame_len // merge**2, out_of_range, np.int32)
    rows = merged_rows(grid_thw, frame_len, merge)
    if len(rows) != len(placeholders):
        raise ValueError(f"{len(placeholders)} placeholder tokens for {len(rows)} merged visual tokens")
    out[rows] = placeholders
    return out
