"""Sequence packing: several samples in each row of the static length, kept apart.

Planning (`pack`): an epoch's shuffled rows are taken a window at a time and placed
first-fit decreasing into rows of `capacity` tokens (at most `max_samples` samples and
`max_images` images a row); a window's rows are closed when the next window starts, so the
plan is a deterministic function of the order (and so of (seed, epoch)) and every row of
the order lands in exactly one packed row.

Collation (`collate_packed`): the samples of a row lie back to back from position 0, each
with its own M-RoPE positions (its own `get_rope_index`, starting at 0 as it would alone),
`segment_ids` (k for the k-th sample, 0 for padding) and `sample_lengths` [B, K]. A sample's
first token is never a target (alone it has no predecessor; the loss reads the segments,
train/loss.py `supervised_weights`). The model keeps attention and IADA inside each sample (a block-
diagonal causal mask; `iada.TokenMasks.segments`), so every sample gets the logits and the
gradients it gets alone; the loss stays the token-weighted mean over the step.
"""

from __future__ import annotations

import numpy as np

from iada_jax.config import Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.data.loader import vision_batch
from iada_jax.data.sft import Example
from iada_jax.data.vision_inputs import frame_bucket
from iada_jax.positions import get_rope_index


def pack(order: np.ndarray, lengths: np.ndarray, images: np.ndarray, capacity: int, max_samples: int,
         max_images: int, window: int) -> list[list[int]]:
    """Rows of the data set (`order`, already shuffled) into packed rows: [[row, ...], ...].

    lengths, images: per data set row (indexed by the values of `order`). Within each window
    of `window` rows: longest first, each into the first open packed row it fits (tokens,
    sample count and image count), else a new one. Packed rows come out in the order they
    were opened; each keeps its samples in placement order."""
    out: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = np.asarray(order[start:start + window])
        # stable: equal lengths keep the shuffled order
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        bins: list[list[int]] = []
        room: list[int] = []
        pictures: list[int] = []
        for row in chunk.tolist():
            n, k = int(lengths[row]), int(images[row])
            if n > capacity or k > max_images:
                raise ValueError(f"row {row}: {n} tokens and {k} images cannot fit a packed row of {capacity} "
                                 f"tokens and {max_images} images")
            for j in range(len(bins)):
                if room[j] >= n and len(bins[j]) < max_samples and pictures[j] + k <= max_images:
                    bins[j].append(row)
                    room[j] -= n
                    pictures[j] += k
                    break
            else:
                bins.append([row])
                room.append(capacity - n)
                pictures.append(k)
        out.extend(bins)
    return out


def collate_packed(rows: list[list[Example]], length: int, cfg: Qwen3VLConfig, max_samples: int,
                   min_frames: int = 1) -> Batch:
    """Packed rows of examples -> a Batch of [len(rows), length] with segment ids, per-sample
    positions and sample lengths [B, max_samples]; the vision frames (every image of every
    sample, row-major) in a bucket of at least min_frames with at most a quarter of padding
    (four buckets per doubling, as frame lengths: a power of two would leave 32 frames for 17
    images)."""
    b = len(rows)
    ids = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.int32)
    segments = np.zeros((b, length), np.int32)
    sample_lengths = np.zeros((b, max_samples), np.int32)
    positions = np.zeros((3, b, length), np.int32)
    for r, examples in enumerate(rows):
        if len(examples) > max_samples:
            raise ValueError(f"packed row {r} holds {len(examples)} samples; at most {max_samples}")
        at = 0
        for k, ex in enumerate(e for e in examples if len(e.input_ids)):
            n = len(ex.input_ids)
            if at + n > length:
                raise ValueError(f"packed row {r}: its samples need more than {length} tokens")
            span = slice(at, at + n)
            ids[r, span], mask[r, span], loss[r, span], segments[r, span] = ex.input_ids, 1, ex.loss_mask, k + 1
            sample_lengths[r, k] = n
            pos, _ = get_rope_index(ex.input_ids[None].astype(np.int64), np.ones((1, n), np.int64),
                                    ex.image_grid_thw, None, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id,
                                    spatial_merge_size=cfg.vision.spatial_merge_size)
            positions[:, r, span] = np.asarray(pos)[:, 0]
            at += n
    flat = [ex for examples in rows for ex in examples]
    frames = sum(0 if ex.image_grid_thw is None else int(ex.image_grid_thw[:, 0].sum()) for ex in flat)
    vision, visual_index = vision_batch(flat, ids, mask, cfg, frame_bucket(max(frames, 1), max(min_frames, 1)))
    return Batch(input_ids=ids, attention_mask=mask, position_ids=positions, vision=vision, visual_index=visual_index,
                 loss_mask=loss, segment_ids=segments, sample_lengths=sample_lengths)


def packing_stats(packed: list[list[int]], lengths: np.ndarray, capacity: int) -> dict:
    """Token slots, real tokens and their fraction over a plan's packed rows (empty rows, which
    complete a last batch, count as slots); samples per non-empty row."""
    used = [len(p) for p in packed if len(p)]
    real = int(sum(int(lengths[np.asarray(p, np.int64)].sum()) for p in packed if len(p)))
    slots = capacity * len(packed)
    return {"rows": len(packed), "empty_rows": len(packed) - len(used), "token_slots": slots, "real_tokens": real,
            "real_fraction": real / slots if slots else 0.0,
            "samples_per_row": float(np.mean(used)) if used else 0.0, "max_samples_in_a_row": max(used, default=0)}
