"""From a data set on disk to static-shape `Batch`es, deterministic and resumable.

1. `SFTData` opens the rows with `datasets` (local parquet / json / jsonl / arrow files, a
   `save_to_disk` folder, or a data set name found in the local cache) and takes their index
   (data/index.py: every row's token length without decoding a pixel, built over worker
   processes once and cached on disk). Bad rows are skipped and counted by reason.
2. Each epoch is a fixed plan: rows shuffled with (seed, epoch), grouped into batches of one
   text-length bucket each (incomplete batches dropped), so the step compiles once per
   bucket; or, with `pack`, placed several to a row of max_length tokens (data/packing.py:
   every usable row exactly once per epoch, the last batch completed with empty rows). A
   position (epoch, batch) identifies where a run is; resuming replays nothing.
3. Batches are built ahead of the device in a background thread (image decoding in a pool).
   A row's tokens come from the index; its images are read as Arrow stores them (bytes) and
   decoded in the pool. A row whose image turns out to be undecodable only now (the index
   reads headers) becomes an empty row of its batch (no loss, shapes unchanged), named in
   the log.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import queue
import threading
import time

import numpy as np

from iada_jax.config import Qwen3VLConfig
from iada_jax.data.batch import Batch
from iada_jax.data.image_processing import ImageProcessorConfig, normalize_table
from iada_jax.data.index import IndexSettings, RowIndex, build_index, describe, image_column
from iada_jax.data.sft import IMAGE_PAD, BadRow, Example, example_pixels, expand, row_images
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
    workers: int = 2  # index processes and image-decoding threads
    messages_loss: str = "all"  # messages rows: "all" tokens (TRL's default) or "assistant" turns only
    index_cache: str | None = None  # folder of cached indexes (None: data/index.default_cache_dir(); "": none)
    pack: bool = False  # several samples per row of max_length tokens (data/packing.py)
    pack_samples: int = 16  # at most this many samples in a packed row (K, a static shape)
    pack_window: int = 2048  # rows placed first-fit decreasing together

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
        self.cfg, self.tokenizer, self.image_config, self.model_cfg, self.log = cfg, tokenizer, image_config, model_cfg, log
        t0 = time.perf_counter()
        self.rows = open_rows(cfg.path, cfg.split)
        self._images = image_column(self.rows.column_names)
        # The image column as Arrow stores it ({"bytes", "path"}: decoded in the pool, not by
        # datasets); straight from the Arrow table when no index mapping (select/shuffle) sits on it.
        self._image_column = None
        if self._images is not None and getattr(self.rows, "_indices", None) is None:
            self._image_column = self.rows.data.table.column(self._images)
        self._image_rows = None if self._images is None else self.rows.select_columns([self._images]).with_format("arrow")
        self._pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self._packed_plan: tuple = (None, [])
        settings = IndexSettings(max_length=cfg.max_length, image=image_config,
                                 merge_size=model_cfg.vision.spatial_merge_size, messages_loss=cfg.messages_loss)
        self.index: RowIndex = build_index(self.rows, tokenizer, settings, source=cfg.path, workers=cfg.workers,
                                           cache_dir=cfg.index_cache, log=log)
        self.skipped: collections.Counter = self.index.skipped(cfg.max_images)
        usable = self.index.usable_within(cfg.max_images)
        buckets = np.asarray(cfg.text_buckets())
        self.usable_rows = np.flatnonzero(usable)
        self.row_bucket = np.zeros(len(self.index), np.int32)
        self.row_bucket[self.usable_rows] = buckets[np.searchsorted(buckets, self.index.lengths[self.usable_rows])]
        if not len(self.usable_rows):
            raise ValueError(f"{cfg.path}: no usable rows out of {len(self.rows)} (skipped: {dict(self.skipped)}; "
                             f"e.g. {self._first_bad()})")
        log(f"data: {len(self.usable_rows)} usable rows of {len(self.rows)} in {cfg.path}, ready in "
            f"{time.perf_counter() - t0:.1f} s" + (f"; skipped {dict(self.skipped)} (e.g. {self._first_bad()})"
                                                   if self.skipped else ""))

    def _first_bad(self) -> str:
        return "; ".join(f"row {r}: {self.index.reason_names[self.index.reasons[r]]}: {d}"
                         for r, d in list(sorted(self.index.details.items()))[:3])

    def describe(self) -> str:
        text = describe(self.index, self.cfg.text_buckets(), self.cfg.max_images)
        if self.cfg.pack:
            from iada_jax.data.packing import packing_stats

            plan = self.epoch_plan(0)
            s = packing_stats([r for _, batch in plan for r in batch], self.index.lengths, self.cfg.max_length)
            text += (f"\npacked (--pack): {s['rows'] - s['empty_rows']} rows of {self.cfg.max_length} tokens, "
                     f"{s['samples_per_row']:.2f} samples a row, {s['real_fraction']:.1%} of token slots real, "
                     f"{len(plan)} batches an epoch")
        return text

    def load_example(self, i: int) -> Example:
        """Row i: its tokens from the index (rendered and tokenised once, when indexing), its
        images decoded; an image that cannot be decoded gives an empty row."""
        try:
            if self._images is None:
                items = []
            elif self._image_column is not None:
                items = row_images({self._images: self._image_column[i].as_py()})
            else:
                items = row_images(self._image_rows[i].to_pylist()[0])
            pixels, grid, counts = example_pixels(items, self.image_config, self.model_cfg.vision.spatial_merge_size,
                                                  raw_pixels=True)
            ids, mask = expand(*self.index.row_tokens(i), counts, self._pad_id, self.cfg.max_length)
        except BadRow as e:
            self.log(f"data: row {i} is unusable at load time ({e}); it is an empty row of its batch")
            return Example(np.zeros(0, np.int32), np.zeros(0, np.int32), None, None)
        if len(ids) != self.index.lengths[i]:
            raise RuntimeError(f"row {i}: {len(ids)} tokens now, {self.index.lengths[i]} when indexed "
                               f"({self.index.path or 'not cached'}); delete the index file and restart")
        return Example(ids, mask, pixels, grid, None if pixels is None else normalize_table(self.image_config))

    # ------------------------------------------------------------------ planning
    def epoch_plan(self, epoch: int) -> list[tuple[int, list]]:
        """[(text length, row indices)] for one epoch; the same for the same (seed, epoch).
        Packed: [(max_length, [[row, ...] per packed row])], batch_size packed rows a batch."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.usable_rows)
        if self.cfg.pack:  # about 3 s for 259K rows: kept for the epoch
            if self._packed_plan[0] != epoch:
                from iada_jax.data.packing import pack

                packed = pack(order, self.index.lengths, self.index.images, self.cfg.max_length, self.cfg.pack_samples,
                              self.cfg.pack_samples * self.cfg.max_images, self.cfg.pack_window)
                packed += [[] for _ in range(-len(packed) % self.cfg.batch_size)]
                b = self.cfg.batch_size
                self._packed_plan = (epoch, [(self.cfg.max_length, packed[i:i + b]) for i in range(0, len(packed), b)])
            return list(self._packed_plan[1])
        pending: dict[int, list[int]] = collections.defaultdict(list)
        plan = []
        for i, b in zip(order.tolist(), self.row_bucket[order].tolist()):
            pending[b].append(i)
            if len(pending[b]) == self.cfg.batch_size:
                plan.append((b, pending.pop(b)))
        return plan

    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(0))

    # ------------------------------------------------------------------ building
    def make_batch(self, length: int, rows: list, pool=None) -> Batch:
        """The batch of a plan entry (rows, or packed rows: lists of rows)."""
        mapper = pool.map if pool is not None else map
        return self._collate(length, rows, list(mapper(self.load_example, self._flat(rows))))

    def _flat(self, rows: list) -> list[int]:
        """The data set rows of a plan entry, in collation order."""
        return [i for r in rows for i in r] if self.cfg.pack else rows

    def _collate(self, length: int, rows: list, examples: list[Example]) -> Batch:
        if not self.cfg.pack:
            return collate(examples, length, self.model_cfg, self.cfg.max_images)
        from iada_jax.data.packing import collate_packed

        it = iter(examples)
        packed = [[next(it) for _ in r] for r in rows]
        return collate_packed(packed, length, self.model_cfg, self.cfg.pack_samples,
                              min_frames=self.cfg.batch_size * self.cfg.max_images)

    def _collated(self, position, length: int, rows: list, futures) -> tuple:
        return position, self._collate(length, rows, [f.result() for f in futures])

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

        def positions():
            epoch, k = start
            while epochs is None or epoch < epochs:
                plan = self.epoch_plan(epoch)
                for j in range(k, len(plan)):
                    yield (epoch, j), plan[j]
                epoch, k = epoch + 1, 0

        def produce():
            # One batch ahead in the pool: while this thread collates batch j, the pool already
            # decodes the images of batch j + 1 (collating is a good part of a batch's time).
            try:
                with concurrent.futures.ThreadPoolExecutor(self.cfg.workers + 1) as pool:
                    ahead = None
                    for position, (length, rows) in positions():
                        submitted = (position, length, rows,
                                     [pool.submit(self.load_example, i) for i in self._flat(rows)])
                        if ahead is not None and not put(self._collated(*ahead)):
                            return
                        ahead = submitted
                    if ahead is not None and not put(self._collated(*ahead)):
                        return
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
    vision, visual_index = vision_batch(examples, ids, mask, cfg, b * max_images)
    return Batch(input_ids=ids, attention_mask=mask, position_ids=np.asarray(positions, np.int32),
                 vision=vision, visual_index=visual_index, loss_mask=loss)


