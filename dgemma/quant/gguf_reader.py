"""A GGUF file's container: its metadata and tensor table, read in one pass, and its tensors as read-only arrays over
a memory map of the file.

The gguf package's own reader builds a numpy view for every element of every metadata array, which takes seconds
for a 262,144-token vocabulary; here a string array is one Python loop and a numeric array one `np.frombuffer`.
Layout (GGUF versions 2 and 3, little-endian):

    "GGUF", version u32, tensor count u64, metadata count u64,
    metadata: key (string), value type u32, value        string: length u64, UTF-8 bytes
                                                         array: element type u32, count u64, elements
    tensor table: name, dimension count u32, dimensions u64 (innermost first), GGML type u32, offset u64
    padding to `general.alignment` (32 by default), then the tensor data, each tensor at its offset from there

Tensor data is given as the gguf package's reader gives it, which its decoders take: float16, float32, float64 and
integer tensors typed, in numpy order; every other type (BF16 included) as bytes [..., bytes per row].
Must not: decode quantized blocks (the package does), or write files.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STRING, _ARRAY = 8, 9
_MAX_DEPTH = 8  # arrays of arrays: deeper nesting is refused, not recursed into
_SCALARS = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
_TYPED = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table. `shape`: ggml order (innermost first); `data`: a read-only array over the file."""
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray


class GGUFReader:
    """`fields`: metadata key -> value (Python int, float, bool or str; arrays as lists); `tensors`: the table in
    file order. A file that is not little-endian GGUF version 2 or 3, is cut short, repeats a tensor name or names an
    unknown GGML type is a ValueError saying so."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if self._map[:4] != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        self._pos = 4
        try:
            version, n_tensors, n_fields = self._take("IQQ")
            if version not in (2, 3):
                endian = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
                raise ValueError(f"GGUF version {version} is not read{endian}; versions 2 and 3 are")
            self.fields = {}
            for _ in range(n_fields):
                key = self._string()
                self.fields[key] = self._value(self._take("I")[0])
            table = [(self._string(), self._take(f"{self._take('I')[0]}Q"), *self._take("IQ")) for _ in range(n_tensors)]
        except (struct.error, UnicodeDecodeError) as err:
            raise ValueError(f"the header is cut short or garbled at byte {self._pos} ({err})") from None
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"general.alignment is {align!r}, not a positive integer")
        start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, raw_type, offset in table:
            try:
                kind = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"tensor {name!r} has an unknown GGML type {raw_type}") from None
            block, size = gguf.GGML_QUANT_SIZES[kind]
            shape = tuple(reversed(dims))  # numpy order
            if not shape or shape[-1] % block:
                raise ValueError(f"tensor {name!r}: shape {list(dims)} does not hold whole {kind.name} blocks of "
                                 f"{block}")
            n_bytes = math.prod(shape) // block * size
            if start + offset + n_bytes > len(self._map):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            if kind.name in _TYPED:
                data = np.frombuffer(self._map, "<" + _TYPED[kind.name], n_bytes // size, start + offset).reshape(shape)
            else:
                data = np.frombuffer(self._map, np.uint8, n_bytes, start + offset).reshape(
                    *shape[:-1], shape[-1] // block * size)
            self.tensors.append(GGUFTensor(name, kind, tuple(dims), n_bytes, data))
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("a tensor name is repeated")

    def _take(self, codes: str) -> tuple:
        """Unpack the struct `codes` at the cursor and move past it."""
        fmt = "<" + codes
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _skip(self, n_bytes: int) -> int:
        """Move the cursor past `n_bytes` bytes (a string's, or an array's values); returns where they start."""
        start = self._pos
        if start + n_bytes > len(self._map):
            raise struct.error(f"{n_bytes} bytes of a value run past the end")
        self._pos += n_bytes
        return start

    def _string(self) -> str:
        (n,) = self._take("Q")
        start = self._skip(n)
        return bytes(self._map[start:start + n]).decode("utf-8")

    def _value(self, kind: int, depth: int = 0):
        """One metadata value of GGUF type `kind` at the cursor, as Python values (`depth`: arrays it is inside)."""
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._array(kind, 1)[0]
        if kind != _ARRAY:
            raise struct.error(f"unknown metadata value type {kind}")
        if depth == _MAX_DEPTH:
            raise struct.error(f"metadata arrays nested more than {_MAX_DEPTH} deep")
        inner, n = self._take("IQ")
        if inner in _SCALARS:
            return self._array(inner, n)
        return [self._value(inner, depth + 1) for _ in range(n)]

    def _array(self, kind: int, n: int) -> list:
        dtype = np.dtype("<" + _SCALARS[kind])
        return np.frombuffer(self._map, dtype, n, self._skip(n * dtype.itemsize)).tolist()
