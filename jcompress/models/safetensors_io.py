"""A small, strict safetensors reader (memory-mapped) and streaming writer.

The reader validates the header before touching data (a corrupt file gets a one-line error
naming the file), then hands out zero-copy ``numpy`` views of a read-only memory map, so a
loader holds at most one tensor beyond what it keeps. bf16 and fp8 map to ``ml_dtypes``.
The writer streams tensors one by one (``producer`` callables), so saving never holds a second
copy of the model either.

Format: https://github.com/huggingface/safetensors (8-byte little-endian header length, JSON
header ``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, then raw bytes).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from jcompress.errors import UserError

__all__ = ["SafetensorsFile", "write_safetensors", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_entries(
    header: dict[str, object], data_len: int, bad: str
) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """Validate the tensor entries as the safetensors spec does: known dtypes, non-negative
    integer shapes and offsets, ``itemsize x prod(shape) == end - begin``, and offsets that
    tile the data region exactly (sorted, contiguous, no overlap, no hole, nothing past or
    short of the end of the file)."""
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise UserError(f"{bad} (tensor {name!r}: needs dtype, shape and data_offsets)")
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise UserError(
                f"{bad} (tensor {name!r}: unknown dtype {code!r}; allowed: {', '.join(DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise UserError(f"{bad} (tensor {name!r}: shape {shape!r} is not a list of ints >= 0)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise UserError(
                f"{bad} (tensor {name!r}: data_offsets {offsets!r} is not [begin, end] ints)"
            )
        dt, (begin, end) = DTYPES[code], offsets
        if end < begin or end - begin != math.prod(shape) * dt.itemsize:
            raise UserError(
                f"{bad} (tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes; "
                f"{code} x {shape} needs {math.prod(shape) * dt.itemsize})"
            )
        entries[name] = (dt, tuple(shape), begin, end)
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at {pos}"
            raise UserError(f"{bad} (tensor {name!r}: data_offsets [{begin}, {end}] {what})")
        pos = end
    if pos > data_len:
        raise UserError(
            f"{bad} (file is truncated: tensors need {pos} bytes of data, it holds {data_len})"
        )
    if pos < data_len:
        raise UserError(
            f"{bad} ({data_len - pos} bytes after the last tensor; tensors cover {pos} of "
            f"{data_len} data bytes)"
        )
    return entries


class SafetensorsFile:
    """Read-only view of one ``.safetensors`` file.

    Raises:
      UserError: the file is missing, truncated, or its header is not valid safetensors.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"missing weights file: {self.path}")
        size = self.path.stat().st_size
        bad = f"{self.path}: corrupt safetensors header"
        if size < 8:
            raise UserError(f"{bad} (file is {size} bytes)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or n > _MAX_HEADER or n > size - 8:
                raise UserError(f"{bad} (header length {n} does not fit a {size}-byte file)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{bad} (not JSON: {e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{bad} (header is not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise UserError(f"{bad} (__metadata__ is a {type(meta).__name__}, not an object)")
        self.metadata = meta or {}
        self._data_start = 8 + n
        self._entries = _parse_entries(header, size - self._data_start, bad)
        self._mm: mmap.mmap | None = None
        self._buf: np.ndarray | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor ``name`` (no copy)."""
        dt, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dt)
        if self._buf is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        start = self._data_start + begin
        return self._buf[start : self._data_start + end].view(dt).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of tensor ``name`` from this process's resident memory.

        The mapping stays valid (pages are read back from the file if touched again); a loader
        calls this once it has copied the tensor, so resident memory holds one copy of the
        model, not two.
        """
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        lo = (self._data_start + begin) // page * page
        hi = self._data_start + end
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def write_safetensors(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors to ``path``, producing each only when it is written.

    Args:
      entries: ``(name, shape, dtype, producer)``; ``producer()`` returns the array.
      metadata: string map stored as ``__metadata__`` (``{"format": "pt"}`` by default).

    Returns:
      Bytes of tensor data written.
    """
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        dt = np.dtype(dtype)
        if dt not in CODES:
            raise UserError(f"tensor {name}: dtype {dt} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {
            "dtype": CODES[dt],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise AssertionError(
                    f"{name}: produced {arr.dtype}{arr.shape}, declared {dtype}{shape}"
                )
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return offset
