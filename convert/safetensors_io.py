"""Minimal safetensors reader and writer on numpy, one tensor at a time (streaming both ways).

Why not `safetensors.numpy`: it cannot return bfloat16 (the dtype real Qwen3-VL weights
ship in), and we want every structural problem of a file (short header, truncated data,
overlapping offsets) reported with the file's name before any tensor is read. The format
is: u64 little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets}},
then the data block.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    file: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse and validate the header of one file; raises SafetensorsError naming `path`."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror})") from None
    if size < 8:
        raise SafetensorsError(f"{path}: truncated ({size} bytes; not even a header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise SafetensorsError(f"{path}: truncated or corrupt (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt header entry for {key!r}") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise SafetensorsError(f"{path}: tensor {key!r} spans {end - begin} bytes, its shape needs {nbytes}")
        if 8 + n + end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {key!r} needs bytes up to {8 + n + end}, the file has {size}"
            )
        entries[key] = TensorEntry(path, key, dtype, shape, 8 + n + begin, 8 + n + end)
    return entries


def load_tensor(entry: TensorEntry) -> np.ndarray:
    """Read one tensor (a fresh array, not a view of a mapping)."""
    dtype = DTYPES[entry.dtype]
    count = (entry.end - entry.begin) // dtype.itemsize
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        arr = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count)
    if arr.size != count:
        raise SafetensorsError(f"{entry.file}: truncated while reading {entry.key!r}")
    return arr.astype(dtype, copy=False).reshape(entry.shape)


class LazyTensor:
    """A tensor of a safetensors file, read when used: `t[i]` reads one slice of the leading
    axis, `np.asarray(t)` the whole tensor. Reads go through the file (no memory map), so what
    a caller drops is freed: a model streams through host memory a tensor at a time."""

    def __init__(self, entry: TensorEntry):
        self.entry = entry
        self.dtype = DTYPES[entry.dtype]
        self.shape = tuple(entry.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.entry.end - self.entry.begin

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)):
            return np.asarray(self)[i]
        if not -self.shape[0] <= i < self.shape[0]:
            raise IndexError(f"index {i} out of range for {self.entry.key!r} of shape {list(self.shape)}")
        i = int(i) % self.shape[0]
        inner = self.shape[1:]
        count = int(np.prod(inner, dtype=np.int64))
        with open(self.entry.file, "rb") as f:
            f.seek(self.entry.begin + i * count * self.dtype.itemsize)
            arr = np.fromfile(f, dtype=self.dtype.newbyteorder("<"), count=count)
        if arr.size != count:
            raise SafetensorsError(f"{self.entry.file}: truncated while reading {self.entry.key!r}")
        return arr.astype(self.dtype, copy=False).reshape(inner)

    def __array__(self, dtype=None, copy=None):
        arr = load_tensor(self.entry)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=False)


def write_safetensors_stream(path: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]], chunks,
                             metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one piece at a time: `specs` [(key, dtype, shape)] fix the header
    first; then `chunks(key)` yields the key's tensor as consecutive C-order pieces (one array,
    or its leading-axis slices), written as they come. Memory: one piece. Keys are written
    sorted, as the reference writer does."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    order = sorted(specs, key=lambda spec: spec[0])
    for key, dtype, shape in order:
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"{path}: cannot store tensor {key!r} of dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data block to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, dtype, shape in order:
            want = header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
            written = 0
            for piece in chunks(key):
                piece = np.ascontiguousarray(piece, dtype=np.dtype(dtype).newbyteorder("<"))
                f.write(piece.reshape(-1).view(np.uint8))
                written += piece.nbytes
            if written != want:
                raise SafetensorsError(f"{path}: tensor {key!r} gave {written} bytes, its shape {list(shape)} needs {want}")


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (C order, little endian) with the keys sorted, as the reference writer does."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    write_safetensors_stream(path, [(k, a.dtype, a.shape) for k, a in arrays.items()], lambda k: [arrays[k]], metadata)
