"""The row index: every row's token length, image count and visual tokens, or why it cannot be
used, from one pass that never decodes pixels, cached on disk.

What one row costs: its images' sizes from their headers (sft.header_size: 2 KB of the bytes,
read zero-copy from the memory-mapped Arrow table), the chat template rendered with one
`<|image_pad|>` per image, and its segments tokenised in batches; the image tokens are then
counted in (sft.expanded_length, tested equal to the sft.assemble that builds training
examples, so the index length is the example's length). Rows are processed in chunks over
`workers` processes, with progress and rows/s in the log.

The cache file is keyed by everything the result depends on: the data set's fingerprint and its
files' sizes and modification times, the tokenizer (its full serialisation) and chat template,
max_length, the image geometry and pixel limits, the messages loss mode and INDEX_VERSION. A
restart or resume with the same settings loads it in well under a second. The loader takes
each row's tokens from the index and only decodes its images.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import time

import numpy as np

from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.sft import (IMAGE_PAD, BadRow, expanded_length, image_grid, image_size, render_segments,
                               tokenize_segments)

INDEX_VERSION = 2
CHUNK = 512
OK = "ok"


def default_cache_dir() -> str:
    """$IADA_JAX_CACHE/index, else $XDG_CACHE_HOME/iada_jax/index, else ~/.cache/iada_jax/index."""
    root = os.environ.get("IADA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "iada_jax")
    return os.path.join(root, "index")


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """Everything besides the rows and the tokenizer that a row's tokens depend on."""

    max_length: int
    image: ImageProcessorConfig
    merge_size: int
    messages_loss: str = "all"


@dataclasses.dataclass
class RowIndex:
    """Per row: its length in tokens (after truncation; 0 if unusable), images, merged visual
    tokens, the largest image's patches (its vision frame), a reason code (0 = usable), and the
    usable rows' rendered tokens themselves (before image expansion; memory-mapped from the
    cache: about 5 bytes per text token, 0.2 GB for 259K llava rows)."""

    lengths: np.ndarray  # int32 [rows]
    images: np.ndarray  # int16 [rows]
    visual_tokens: np.ndarray  # int32 [rows]
    frame_patches: np.ndarray  # int32 [rows]
    reasons: np.ndarray  # int8 [rows], into reason_names
    reason_names: list[str]
    details: dict[int, str]  # row -> what was wrong, for every unusable row
    tokens: np.ndarray  # int32 [sum]: each usable row's rendered tokens, one <|image_pad|> per image
    token_mask: np.ndarray  # int8 [sum]: 1 where supervised
    token_offsets: np.ndarray  # int64 [rows + 1]: row i's tokens are tokens[offsets[i]:offsets[i + 1]]
    key: str = ""
    path: str = ""
    seconds: float = 0.0  # to build (0 when loaded)

    def row_tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i's tokens and loss mask before the image pads are expanded (sft.expand does that
        once the images' grids are known): the loader neither renders nor tokenises again."""
        a, b = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        return self.tokens[a:b], self.token_mask[a:b]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def usable(self) -> np.ndarray:
        return self.reasons == 0

    def usable_within(self, max_images: int) -> np.ndarray:
        """The usable rows with at most `max_images` images (what a batch's vision bucket holds)."""
        return self.usable & (self.images <= max_images)

    def skipped(self, max_images: int | None = None) -> collections.Counter:
        """Unusable rows by reason; given max_images, rows with more images as too_many_images."""
        counts = np.bincount(self.reasons, minlength=len(self.reason_names))
        out = collections.Counter({self.reason_names[r]: int(n) for r, n in enumerate(counts) if r and n})
        too_many = 0 if max_images is None else int((self.usable & (self.images > max_images)).sum())
        if too_many:
            out["too_many_images"] += too_many
        return out

    def save(self, path: str) -> None:
        """path (.npz: the per-row arrays) and path's .tokens.npy / .mask.npy (memory-mapped when
        loaded); the .npz is written last, atomically: it exists only beside complete token files."""
        for name, array in (("tokens", self.tokens), ("mask", self.token_mask)):
            tmp = f"{path}.{name}.tmp{os.getpid()}.npy"
            np.save(tmp, array)
            os.replace(tmp, f"{path}.{name}.npy")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, lengths=self.lengths, images=self.images, visual_tokens=self.visual_tokens,
                     frame_patches=self.frame_patches, reasons=self.reasons, token_offsets=self.token_offsets,
                     meta=np.frombuffer(json.dumps({"reason_names": self.reason_names, "key": self.key,
                                                    "details": {str(k): v for k, v in self.details.items()},
                                                    "seconds": self.seconds}).encode(), np.uint8))
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: str) -> "RowIndex":
        tokens = np.load(f"{path}.tokens.npy", mmap_mode="r")
        mask = np.load(f"{path}.mask.npy", mmap_mode="r")
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(z["lengths"], z["images"], z["visual_tokens"], z["frame_patches"], z["reasons"],
                       meta["reason_names"], {int(k): v for k, v in meta["details"].items()}, tokens, mask,
                       z["token_offsets"], meta["key"], path, 0.0)


