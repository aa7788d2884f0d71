"""Minimal safetensors reader and writer on numpy, one tensor at a time.

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


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (C order, little endian) with the keys sorted, as the reference writer does."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"{path}: cannot store tensor {key!r} of dtype {arr.dtype}")
        header[key] = {"dtype": DTYPE_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data block to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
