"""Host-side 3D (M-RoPE) position ids for Qwen3-VL, in pure numpy.

Mirrors Hugging Face ``Qwen3VLModel.get_rope_index`` (transformers v5) and must
match it exactly. Differences:

* Modality is detected from the token ids (``image_token_id`` / ``video_token_id``)
  instead of being passed as ``mm_token_type_ids``.
* A run of consecutive placeholder tokens may hold several images (or video
  frames) with no separator between them: grids are consumed until the run is
  used up. HF assigns exactly one grid per run and then fails on a shape error.
* Mismatches between placeholders and grids raise a ``ValueError`` naming the
  sample, instead of an opaque ``StopIteration`` / shape error (or, for grids
  left over, nothing at all); so does an h or w not divisible by the merge size,
  which HF silently floors.
"""

from __future__ import annotations

import numpy as np

_NAMES = {1: "image", 2: "video"}


def _vision_positions(start: int, t: int, h: int, w: int) -> np.ndarray:
    # HF get_vision_position_ids with temp_merge_size=1, time_interval=1 and h, w
    # already divided by the merge size: a (t, h, w) meshgrid, all offset by start.
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(position_ids int32 [3, B, T], rope_deltas int32 [B, 1])``.

    ``image_grid_thw`` / ``video_grid_thw`` are ``[N, 3]`` (t, h, w) in patch units,
    listed in order across the whole batch. Only ``attention_mask == 1`` tokens get
    positions; padding positions are 0. ``rope_deltas[b] = max(pos) + 1 - n_valid``.
    """
    input_ids = np.asarray(input_ids)
    B, T = input_ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask) == 1
    m = spatial_merge_size

    # The Qwen3-VL processor puts timestamp text between video frames, so (like HF)
    # each video grid is split into t single-frame grids.
    grids = {1: [], 2: []}
    if image_grid_thw is not None:
        grids[1] = [tuple(int(x) for x in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)]
    if video_grid_thw is not None:
        for t, h, w in np.asarray(video_grid_thw).reshape(-1, 3):
            grids[2] += [(1, int(h), int(w))] * int(t)
    cursor = {1: 0, 2: 0}  # grids are consumed in order across the batch

    position_ids = np.zeros((3, B, T), np.int32)
    rope_deltas = np.zeros((B, 1), np.int32)
    for b in range(B):
        ids = input_ids[b, mask[b]]
        if len(ids) == 0:  # fully padded sample: all zeros, delta 0
            continue
        kind = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
        # Maximal runs of equal modality, as HF's itertools.groupby does.
        cuts = np.flatnonzero(np.diff(kind)) + 1
        starts, ends = np.r_[0, cuts], np.r_[cuts, len(ids)]
        chunks, pos = [], 0
        for s, e in zip(starts, ends):
            k = int(kind[s])
            if k == 0:  # text: consecutive positions on all three axes
                chunks.append(np.broadcast_to(np.arange(e - s) + pos, (3, e - s)))
                pos += e - s
                continue
            name, left = _NAMES[k], e - s
            while left > 0:  # one run may hold several grids back to back
                i = cursor[k]
                if i >= len(grids[k]):
                    raise ValueError(
                        f"sample {b}: {name} placeholder tokens at valid index {e - left} have no "
                        f"{name} grid left (all {len(grids[k])} {name} grid(s) are used); pass one "
                        f"{name}_grid_thw row per {name}, or remove the extra placeholders."
                    )
                t, h, w = grids[k][i]
                if h % m or w % m:
                    raise ValueError(
                        f"sample {b}: {name} grid #{i} (t,h,w)=({t},{h},{w}) has h or w not "
                        f"divisible by spatial_merge_size={m}; grids must be in patch units."
                    )
                need = t * (h // m) * (w // m)
                if need > left:
                    raise ValueError(
                        f"sample {b}: {name} placeholder run at valid index {s} has {left} "
                        f"token(s) left but {name} grid #{i} (t,h,w)=({t},{h},{w}) needs {need} "
                        f"(t*h*w/{m}^2); the run length does not match the grids."
                    )
                cursor[k] += 1
                chunks.append(_vision_positions(pos, t, h // m, w // m))
                # HF advances by the spatial extent only (not t) after a vision block.
                pos += max(h, w) // m
                left -= need
        llm = np.concatenate(chunks, axis=1)
        position_ids[:, b, mask[b]] = llm
        rope_deltas[b, 0] = llm.max() + 1 - len(ids)

    # Grids are global, so which sample lacks placeholders is unknowable; name the last.
    for k, name in _NAMES.items():
        if cursor[k] < len(grids[k]):
            per_frame = " (counted per frame)" if k == 2 else ""
            raise ValueError(
                f"{len(grids[k]) - cursor[k]} {name} grid(s){per_frame} left unused after the "
                f"last sample (sample {B - 1}): the batch has fewer {name} placeholder tokens than "
                f"{name}_grid_thw describes; check every {name} has its placeholders and that "
                f"they are not masked out by attention_mask."
            )
    return position_ids, rope_deltas