# ---------------------------------------------------------------------- the cache key
def _file_stats(source: str) -> list:
    if not source or not os.path.exists(source):
        return []
    files = [source] if os.path.isfile(source) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(source) for f in names)
    return [(os.path.relpath(f, source) if f != source else os.path.basename(f), os.path.getsize(f),
             os.stat(f).st_mtime_ns) for f in files]


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()


def index_key(rows, tokenizer, settings: IndexSettings, source: str = "") -> str:
    """The cache key: data (fingerprint, size, columns, files), tokenizer + template, settings."""
    data = {"version": INDEX_VERSION, "fingerprint": getattr(rows, "_fingerprint", None), "rows": len(rows),
            "columns": list(rows.column_names), "files": _file_stats(source),
            "settings": dataclasses.asdict(settings), "tokenizer": _tokenizer_digest(tokenizer)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------- one chunk of rows
def image_column(names) -> str | None:
    """The image column of a data set: `images` (a list per row) or `image` (one per row)."""
    return "images" if "images" in names else "image" if "image" in names else None


def _chunk_images(table, column: str | None) -> list[list]:
    """Per row, its image items: memory-mapped bytes as zero-copy buffers (only the pages of
    their headers get read), or paths. Arrow chunks are walked one by one: concatenating them
    would copy (and read from disk) every image."""
    import pyarrow as pa

    if column is None:
        return [[] for _ in range(table.num_rows)]
    out: list[list] = []
    for chunk in table.column(column).chunks:
        single = not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type))
        values = chunk if single else chunk.flatten()  # flatten(): the slice's values, zero-copy
        offsets = np.arange(len(chunk) + 1) if single else chunk.offsets.to_numpy(zero_copy_only=False)
        offsets = offsets - offsets[0]
        valid = np.asarray(chunk.is_valid())
        items = _image_items(values)
        out.extend(items[offsets[r]:offsets[r + 1]] if valid[r] else [] for r in range(len(chunk)))
    return out


def _image_items(values) -> list:
    import pyarrow as pa

    if not pa.types.is_struct(values.type):  # plain strings (paths) or binary
        return values.to_pylist()
    fields = {values.type.field(i).name for i in range(values.type.num_fields)}
    data = values.field("bytes") if "bytes" in fields else None
    paths = values.field("path") if "path" in fields else None
    items = []
    for j in range(len(values)):
        b = data[j] if data is not None else None
        if b is not None and b.is_valid:
            items.append({"bytes": b.as_buffer(), "path": None})  # zero-copy view of the mapped file
        elif paths is not None and paths[j].is_valid:
            items.append({"bytes": None, "path": paths[j].as_py()})
        else:
            items.append(None)
    return items


def _size(item) -> tuple[int, int]:
    if item is None:
        raise BadRow("bad_image", "the image is empty (no bytes and no path)")
    if isinstance(item, dict) and item.get("bytes") is not None:
        return image_size({"bytes": memoryview(item["bytes"]), "path": None})
    if isinstance(item, (bytes, bytearray)):
        return image_size({"bytes": item, "path": None})
    return image_size(item)


