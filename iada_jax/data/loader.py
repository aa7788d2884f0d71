"""From a data set on disk to static-shape `Batch`es, deterministic and resumable.

1. `SFTData` opens the rows with `datasets` (local parquet / json / jsonl / arrow files, a
   `save_to_disk` folder, or a data set name found in the local cache) and makes one pass
   that renders and tokenises every row without decoding pixels (image sizes suffice for
   the token counts). Bad rows are skipped and counted by reason.
2. Each epoch is a fixed plan: rows shuffled with (seed, epoch), grouped into batches of one
   text-length bucket each (incomplete batches dropped), so the step compiles once per
   bucket. A position (epoch, batch) identifies where a run is; resuming replays nothing.
3. Batches are built ahead of the device in a background thread (image decoding in a pool).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import queue
import threading

import numpy as np

from iada_jax.config import Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.sft import BadRow, Example, build_example
from iada_jax.data.vision_inputs import build_vision_inputs, frame_bucket, frame_sizes, scatter_index
from iada_jax.positions import get_rope_index


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str
    split: str = "train"
    max_length: int = 1024
    batch_size: int = 4
    buckets: tuple[int, ...] = ()  # text lengths; default: powers of two from 64 to max_length
    max_images: int = 1  # images per sample that a batch's vision bucket is sized for
    seed: int = 0
    prefetch: int = 4
    workers: int = 2

    def text_buckets(self) -> tuple[int, ...]:
        if self.buckets:
            return tuple(sorted(self.buckets))
        out, n = [], 64
        while n < self.max_length:
            out.append(n)
            n *= 2
        return tuple(out) + (self.max_length,)


def next_pow2(n: int, minimum: int) -> int:
    """The smallest minimum * 2^k >= n: a shape bucket."""
    p = minimum
    while p < n:
        p *= 2
    return p


def open_rows(path: str, split: str = "train"):
    """A `datasets.Dataset` from a local file/folder, or a name the local cache has."""
    import datasets

    formats = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in formats:
            raise ValueError(f"{path}: unknown data file type {ext!r}; use one of {sorted(formats)}")
        return datasets.load_dataset(formats[ext], data_files=path, split="train")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        ds = datasets.load_from_disk(path)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:
        raise ValueError(f"cannot open data set {path!r} (split {split!r}): {e}") from None


class SFTData:
    """The rows of one data set, indexed, planned into static-shape batches."""

    def __init__(self, cfg: DataConfig, tokenizer, image_config: ImageProcessorConfig, model_cfg: Qwen3VLConfig,
                 log=print):
        self.cfg, self.tokenizer, self.image_config, self.model_cfg = cfg, tokenizer, image_config, model_cfg
        self.rows = open_rows(cfg.path, cfg.split)
        self.skipped: collections.Counter = collections.Counter()
        buckets = cfg.text_buckets()
        self.bucket_of: dict[int, int] = {}
        for i in range(len(self.rows)):
            try:
                ex = self._example(i, with_pixels=False)
            except BadRow as e:
                self.skipped[e.reason] += 1
                continue
            n_images = 0 if ex.image_grid_thw is None else len(ex.image_grid_thw)
            if n_images > cfg.max_images:
                self.skipped["too_many_images"] += 1
                continue
            self.bucket_of[i] = next(b for b in buckets if b >= len(ex.input_ids))
        if not self.bucket_of:
            raise ValueError(f"{cfg.path}: no usable rows out of {len(self.rows)} (skipped: {dict(self.skipped)})")
        log(f"data: {len(self.bucket_of)} usable rows of {len(self.rows)} in {cfg.path}"
            + (f"; skipped {dict(self.skipped)}" if self.skipped else ""))

    def _example(self, i: int, with_pixels: bool) -> Example:
        return build_example(self.tokenizer, self.rows[i], self.image_config, self.model_cfg.vision.spatial_merge_size,
                             self.cfg.max_length, with_pixels=with_pixels)

    # ------------------------------------------------------------------ planning
    def epoch_plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """[(text length, row indices)] for one epoch; the same for the same (seed, epoch)."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(sorted(self.bucket_of))
        pending: dict[int, list[int]] = collections.defaultdict(list)
        plan = []
        for i in order.tolist():
            b = self.bucket_of[i]
            pending[b].append(i)
            if len(pending[b]) == self.cfg.batch_size:
                plan.append((b, pending.pop(b)))
        return plan

    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(0))

    # ------------------------------------------------------------------ building
    def make_batch(self, length: int, rows: list[int], pool=None) -> Batch:
        mapper = pool.map if pool is not None else map
        examples = list(mapper(lambda i: self._example(i, with_pixels=True), rows))
        return collate(examples, length, self.model_cfg, self.cfg.max_images)

    def iterate(self, start: tuple[int, int] = (0, 0), epochs: int | None = None):
        """Yield ((epoch, batch), Batch) from `start`, built ahead in a background thread."""
        out: queue.Queue = queue.Queue(maxsize=max(self.cfg.prefetch, 1))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                with concurrent.futures.ThreadPoolExecutor(self.cfg.workers) as pool:
                    epoch, k = start
                    while epochs is None or epoch < epochs:
                        plan = self.epoch_plan(epoch)
                        for j in range(k, len(plan)):
                            if not put(((epoch, j), self.make_batch(*plan[j], pool=pool))):
                                return
                        epoch, k = epoch + 1, 0
                put(None)
            except BaseException as e:  # surfaced in the consumer
                put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def collate(examples: list[Example], length: int, cfg: Qwen3VLConfig, max_images: int = 1,
            side: str = "right") -> Batch:
    """Pad to [B, length] (right, or left for generation). Vision: B * max_images frames (images,
    or video frames, per sample), each of a frame-length bucket (`frame_bucket` of the batch's
    largest frame), real patches first (data/vision_inputs.py)."""
    b = len(examples)
    ids = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.int32)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        at = slice(length - n, length) if side == "left" else slice(0, n)
        ids[r, at], mask[r, at], loss[r, at] = ex.input_ids, 1, ex.loss_mask
    grids = [ex.image_grid_thw for ex in examples if ex.image_grid_thw is not None]
    positions, _ = get_rope_index(ids, mask, np.concatenate(grids) if grids else None, None,
                                  image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                  spatial_merge_size=cfg.vision.spatial_merge_size)
    vision = visual_index = None
    if grids:
        grid = np.concatenate(grids)
        pixels = np.concatenate([ex.pixel_values for ex in examples if ex.pixel_values is not None])
        merge = cfg.vision.spatial_merge_size
        frame_len = frame_bucket(int(frame_sizes(grid).max()), minimum=16 * merge**2)
        vision = build_vision_inputs(pixels, grid, cfg.vision, n_frames=b * max_images, frame_len=frame_len)
        placeholders = np.flatnonzero((ids == cfg.image_token_id) & (mask == 1))
        visual_index = scatter_index(placeholders, grid, frame_len, merge, b * max_images, b * length)
    return Batch(input_ids=ids, attention_mask=mask, position_ids=np.asarray(positions, np.int32),
                 vision=vision, visual_index=visual_index, loss_mask=loss)