def vision_batch(examples: list[Example], ids: np.ndarray, mask: np.ndarray, cfg: Qwen3VLConfig, n_frames: int):
    """(VisionInputs, visual_index) of the examples' images, in the order their placeholders
    appear in `ids` (row-major), in n_frames frames of the batch's frame-length bucket; (None,
    None) without images."""
    grids = [ex.image_grid_thw for ex in examples if ex.image_grid_thw is not None]
    if not grids:
        return None, None
    grid = np.concatenate(grids)
    pixels = [ex.pixel_values for ex in examples if ex.pixel_values is not None]
    tables = [ex.pixel_table for ex in examples if ex.pixel_values is not None]
    if any((t is None) != (tables[0] is None) for t in tables):
        raise ValueError("a batch mixes uint8 pixel rows (with a pixel_table) and float rows")
    merge = cfg.vision.spatial_merge_size
    frame_len = frame_bucket(int(frame_sizes(grid).max()), minimum=16 * merge**2)
    vision = build_vision_inputs(pixels, grid, cfg.vision, n_frames=n_frames, frame_len=frame_len,
                                 pixel_table=tables[0])
    placeholders = np.flatnonzero((ids == cfg.image_token_id) & (mask == 1))
    return vision, scatter_index(placeholders, grid, frame_len, merge, n_frames, ids.size)