def index_chunk(rows, start: int, stop: int, tokenizer, settings: IndexSettings) -> dict:
    """Rows [start, stop): lengths, images, visual tokens, frame patches, reasons (names)."""
    table = rows.with_format("arrow")[start:stop]
    column = image_column(table.column_names)
    images = _chunk_images(table, column)
    texts = table.drop_columns([column]).to_pylist() if column else table.to_pylist()
    n = stop - start
    out = {"lengths": np.zeros(n, np.int32), "images": np.zeros(n, np.int16), "visual_tokens": np.zeros(n, np.int32),
           "frame_patches": np.zeros(n, np.int32), "reasons": [OK] * n, "details": {},
           "token_counts": np.zeros(n, np.int64)}
    kept_ids, kept_mask = [], []
    cfg, merge = settings.image, settings.merge_size
    pending = []  # (row, segments, counts)
    for r in range(n):
        try:
            grids = [image_grid(_size(x), cfg) for x in images[r]]
            counts = [t * h * w // merge**2 for t, h, w in grids]
            segments = render_segments(tokenizer, texts[r], len(grids), settings.messages_loss)
        except BadRow as e:
            out["reasons"][r], out["details"][start + r] = e.reason, e.detail
            continue
        out["images"][r] = len(grids)
        out["visual_tokens"][r] = sum(counts)
        out["frame_patches"][r] = max((t * h * w for t, h, w in grids), default=0)
        pending.append((r, segments, counts))
    flat = tokenize_segments(tokenizer, [t for _, segs, _ in pending for t, _ in segs])
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    k = 0
    for r, segments, counts in pending:
        ids = flat[k:k + len(segments)]
        k += len(segments)
        supervised = [s for _, s in segments]
        try:
            out["lengths"][r] = expanded_length(ids, supervised, counts, pad_id, settings.max_length)
        except BadRow as e:
            out["reasons"][r], out["details"][start + r] = e.reason, e.detail
            continue
        kept_ids.extend(ids)
        kept_mask.extend(supervised)
        out["token_counts"][r] = sum(len(x) for x in ids)
    out["tokens"] = np.fromiter(itertools.chain.from_iterable(kept_ids), np.int32)
    out["token_mask"] = np.repeat(np.asarray(kept_mask, np.int8), [len(x) for x in kept_ids])
    return out


# ---------------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _init_worker(rows, tokenizer, settings):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: they are the parallelism
    _WORKER.update(rows=rows, tokenizer=tokenizer, settings=settings)


def _work(span):
    return span[0], index_chunk(_WORKER["rows"], span[0], span[1], _WORKER["tokenizer"], _WORKER["settings"])


def _process_context():
    """fork while JAX has started no backend (train.py indexes first: a worker is ready at once,
    with the tokenizer and the mapped data inherited); spawn once it has (forking a process
    whose runtime threads hold locks can deadlock the child), at about 10 s of start-up on 2
    cores (each worker imports transformers and datasets again)."""
    import multiprocessing
    import sys

    jax_started = True
    try:
        if "jax" not in sys.modules:
            jax_started = False
        else:
            from jax._src import xla_bridge

            jax_started = xla_bridge.backends_are_initialized()
    except Exception:  # a JAX without this function: be safe
        pass
    return multiprocessing.get_context("spawn" if jax_started else "fork")


# ---------------------------------------------------------------------- build or load
def build_index(rows, tokenizer, settings: IndexSettings, *, source: str = "", workers: int = 2,
                cache_dir: str | None = None, log=print) -> RowIndex:
    """The index of `rows` (a `datasets.Dataset`), loaded from `cache_dir` when it holds one for
    these exact rows and settings, else built (over `workers` processes) and saved there.
    cache_dir="" disables the cache."""
    t0 = time.perf_counter()
    key = index_key(rows, tokenizer, settings, source)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    path = os.path.join(cache_dir, f"{key}.npz") if cache_dir else ""
    if path and os.path.isfile(path):
        try:
            index = RowIndex.load(path)
        except Exception as e:  # a damaged file: rebuild it
            log(f"index: cannot read {path} ({e}); rebuilding it")
        else:
            if len(index) == len(rows):
                log(f"index: {len(index)} rows from the cache {path} ({time.perf_counter() - t0:.2f} s)")
                return index
    n = len(rows)
    spans = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    parts: dict[int, dict] = {}
    done, last = 0, time.perf_counter()

    def progress(rows_done: int, final: bool = False) -> None:
        nonlocal last
        now = time.perf_counter()
        if final or now - last >= 5.0:
            rate = rows_done / max(now - t0, 1e-9)
            left = (n - rows_done) / rate if rate > 0 else float("inf")
            log(f"index: {rows_done}/{n} rows ({100 * rows_done / max(n, 1):.0f}%), {rate:.0f} rows/s"
                + ("" if final else f", about {left:.0f} s left"))
            last = now

    if workers <= 1 or len(spans) <= 1:
        for s, e in spans:
            parts[s] = index_chunk(rows, s, e, tokenizer, settings)
            done += e - s
            progress(done)
    else:
        with _process_context().Pool(min(workers, len(spans)), initializer=_init_worker, initargs=(rows, tokenizer, settings)) as pool:
            for s, part in pool.imap_unordered(_work, spans):
                parts[s] = part
                done += len(part["lengths"])
                progress(done)
    progress(n, final=True)
    order = [parts[s] for s, _ in spans]
    names = [OK] + sorted({r for p in order for r in p["reasons"]} - {OK})
    code = {name: i for i, name in enumerate(names)}
    index = RowIndex(
        lengths=np.concatenate([p["lengths"] for p in order]) if order else np.zeros(0, np.int32),
        images=np.concatenate([p["images"] for p in order]) if order else np.zeros(0, np.int16),
        visual_tokens=np.concatenate([p["visual_tokens"] for p in order]) if order else np.zeros(0, np.int32),
        frame_patches=np.concatenate([p["frame_patches"] for p in order]) if order else np.zeros(0, np.int32),
        reasons=np.asarray([code[r] for p in order for r in p["reasons"]], np.int8),
        reason_names=names, details={k: v for p in order for k, v in p["details"].items()},
        tokens=np.concatenate([p["tokens"] for p in order]) if order else np.zeros(0, np.int32),
        token_mask=np.concatenate([p["token_mask"] for p in order]) if order else np.zeros(0, np.int8),
        token_offsets=np.concatenate([[0], np.cumsum(np.concatenate([p["token_counts"] for p in order]))])
        if order else np.zeros(1, np.int64),
        key=key, path=path, seconds=time.perf_counter() - t0)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        index.save(path)
        log(f"index: built in {index.seconds:.1f} s, saved to {path}")
    return index


def describe(index: RowIndex, buckets: tuple[int, ...], max_images: int, examples_per_reason: int = 3) -> str:
    """What `train.py --index-only` prints: usable rows, skips by reason (naming rows), rows and
    padding per length bucket, images per row."""
    usable = index.usable_within(max_images)
    lines = [f"rows: {len(index)}; usable: {int(usable.sum())} (at most {max_images} images per row: --max-images)"]
    for reason, count in sorted(index.skipped(max_images).items(), key=lambda kv: -kv[1]):
        code = index.reason_names.index(reason) if reason in index.reason_names else None
        rows = np.flatnonzero(index.reasons == code)[:examples_per_reason] if code is not None else []
        named = "; ".join(f"row {r}: {index.details.get(int(r), '')}" for r in rows)
        lines.append(f"  skipped {count:>8} {reason}" + (f"  (e.g. {named})" if named else ""))
    lengths = index.lengths[usable]
    lines.append("length bucket      rows   real tokens   padding")
    lower, total_slots = 0, 0
    for b in buckets:
        sel = (lengths > lower) & (lengths <= b)
        k = int(sel.sum())
        pad = 1.0 - float(lengths[sel].sum()) / (k * b) if k else 0.0
        lines.append(f"  {lower + 1:>5}-{b:<6} {k:>9} {int(lengths[sel].sum()):>13}   {100 * pad:5.1f}%")
        lower, total_slots = b, total_slots + k * b
    if total_slots:
        lines.append(f"  all buckets: {100 * (1 - float(lengths.sum()) / total_slots):.1f}% of token slots are padding")
    counts = collections.Counter(index.images[usable].tolist())
    lines.append("images per row: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if usable.any():
        vt = index.visual_tokens[usable]
        lines.append(f"visual tokens per row: mean {vt.mean():.0f}, max {vt.max()}; "
                     f"tokens per row: mean {lengths.mean():.0f}, max {lengths.max()}")
    return "\n".join(lines)

