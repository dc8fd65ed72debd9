"""GGUF block decoders in Triton: one function per encoding turns a tile of blocks into float32.

Rows of a GGUF weight are `K / block_elems` blocks of `block_bytes` bytes (the layouts of the
gguf format; every block size is even, so blocks are read as 16-bit words). A decoder takes the
row start pointers `p8` `[BN, 1, 1]` (uint8) and group indices `g` `[1, NG, 1]` and returns
`(planes, idx)`: P tensors `[BN, NG, L]` of dequantized values and P tensors `[1, NG, L]` with
the index of each value within its row. A *group* is the part of a block one word lane `i < L`
walks: the 32 values of a Q4_0/Q8_0/Q4_1/Q5_x block, or 64 values of a K-quant super-block
(four groups per block); plane p holds the values that sit at bit position p of those words.
The planes come out in storage order, not value order; consumers gather x by `idx` (a matmul
only needs the same permutation on both operands) or scatter by it (dequantize).

Codes become floats without an int -> float conversion (16 per clock per SM on Hopper): a code
c < 2**23 OR-ed into the bits of 2**23 is the float 2**23 + c, so one subtraction gives c minus
any constant offset exactly. Codes that sit high in a word are masked in place (c * 2**s) and
the scale is divided by 2**s instead, saving a shift. Every value is exact up to the one
rounding GGML's reference also does (its `d * sc * q - dmin * m` products are exact in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@dataclass(frozen=True)
class Fmt:
    """Kernel geometry of an encoding: E values per group in P planes of L words."""

    id: int
    E: int            # values per group
    L: int            # 16-bit words (lanes) per plane
    P: int            # planes
    block_elems: int
    block_bytes: int


FORMATS = {f: Fmt(i, *geo) for i, (f, geo) in enumerate({
    "Q4_0": (32, 8, 4, 32, 18), "Q4_1": (32, 8, 4, 32, 20), "Q5_0": (32, 8, 4, 32, 22),
    "Q5_1": (32, 8, 4, 32, 24), "Q8_0": (32, 16, 2, 32, 34), "Q2_K": (64, 8, 8, 256, 84),
    "Q3_K": (64, 8, 8, 256, 110), "Q4_K": (64, 16, 4, 256, 144), "Q5_K": (64, 16, 4, 256, 176),
    "Q6_K": (64, 8, 8, 256, 210), "F16": (16, 16, 1, 1, 2), "BF16": (16, 16, 1, 1, 2),
    "F32": (16, 16, 1, 1, 4)}.items())}


def fmt(encoding: str) -> Fmt:
    """The kernel geometry of a GGUF encoding name; ValueError for one without a decoder."""
    if encoding not in FORMATS:
        raise ValueError(f"no cuda GGUF decoder for encoding {encoding!r}; have {sorted(FORMATS)}")
    return FORMATS[encoding]


def groups_per_row(encoding: str, k: int) -> int:
    """Groups in a row of k values (ValueError when k is not whole groups)."""
    f = fmt(encoding)
    if k % f.E or k % f.block_elems:
        raise ValueError(f"{encoding}: in_features={k} must be a multiple of {max(f.E, f.block_elems)}"
                         f" for the cuda kernels")
    return k // f.E


# -- small helpers -------------------------------------------------------------------------------
@triton.jit
def _mag(bits, bias: tl.constexpr):
    """float(bits) - bias for 0 <= bits < 2**23 (exact; no int -> float conversion)."""
    return (bits | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _hw(p8, off):
    """The little-endian 16-bit words at word offsets `off` of the rows, as int32."""
    return tl.load(p8.to(tl.pointer_type(tl.uint16)) + off).to(tl.int32)


@triton.jit
def _f16(p8, off):
    return tl.load(p8.to(tl.pointer_type(tl.float16)) + off).to(tl.float32)


@triton.jit
def _u8(p8, off):
    return tl.load(p8 + off).to(tl.int32)


@triton.jit
def _kscale(p8, sb, j):
    """(scale, min) 6-bit pair j (0..7) of a Q4_K/Q5_K block whose 12 scale bytes start at byte
    sb: j < 4 keep the low 6 bits of bytes j, j+4; j >= 4 join nibbles of byte j+4 with the top
    two bits of bytes j-4 (scale) and j (min)."""
    lo = j < 4
    x1 = _u8(p8, sb + j)
    x2 = _u8(p8, sb + j + 4)
    x0 = _u8(p8, sb + tl.where(lo, j, j - 4))
    sc = tl.where(lo, x1 & 63, (x2 & 15) | ((x0 >> 6) << 4))
    mn = tl.where(lo, x2 & 63, (x2 >> 4) | ((x1 >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


# -- 32-value blocks -----------------------------------------------------------------------------
# Word i of the 16 code bytes holds values 2i (bits 0-3), 2i+1 (8-11), 2i+16 (4-7), 2i+17 (12-15).
@triton.jit
def _nib4(h, a, b, e):
    """The four nibble planes of words h as a * code + b, and their value indices."""
    return ((_mag(h & 0xF, 0.0) * a + b, _mag(h & 0xF00, 0.0) * (a * 0.00390625) + b,
             _mag(h & 0xF0, 0.0) * (a * 0.0625) + b, _mag(h & 0xF000, 0.0) * (a * 0.000244140625) + b),
            (e, e + 1, e + 16, e + 17))


@triton.jit
def _q4_0(p8, g, i):
    # (code - 8) * d with the offset in the magic constant: the sign of a zero matches GGML's.
    blk = g * 9
    d = _f16(p8, blk)
    h = _hw(p8, blk + 1 + i)
    e = g * 32 + 2 * i
    return ((_mag(h & 0xF, 8.0) * d, _mag(h & 0xF00, 2048.0) * (d * 0.00390625),
             _mag(h & 0xF0, 128.0) * (d * 0.0625), _mag(h & 0xF000, 32768.0) * (d * 0.000244140625)),
            (e, e + 1, e + 16, e + 17))


@triton.jit
def _q4_1(p8, g, i):
    blk = g * 10
    return _nib4(_hw(p8, blk + 2 + i), _f16(p8, blk), _f16(p8, blk + 1), g * 32 + 2 * i)


@triton.jit
def _nib5(h, qh, i, a, b, bias: tl.constexpr, e):
    """Five-bit planes: nibbles of h plus bit (value index) of the 32-bit qh as bit 4; b None
    adds nothing (so a zero keeps the sign GGML's product gives it)."""
    q0 = (h & 0xF) | (((qh >> (2 * i)) & 1) << 4)
    q1 = ((h >> 8) & 0xF) | (((qh >> (2 * i + 1)) & 1) << 4)
    q2 = ((h >> 4) & 0xF) | (((qh >> (2 * i + 16)) & 1) << 4)
    q3 = ((h >> 12) & 0xF) | (((qh >> (2 * i + 17)) & 1) << 4)
    if b is None:
        r = (_mag(q0, bias) * a, _mag(q1, bias) * a, _mag(q2, bias) * a, _mag(q3, bias) * a)
    else:
        r = (_mag(q0, bias) * a + b, _mag(q1, bias) * a + b, _mag(q2, bias) * a + b,
             _mag(q3, bias) * a + b)
    return r, (e, e + 1, e + 16, e + 17)


@triton.jit
def _q5_0(p8, g, i):
    blk = g * 11
    qh = _hw(p8, blk + 1) | (_hw(p8, blk + 2) << 16)
    return _nib5(_hw(p8, blk + 3 + i), qh, i, _f16(p8, blk), None, 16.0, g * 32 + 2 * i)


@triton.jit
def _q5_1(p8, g, i):
    blk = g * 12
    qh = _hw(p8, blk + 2) | (_hw(p8, blk + 3) << 16)
    return _nib5(_hw(p8, blk + 4 + i), qh, i, _f16(p8, blk), _f16(p8, blk + 1), 0.0,
                 g * 32 + 2 * i)


@triton.jit
def _q8_0(p8, g, i):
    # Signed bytes: flipping the sign bit gives code + 128.
    blk = g * 17
    d = _f16(p8, blk)
    h = _hw(p8, blk + 1 + i)
    e = g * 32 + 2 * i
    return ((_mag((h & 0xFF) ^ 0x80, 128.0) * d,
             _mag((h & 0xFF00) ^ 0x8000, 32768.0) * (d * 0.00390625)), (e, e + 1))


# -- K-quant super-blocks (256 values, four groups) ----------------------------------------------
@triton.jit
def _q4_k(p8, g, i):
    # Group c = 64-value chunk: code bytes 32c.. hold sub-block 2c (low nibbles), 2c+1 (high).
    blk = (g // 4) * 72
    c = g % 4
    d = _f16(p8, blk)
    dmin = _f16(p8, blk + 1)
    sc0, m0 = _kscale(p8, blk * 2 + 4, 2 * c)
    sc1, m1 = _kscale(p8, blk * 2 + 4, 2 * c + 1)
    h = _hw(p8, blk + 8 + 16 * c + i)
    a0, b0, a1, b1 = d * sc0, -(dmin * m0), d * sc1, -(dmin * m1)
    e = g * 64 + 2 * i
    return ((_mag(h & 0xF, 0.0) * a0 + b0, _mag(h & 0xF00, 0.0) * (a0 * 0.00390625) + b0,
             _mag(h & 0xF0, 0.0) * (a1 * 0.0625) + b1,
             _mag(h & 0xF000, 0.0) * (a1 * 0.000244140625) + b1), (e, e + 1, e + 32, e + 33))


@triton.jit
def _q5_k(p8, g, i):
    # As Q4_K plus a fifth bit: bit 2c (low nibbles) / 2c+1 (high) of qh byte l for value l.
    blk = (g // 4) * 88
    c = g % 4
    d = _f16(p8, blk)
    dmin = _f16(p8, blk + 1)
    sc0, m0 = _kscale(p8, blk * 2 + 4, 2 * c)
    sc1, m1 = _kscale(p8, blk * 2 + 4, 2 * c + 1)
    hq = _hw(p8, blk + 8 + i)
    h = _hw(p8, blk + 24 + 16 * c + i)
    q0 = (h & 0xF) | (((hq >> (2 * c)) & 1) << 4)
    q1 = ((h >> 8) & 0xF) | (((hq >> (8 + 2 * c)) & 1) << 4)
    q2 = ((h >> 4) & 0xF) | (((hq >> (2 * c + 1)) & 1) << 4)
    q3 = ((h >> 12) & 0xF) | (((hq >> (9 + 2 * c)) & 1) << 4)
    a0, b0, a1, b1 = d * sc0, -(dmin * m0), d * sc1, -(dmin * m1)
    e = g * 64 + 2 * i
    return ((_mag(q0, 0.0) * a0 + b0, _mag(q1, 0.0) * a0 + b0, _mag(q2, 0.0) * a1 + b1,
             _mag(q3, 0.0) * a1 + b1), (e, e + 1, e + 32, e + 33))


@triton.jit
def _q6_pair(lo, hq, a, k: tl.constexpr, e):
    """Values 32k + 2i + b (b = 0, 1) of a Q6_K half: nibbles of `lo`, two bits of qh words."""
    s: tl.constexpr = 4 * (k // 2)
    q0 = ((lo >> s) & 0xF) | (((hq >> (2 * k)) & 3) << 4)
    q1 = ((lo >> (8 + s)) & 0xF) | (((hq >> (8 + 2 * k)) & 3) << 4)
    return _mag(q0, 32.0) * a, _mag(q1, 32.0) * a, e + 32 * k, e + 32 * k + 1


@triton.jit
def _q6_k(p8, g, i):
    # Group (half hh, s): qh words 8s+i of the half; ql words 8s+i (values 2i+b, 64+2i+b) and
    # 16+8s+i (32+.., 96+..); value v of the half has scale v // 16 = 8hh + 2k + s.
    blk = (g // 4) * 105
    hh = (g % 4) // 2
    s = g % 2
    d = _f16(p8, blk + 104)
    sc = (blk * 2 + 192 + 8 * hh + s).to(tl.int32)
    ptr8 = p8.to(tl.pointer_type(tl.int8))
    ha = _hw(p8, blk + 32 * hh + 8 * s + i)
    hb = _hw(p8, blk + 32 * hh + 16 + 8 * s + i)
    hq = _hw(p8, blk + 64 + 16 * hh + 8 * s + i)
    e = (g // 4) * 256 + 128 * hh + 16 * s + 2 * i
    w0, w1, e0, e1 = _q6_pair(ha, hq, d * tl.load(ptr8 + sc).to(tl.float32), 0, e)
    w2, w3, e2, e3 = _q6_pair(hb, hq, d * tl.load(ptr8 + sc + 2).to(tl.float32), 1, e)
    w4, w5, e4, e5 = _q6_pair(ha, hq, d * tl.load(ptr8 + sc + 4).to(tl.float32), 2, e)
    w6, w7, e6, e7 = _q6_pair(hb, hq, d * tl.load(ptr8 + sc + 6).to(tl.float32), 3, e)
    return (w0, w1, w2, w3, w4, w5, w6, w7), (e0, e1, e2, e3, e4, e5, e6, e7)


@triton.jit
def _q2_pair(h, a, b, j: tl.constexpr, e):
    """Values 32j + 2i + b of a Q2_K group: bits 2j.. of both bytes of word h, as a * q + b."""
    return (_mag(h & (3 << (2 * j)), 0.0) * (a * (1.0 / (1 << (2 * j)))) + b,
            _mag(h & (3 << (8 + 2 * j)), 0.0) * (a * (1.0 / (1 << (8 + 2 * j)))) + b,
            e + 32 * j, e + 32 * j + 1)


@triton.jit
def _q2_k(p8, g, i):
    # Group (n, s): code bytes 32n + 16s + l; value 128n + 32j + 16s + l takes bits 2j, and the
    # scale byte 8n + 2j + s (low nibble scale, high nibble min).
    blk = (g // 4) * 42
    n = (g % 4) // 2
    s = g % 2
    d = _f16(p8, blk + 40)
    dmin = _f16(p8, blk + 41)
    sb = blk * 2 + 8 * n + s
    h = _hw(p8, blk + 8 + 16 * n + 8 * s + i)
    e = (g // 4) * 256 + 128 * n + 16 * s + 2 * i
    x0, x1, x2, x3 = _u8(p8, sb), _u8(p8, sb + 2), _u8(p8, sb + 4), _u8(p8, sb + 6)
    w0, w1, e0, e1 = _q2_pair(h, d * (x0 & 15).to(tl.float32), -(dmin * (x0 >> 4).to(tl.float32)), 0, e)
    w2, w3, e2, e3 = _q2_pair(h, d * (x1 & 15).to(tl.float32), -(dmin * (x1 >> 4).to(tl.float32)), 1, e)
    w4, w5, e4, e5 = _q2_pair(h, d * (x2 & 15).to(tl.float32), -(dmin * (x2 >> 4).to(tl.float32)), 2, e)
    w6, w7, e6, e7 = _q2_pair(h, d * (x3 & 15).to(tl.float32), -(dmin * (x3 >> 4).to(tl.float32)), 3, e)
    return (w0, w1, w2, w3, w4, w5, w6, w7), (e0, e1, e2, e3, e4, e5, e6, e7)


@triton.jit
def _q3_scale(p8, sb, sidx):
    """Signed 6-bit scale sidx (0..15) of a Q3_K block whose 12 scale bytes start at sb."""
    low = (_u8(p8, sb + sidx % 8) >> (4 * (sidx // 8))) & 0xF
    high = (_u8(p8, sb + 8 + sidx % 4) >> (2 * (sidx // 4))) & 3
    return ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _q3_pair(hq, hm, n, a, j: tl.constexpr, e):
    """Values 32j + 2i + b of a Q3_K group: two low bits from hq, a missing hmask bit
    (4n + j) subtracts 4."""
    q0 = ((hq >> (2 * j)) & 3) | (((hm >> (4 * n + j)) & 1) << 2)
    q1 = ((hq >> (8 + 2 * j)) & 3) | (((hm >> (8 + 4 * n + j)) & 1) << 2)
    return _mag(q0, 4.0) * a, _mag(q1, 4.0) * a, e + 32 * j, e + 32 * j + 1


@triton.jit
def _q3_k(p8, g, i):
    blk = (g // 4) * 55
    n = (g % 4) // 2
    s = g % 2
    d = _f16(p8, blk + 54)
    sb = blk * 2 + 96
    hm = _hw(p8, blk + 8 * s + i)
    hq = _hw(p8, blk + 16 + 16 * n + 8 * s + i)
    e = (g // 4) * 256 + 128 * n + 16 * s + 2 * i
    si = 8 * n + s
    w0, w1, e0, e1 = _q3_pair(hq, hm, n, d * _q3_scale(p8, sb, si), 0, e)
    w2, w3, e2, e3 = _q3_pair(hq, hm, n, d * _q3_scale(p8, sb, si + 2), 1, e)
    w4, w5, e4, e5 = _q3_pair(hq, hm, n, d * _q3_scale(p8, sb, si + 4), 2, e)
    w6, w7, e6, e7 = _q3_pair(hq, hm, n, d * _q3_scale(p8, sb, si + 6), 3, e)
    return (w0, w1, w2, w3, w4, w5, w6, w7), (e0, e1, e2, e3, e4, e5, e6, e7)


# -- unquantized rows ----------------------------------------------------------------------------
@triton.jit
def _float(p8, g, i, KIND: tl.constexpr):
    e = g * 16 + i
    if KIND == 0:
        v = _f16(p8, e)
    elif KIND == 1:
        v = (_hw(p8, e) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(p8.to(tl.pointer_type(tl.float32)) + e)
    return (v,), (e,)


@triton.jit
def deq_planes(p8, g, ENC: tl.constexpr, L: tl.constexpr):
    """(P value planes [BN, NG, L] float32, P index planes [1, NG, L]) of groups g [1, NG, 1] of
    the rows at p8 [BN, 1, 1]; ENC is FORMATS[name].id."""
    i = tl.arange(0, L)[None, None, :]
    if ENC == 0:
        r = _q4_0(p8, g, i)
    elif ENC == 1:
        r = _q4_1(p8, g, i)
    elif ENC == 2:
        r = _q5_0(p8, g, i)
    elif ENC == 3:
        r = _q5_1(p8, g, i)
    elif ENC == 4:
        r = _q8_0(p8, g, i)
    elif ENC == 5:
        r = _q2_k(p8, g, i)
    elif ENC == 6:
        r = _q3_k(p8, g, i)
    elif ENC == 7:
        r = _q4_k(p8, g, i)
    elif ENC == 8:
        r = _q5_k(p8, g, i)
    elif ENC == 9:
        r = _q6_k(p8, g, i)
    else:
        r = _float(p8, g, i, ENC - 10)
    return r
