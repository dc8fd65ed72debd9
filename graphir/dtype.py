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
    r = _bf16_high_half(x)
    return np.left_shift(r, 16, out=r).view(np.float32)   # in place: an array even at rank 0


def _bf16_high_half(x) -> np.ndarray:
    """uint32 array of the rounded bf16 bits (the high half of each rounded float32)."""
    a = np.asarray(x)
    if a.dtype == np.float64:
        f = _f64_to_f32_round_to_odd(a)
    else:
        f = np.asarray(a, np.float32)
    bits = f.view(np.uint32)
    # Adding 0x7FFF plus the lsb of the kept half rounds to nearest, ties to even. In uint32:
    # only a NaN's bits can wrap (the largest finite value plus 0x8000 stays below 2^32), and
    # NaNs are replaced below. In place, four passes of 4-byte words (a bf16 graph's inputs go
    # through here on every call).
    r = np.right_shift(bits, 16, out=np.empty_like(bits))   # an array even at rank 0
    r &= 1
    r += 0x7FFF
    r += bits
    r >>= 16
    nan = np.isnan(f)
    if nan.any():
        # NaN stores as the canonical quiet NaN (0x7FC0); truncating its payload could give inf.
        r[nan] = 0x7FC0
    return r


def _f64_to_f32_round_to_odd(a: np.ndarray) -> np.ndarray:
    # float64 -> float32 -> bf16 would round twice; rounding to odd first (truncate, then set
    # the lsb when inexact) keeps the second, round-to-nearest-even step exact (f32 has 16
    # more bits than bf16).
    with np.errstate(over="ignore"):
        f = a.astype(np.float32)
    f = np.where(np.abs(f.astype(np.float64)) > np.abs(a), np.nextafter(f, np.float32(0)), f)
    bits = np.asarray(f, dtype=np.float32).view(np.uint32)
    inexact = (f.astype(np.float64) != a) & ~np.isnan(a)
    return (bits | inexact.astype(np.uint32)).view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The raw uint16 bits of bf16 values held in float32 (as the GPU stores them)."""
    return _bf16_high_half(x).astype(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


_F8_MAX = 448.0


def round_to_f8e4m3fn(x: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3fn (RNE, saturating to +-448 as the 'fn' variant has no inf)."""
    with np.errstate(invalid="ignore"):  # signalling NaNs in float32 input
        f = np.asarray(x, dtype=np.float64)
    a = np.abs(f)
    # Exponent of each value (frexp is exact; log2 can round up just below a power of two),
    # clamped at the subnormal boundary (min normal exponent -6).
    e = np.frexp(np.where(np.isfinite(a) & (a > 0), a, 1.0))[1] - 1.0
    e = np.maximum(e, -6.0)
    step = np.exp2(e - 3.0)  # 3 mantissa bits
    with np.errstate(invalid="ignore"):
        q = np.round(a / step) * step  # np.round is half-to-even
    q = np.minimum(q, _F8_MAX)
    out = np.copysign(q, f)  # keeps the sign of -0.0 and of values that round to zero
    return np.where(np.isnan(f), np.nan, out).astype(np.float32)


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Store `x` as `dtype`: the numpy array an op of that result type holds."""
    if dtype is DType.bfloat16:
        return round_to_bf16(x)
    if dtype is DType.float8_e4m3fn:
        return round_to_f8e4m3fn(x)
    if dtype.is_float:
        with np.errstate(over="ignore"):  # out of f16 range stores inf, as the device does
            return np.asarray(x).astype(dtype.storage)
    if dtype is DType.bool:
        return np.asarray(x).astype(np.bool_)
    a = np.asarray(x)
    if a.dtype.kind == "f":
        a = np.trunc(a)
    return a.astype(dtype.storage)


def _f8_values() -> np.ndarray:
    """float64 value of each of the 256 float8 e4m3fn codes (0x7F / 0xFF are NaN)."""
    codes = np.arange(256, dtype=np.int64)
    s, ex, m = codes >> 7, (codes >> 3) & 15, codes & 7
    mag = np.where(ex == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (ex - 7.0))
    vals = np.where(s == 1, -mag, mag)
    vals[(ex == 15) & (m == 7)] = np.nan
    return vals


_F8_VALUES = _f8_values()
_F8_ORDER = np.argsort(np.nan_to_num(_F8_VALUES, nan=1e9), kind="stable")


def to_bits(a, dtype: DType) -> np.ndarray:
    """Host values (the interpreter's storage: bf16/f8 held as floats) -> the raw contents a
    compiled kernel or device tensor of `dtype` holds (bf16 as uint16 bits, f8 as uint8 codes).
    An array already in that form is returned as is, so buffers stay shared with the caller."""
    a = np.asarray(a)
    if dtype is DType.bfloat16:
        return a if a.dtype == np.uint16 else np.asarray(bf16_bits(a), order="C")
    if dtype is DType.float8_e4m3fn:
        if a.dtype == np.uint8:
            return a
        r = round_to(a, dtype).astype(np.float64)
        pos = np.searchsorted(_F8_VALUES[_F8_ORDER], r)
        codes = _F8_ORDER[np.clip(pos, 0, 255)].astype(np.uint8)
        # -0.0 and +0.0 compare equal: keep the sign bit.
        return np.asarray(np.where(np.signbit(r) & (r == 0), np.uint8(0x80), codes), np.uint8,
                          order="C")
    if a.dtype == dtype.storage:
        return np.asarray(a, order="C")
    return np.asarray(round_to(a, dtype), order="C")


def from_bits(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """Inverse of to_bits: raw contents (any byte view of them) -> host values."""
    if dtype is DType.bfloat16:
        return bf16_from_bits(bits.view(np.uint16))
    if dtype is DType.float8_e4m3fn:
        return _F8_VALUES[bits.view(np.uint8)].astype(np.float32)
    return bits.view(dtype.storage)
