"""The structure of a GGUF file's header, checked against the file's size before the gguf package
parses it.

The gguf package's reader walks an array value item by item for as many items as its count says
and reads past the end of the file as empty arrays, so a count damaged into the billions (one
flipped bit, seen by fuzzing) keeps it busy for hours. Here every count is bounded by the bytes
left: an array of N items of a fixed-size type must fit whole, and an array of strings or arrays
needs at least 8 or 12 bytes an item, so the walk is linear in the file's size. Layout (GGUF v2+,
little-endian, or big-endian where the version reads byte-swapped, as the reader decides): magic,
version u32, tensor count u64, key count u64; then each key (string: u64 length + bytes), its
value type u32 and value; then each tensor's name, dimension count u32, dims u64 each, type u32
and data offset u64.
"""
from __future__ import annotations

import mmap
import os
import struct

# Value type -> size in bytes of the fixed-size ones (GGUF's gguf_type).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MIN_ITEM = {_STRING: 8, _ARRAY: 12}     # the smallest encoding of one such item
_MAX_NESTING = 4                          # arrays of arrays deeper than this are refused
_MAX_DIMS = 8                             # GGML uses 4; the reader takes any count


def check_gguf_header(path: str | os.PathLike[str]) -> None:
    """Raise ValueError naming the first part of the header that does not fit in the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{size} bytes: too short for a GGUF header (24 bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Walk(data, size).header()


class _Walk:
    def __init__(self, data, size: int):
        self.data, self.size, self.pos = data, size, 0
        self.order = "<"

    def take(self, n: int, what: str) -> int:
        """The offset of the next n bytes, which must be in the file."""
        if n > self.size - self.pos:
            raise ValueError(f"{what} at byte {self.pos} needs {n} bytes, the file has "
                             f"{self.size - self.pos} left (truncated or corrupt)")
        at, self.pos = self.pos, self.pos + n
        return at

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.data, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what}'s length")
        at = self.take(n, f"{what} ({n} bytes)")
        return bytes(self.data[at:at + n])

    def strings(self, count: int, label: str) -> None:
        """`count` strings in a row (a vocabulary: 100k+ of them), walked in one tight loop."""
        data, size, pos, fmt = self.data, self.size, self.pos, self.order + "Q"
        for i in range(count):
            n = struct.unpack_from(fmt, data, pos)[0] if size - pos >= 8 else size
            if n > size - pos - 8:
                self.pos = pos
                raise ValueError(f"{label}'s string {i} at byte {pos} does not fit in the "
                                 f"{size - pos} bytes left (truncated or corrupt)")
            pos += 8 + n
        self.pos = pos

    def header(self) -> None:
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError(f"not a GGUF file: it starts with {bytes(self.data[:4])!r}")
        self.pos = 4
        if struct.unpack_from("<I", self.data, 4)[0] & 0xFFFF == 0:
            self.order = ">"
        self.u32("the version")
        n_tensors = self.u64("the tensor count")
        n_keys = self.u64("the key count")
        # A key needs at least 13 bytes (length, type, one byte of value); a tensor's entry 24.
        self.bounded(n_keys, 13, "keys")
        for i in range(n_keys):
            key = self.string(f"key {i}'s name")
            label = f"key {i} ({key[:60].decode('utf-8', 'replace')!r})"
            self.value(self.u32(f"{label}'s type"), label, 0)
        self.bounded(n_tensors, 24, "tensors")
        for i in range(n_tensors):
            name = self.string(f"tensor {i}'s name")
            label = f"tensor {i} ({name[:60].decode('utf-8', 'replace')!r})"
            n_dims = self.u32(f"{label}'s dimension count")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"{label} has {n_dims} dimensions (at most {_MAX_DIMS})")
            self.take(8 * n_dims + 12, f"{label}'s dims, type and offset")

    def bounded(self, count: int, least: int, what: str) -> None:
        if count * least > self.size - self.pos:
            raise ValueError(f"the header declares {count} {what} at byte {self.pos}, more than "
                             f"the {self.size - self.pos} bytes left can hold")

    def value(self, vtype: int, label: str, depth: int) -> None:
        if vtype in _FIXED:
            self.take(_FIXED[vtype], f"{label}'s value")
        elif vtype == _STRING:
            self.string(f"{label}'s string")
        elif vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise ValueError(f"{label}: arrays nested deeper than {_MAX_NESTING}")
            itype = self.u32(f"{label}'s item type")
            count = self.u64(f"{label}'s item count")
            if itype in _FIXED:
                self.take(count * _FIXED[itype], f"{label}'s {count} items")
                return
            if itype not in _MIN_ITEM:
                raise ValueError(f"{label}: unknown array item type {itype}")
            self.bounded(count, _MIN_ITEM[itype], f"items in {label}")
            if itype == _STRING:
                self.strings(count, label)
                return
            for _ in range(count):
                self.value(itype, label, depth + 1)
        else:
            raise ValueError(f"{label}: unknown value type {vtype}")
