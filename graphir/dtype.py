"""Element types, their numpy storage, and faithful rounding for bf16 / float8."""
from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    """Element type of a tensor; the value is the short name the textual IR prints."""

    float32 = "f32"
    float16 = "f16"
    bfloat16 = "bf16"
    float8_e4m3fn = "f8e4m3fn"
    int8 = "i8"
    uint8 = "u8"
    int32 = "i32"
    uint32 = "u32"
    int64 = "i64"
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    @property
    def short(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_integral(self) -> bool:
        return not self.is_float and self is not DType.bool

    @property
    def size_in_bytes(self) -> int:
        return _SIZES[self]

    @property
    def storage(self) -> np.dtype:
        """numpy dtype holding values of this type (bf16/f8 are held in float32, rounded)."""
        return np.dtype(_STORAGE[self])

    @staticmethod
    def from_short(name: str) -> "DType":
        try:
            return DType(name)
        except ValueError:
            raise ValueError(f"unknown dtype {name!r}; expected one of "
                             f"{[d.value for d in DType]}") from None

    @staticmethod
    def from_numpy(dt) -> "DType":
        dt = np.dtype(dt)
        for d, s in _STORAGE.items():
            if d not in (DType.bfloat16, DType.float8_e4m3fn) and np.dtype(s) == dt:
                return d
        raise ValueError(f"no graphir dtype for numpy dtype {dt}")


_FLOATS = {DType.float32, DType.float16, DType.bfloat16, DType.float8_e4m3fn}
_SIZES = {DType.float32: 4, DType.float16: 2, DType.bfloat16: 2, DType.float8_e4m3fn: 1,
          DType.int8: 1, DType.uint8: 1, DType.int32: 4, DType.uint32: 4, DType.int64: 8,
          DType.bool: 1}
_STORAGE = {DType.float32: np.float32, DType.float16: np.float16, DType.bfloat16: np.float32,
            DType.float8_e4m3fn: np.float32, DType.int8: np.int8, DType.uint8: np.uint8,
            DType.int32: np.int32, DType.uint32: np.uint32, DType.int64: np.int64,
            DType.bool: np.bool_}


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 (round-to-nearest-even), returned as float32."""
    f = np.asarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF plus the lsb of the kept half rounds to nearest, ties to even.
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), f, out).astype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The raw uint16 bits of bf16 values held in float32 (as the GPU stores them)."""
    return (round_to_bf16(x).view(np.uint32) >> 16).astype(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


_F8_MAX = 448.0


def round_to_f8e4m3fn(x: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3fn (RNE, saturating to +-448 as the 'fn' variant has no inf)."""
    f = np.asarray(x, dtype=np.float64)
    a = np.abs(f)
    # Exponent of each value, clamped at the subnormal boundary (min normal exponent -6).
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(e, -6.0)
    step = np.exp2(e - 3.0)  # 3 mantissa bits
    q = np.round(a / step) * step  # np.round is half-to-even
    q = np.minimum(q, _F8_MAX)
    out = np.sign(f) * q
    return np.where(np.isnan(f), np.nan, out).astype(np.float32)


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Store `x` as `dtype`: the numpy array an op of that result type holds."""
    if dtype is DType.bfloat16:
        return round_to_bf16(x)
    if dtype is DType.float8_e4m3fn:
        return round_to_f8e4m3fn(x)
    if dtype.is_float:
        return np.asarray(x).astype(dtype.storage)
    if dtype is DType.bool:
        return np.asarray(x).astype(np.bool_)
    a = np.asarray(x)
    if a.dtype.kind == "f":
        a = np.trunc(a)
    return a.astype(dtype.storage)
