"""GGUF block decoders for the CPU quantized kernels (MLIR text), one per encoding.

Every quantized GGUF block is `y = scale[s] * q - offset[s]` per sub-block s of `sub` values
(Q4_1 / Q5_1's `q * d + m` is `d * q - (-m)`, the same float). A decoder therefore gives two
functions of a `Block` (the row's uint8 memref, the row, the block's first byte; loads are
memoized, so bytes shared by two chunks are read once):

    scales(block) -> (vector<S x f32> scales, vector<S x f32> offsets or None)   S sub-blocks,
                     computed with vector ops from the packed scale bytes;
    codes(block, j) -> vector<width x f32>, the integer q of values [width j, width j + width).

The row path of quant_kernels.py multiplies codes with x and applies a sub-block's scale once
to the partial dot product (and the offsets once per block, against precomputed sums of x);
`value` gives the decoded floats themselves (tiles, `dequantize`): scale * q then - offset,
in float32 in GGML's order (ops/quant/gguf_blocks.py, gguf_kquants.py), so bit-identical to
the interpreter (MLIR emits no fused multiply-add unless asked). F32 / F16 / BF16 rows have
no scales: their codes are the values.

Adding an encoding = one `@decoder(name, elems, bytes, sub)` class with `scales` and `codes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention import Text

W = 16  # values per decoded chunk of a quantized block (every quantized block is a multiple)


class Block:
    """Block b of row `row` of a uint8 weight memref `[rows, row_bytes]`, starting at byte `base`."""

    def __init__(self, t: Text, mem: str, mem_t: str, row: str, base: str, width: int = W):
        self.t, self.mem, self.mem_t, self.row, self.base, self.width = t, mem, mem_t, row, base, width
        self._memo: dict = {}

    def memo(self, key, fn: Callable[[], str]) -> str:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def _col(self, off: int) -> str:
        return self.t(f"arith.addi {self.base}, {self.t.idx(off)} : index") if off else self.base

    def bytes(self, off: int, n: int | None = None) -> str:
        """vector<n x i8> of the block's bytes [off, off + n)."""
        n = n or self.width
        return self.memo(("b", off, n), lambda: self.t(
            f"vector.load {self.mem}[{self.row}, {self._col(off)}] : {self.mem_t}, vector<{n}xi8>"))

    def u32(self, off: int, n: int | None = None) -> str:
        """The bytes [off, off + n) zero-extended to vector<n x i32>."""
        n = n or self.width
        return self.memo(("u", off, n), lambda: self.t(
            f"arith.extui {self.bytes(off, n)} : vector<{n}xi8> to vector<{n}xi32>"))

    def scalar(self, off: int, ty: str, nbytes: int) -> str:
        """The little-endian scalar of type ty at byte off (nbytes wide)."""
        t = self.t
        v = self.bytes(off, nbytes)
        return self.memo(("s", off, ty), lambda: t(
            f"vector.extract {t(f'vector.bitcast {v} : vector<{nbytes}xi8> to vector<1x{ty}>')}[0] "
            f": {ty} from vector<1x{ty}>"))

    def f16(self, off: int) -> str:
        """The float16 at byte off, as f32."""
        return self.memo(("h", off), lambda: self.t(
            f"arith.extf {self.scalar(off, 'f16', 2)} : f16 to f32"))

    def byte(self, off: int, signed: bool = False) -> str:
        """Byte off as an i32 (zero- or sign-extended)."""
        ext = "arith.extsi" if signed else "arith.extui"
        return self.memo(("y", off, signed), lambda: self.t(
            f"{ext} {self.scalar(off, 'i8', 1)} : i8 to i32"))

    def itof(self, v: str) -> str:
        return self.t(f"arith.sitofp {v} : i32 to f32")

    def splat(self, s: str, ty: str = "f32") -> str:
        return self.memo(("splat", s), lambda: self.t(
            f"vector.broadcast {s} : {ty} to vector<{self.width}x{ty}>"))

    # vector<width x i32> arithmetic with constants
    def vi(self, op: str, a: str, c: int | str) -> str:
        vt = f"vector<{self.width}xi32>"
        b = c if isinstance(c, str) else self.t.const(str(c), vt)
        return self.t(f"arith.{op} {a}, {b} : {vt}")

    def tof(self, v: str) -> str:
        return self.t(f"arith.sitofp {v} : vector<{self.width}xi32> to vector<{self.width}xf32>")

    def vf(self, op: str, a: str, b: str) -> str:
        return self.t(f"arith.{op} {a}, {b} : vector<{self.width}xf32>")


def lane(b: Block, v: str, s: int, n: int) -> str:
    """vector<width x f32> of lane s of v (a vector<n x f32>)."""
    return b.memo(("lane", v, s), lambda: b.t(
        f"vector.shuffle {v}, {v} [{', '.join([str(s)] * b.width)}] : "
        f"vector<{n}xf32>, vector<{n}xf32>"))


@dataclass(frozen=True)
class Decoder:
    """An encoding's block: `elems` values in `nbytes` bytes, one scale per `sub` values (None:
    float rows, no scales); decoded `width` values a chunk."""
    name: str
    elems: int
    nbytes: int
    sub: int | None
    codes: Callable[[Block, int], str]
    scales: Callable[[Block], tuple[str, str | None]] | None = None
    offsets: bool = False   # scales() gives offsets too
    width: int = W
    # Optional: the scales as small integers for the row path (see IntScales)
    int_scales: Callable[[Block], "IntScales"] | None = None

    @property
    def chunks(self) -> int:
        return self.elems // self.width

    @property
    def n_sub(self) -> int:
        return self.elems // self.sub if self.sub else 0

    def block_scales(self, b: Block) -> tuple[str, str | None]:
        return b.memo("scales", lambda: self.scales(b))

    def value(self, b: Block, j: int) -> str:
        """The decoded floats of chunk j (bit-identical to the reference)."""
        q = self.codes(b, j)
        if self.scales is None:
            return q
        sv, ov = self.block_scales(b)
        s = j * self.width // self.sub
        y = b.vf("mulf", lane(b, sv, s, self.n_sub), q)
        return b.vf("subf", y, lane(b, ov, s, self.n_sub)) if ov is not None else y


DECODERS: dict[str, Decoder] = {}


def decoder(name: str, elems: int, nbytes: int, sub: int, offsets: bool = False):
    """Register the class's `codes` and `scales` (static methods; `int_scales` too if it has
    one) as `name`'s decoder."""
    def deco(cls):
        DECODERS[name] = Decoder(name, elems, nbytes, sub, cls.codes, cls.scales, offsets,
                                 int_scales=getattr(cls, "int_scales", None))
        return cls
    return deco


@dataclass(frozen=True)
class IntScales:
    """A block's scales as d * sc[s] (offsets dmin * mn[s]) with sc, mn small unsigned
    integers (< TABLE), for the row path: it never converts them with vector ops but reads
    float(sc[s]) from a table of 0..TABLE-1 as the broadcast operand of the sub-block's FMA,
    applies d once per block, and dmin once per block to mn . (sums of x).

    words: i32 scalars holding sc[s] in byte s % 4 of words[s // 4] (bits above `bits` of a
    byte may hold other data: `index` masks them); mins: vector<S x f32> of mn or None."""
    words: list
    bits: int
    d: str
    mins: str | None = None
    dmin: str | None = None

    def index(self, t, s: int) -> str:
        w = self.words[s // 4]
        sh = 8 * (s % 4)
        v = t(f"arith.shrui {w}, {t.const(str(sh), 'i32')} : i32") if sh else w
        if sh < 24 or self.bits < 8:
            v = t(f"arith.andi {v}, {t.const(str((1 << self.bits) - 1), 'i32')} : i32")
        return t(f"arith.index_castui {v} : i32 to index")


TABLE = 64   # entries of the row path's table of small integers as floats


def float_decoder(name: str, width: int) -> Decoder:
    """F32 / F16 / BF16 rows as blocks of `width` values (any width dividing the row)."""
    size = 4 if name == "F32" else 2

    def codes(b: Block, j: int) -> str:
        t, n = b.t, width
        raw = b.bytes(0, size * n)
        if name == "F32":
            return t(f"vector.bitcast {raw} : vector<{4 * n}xi8> to vector<{n}xf32>")
        if name == "F16":
            h = t(f"vector.bitcast {raw} : vector<{2 * n}xi8> to vector<{n}xf16>")
            return t(f"arith.extf {h} : vector<{n}xf16> to vector<{n}xf32>")
        u = t(f"vector.bitcast {raw} : vector<{2 * n}xi8> to vector<{n}xi16>")
        u = t(f"arith.extui {u} : vector<{n}xi16> to vector<{n}xi32>")
        u = b.vi("shli", u, 16)
        return t(f"arith.bitcast {u} : vector<{n}xi32> to vector<{n}xf32>")
    return Decoder(name, width, size * width, None, codes, None, False, width)


def decoder_for(encoding: str, row_values: int) -> Decoder:
    """The decoder of `encoding` for rows of `row_values` values; NotImplementedError if none."""
    if encoding in ("F32", "F16", "BF16"):
        width = next(w for w in (W, 8, 4, 2, 1) if row_values % w == 0)
        return float_decoder(encoding, width)
    if encoding not in DECODERS:
        raise NotImplementedError(f"the CPU quantized kernels have no decoder for {encoding}; "
                                  f"they decode {sorted(DECODERS) + ['F32', 'F16', 'BF16']}")
    return DECODERS[encoding]


# -- vector helpers over the scale bytes ------------------------------------------------------------
def _vec(b: Block, op: str, a: str, c, n: int) -> str:
    """arith op on vector<n x i32> with a vector or a splat constant."""
    vt = f"vector<{n}xi32>"
    c = c if isinstance(c, str) else b.t.const(str(c), vt)
    return b.t(f"arith.{op} {a}, {c} : {vt}")


def _pick(b: Block, v: str, idx: list[int], n: int) -> str:
    """vector<len(idx) x i32> of lanes idx of v (a vector<n x i32>)."""
    return b.t(f"vector.shuffle {v}, {v} [{', '.join(map(str, idx))}] : "
               f"vector<{n}xi32>, vector<{n}xi32>")


def _times(b: Block, scalar: str, ints: str, n: int) -> str:
    """splat(scalar) * float(ints), vector<n x f32> (the reference's f32 product)."""
    t = b.t
    f = t(f"arith.sitofp {ints} : vector<{n}xi32> to vector<{n}xf32>")
    s = t(f"vector.broadcast {scalar} : f32 to vector<{n}xf32>")
    return t(f"arith.mulf {s}, {f} : vector<{n}xf32>")


def _one(b: Block, scalar: str) -> str:
    return b.t(f"vector.broadcast {scalar} : f32 to vector<1xf32>")


def _neg(b: Block, v: str, n: int) -> str:
    return b.t(f"arith.negf {v} : vector<{n}xf32>")


# -- the 32-value "legacy" blocks ---------------------------------------------------------------
def _nibble(b: Block, qs: int, j: int) -> str:
    """Codes 16j..16j+15 of a 32-value block: low (j = 0) or high (j = 1) nibbles of qs[0:16]."""
    u = b.u32(qs)
    return b.vi("andi", u, 15) if j == 0 else b.vi("shrui", u, 4)


def _fifth_bit(b: Block, qh: int, j: int) -> str:
    """Bit 4 of codes 16j..16j+15: bits 16j + lane of the uint32 qh."""
    v = b.splat(b.scalar(qh, "i32", 4), "i32")
    shifts = b.t.const("[" + ", ".join(str(16 * j + i) for i in range(W)) + "]",
                       f"vector<{W}xi32>")
    return b.vi("shli", b.vi("andi", b.vi("shrui", v, shifts), 1), 4)


@decoder("Q4_0", 32, 18, 32)
class _Q4_0:
    codes = staticmethod(lambda b, j: b.tof(b.vi("subi", _nibble(b, 2, j), 8)))
    scales = staticmethod(lambda b: (_one(b, b.f16(0)), None))


@decoder("Q4_1", 32, 20, 32, offsets=True)
class _Q4_1:
    codes = staticmethod(lambda b, j: b.tof(_nibble(b, 4, j)))
    scales = staticmethod(lambda b: (_one(b, b.f16(0)), _neg(b, _one(b, b.f16(2)), 1)))


@decoder("Q5_0", 32, 22, 32)
class _Q5_0:
    codes = staticmethod(lambda b, j: b.tof(b.vi("subi", b.vi("ori", _nibble(b, 6, j),
                                                              _fifth_bit(b, 2, j)), 16)))
    scales = staticmethod(lambda b: (_one(b, b.f16(0)), None))


@decoder("Q5_1", 32, 24, 32, offsets=True)
class _Q5_1:
    codes = staticmethod(lambda b, j: b.tof(b.vi("ori", _nibble(b, 8, j), _fifth_bit(b, 4, j))))
    scales = staticmethod(lambda b: (_one(b, b.f16(0)), _neg(b, _one(b, b.f16(2)), 1)))


@decoder("Q8_0", 32, 34, 32)
class _Q8_0:
    codes = staticmethod(lambda b, j: b.tof(b.t(
        f"arith.extsi {b.bytes(2 + 16 * j)} : vector<{W}xi8> to vector<{W}xi32>")))
    scales = staticmethod(lambda b: (_one(b, b.f16(0)), None))


# -- the 256-value K blocks -----------------------------------------------------------------------
def _six_bit_pairs(b: Block, at: int) -> tuple[str, str]:
    """The eight 6-bit (scale, min) pairs of Q4_K / Q5_K's 12 bytes at `at`, vector<8 x i32>:
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7; 4-7 a nibble of bytes 8-11 plus the
    top two bits of bytes 0-3 / 4-7."""
    u = b.u32(at)   # bytes at .. at+15 (inside the block: the codes follow the scales)
    a, m, c = (_pick(b, u, [i, i + 1, i + 2, i + 3] * 2, W) for i in (0, 4, 8))
    top = lambda x: _vec(b, "shli", _vec(b, "shrui", x, 6, 8), 4, 8)  # noqa: E731
    sc_hi = _vec(b, "ori", _vec(b, "andi", c, 15, 8), top(a), 8)
    mn_hi = _vec(b, "ori", _vec(b, "shrui", c, 4, 8), top(m), 8)
    first = [0, 1, 2, 3, 12, 13, 14, 15]
    sc = b.t(f"vector.shuffle {_vec(b, 'andi', a, 63, 8)}, {sc_hi} [{', '.join(map(str, first))}]"
             f" : vector<8xi32>, vector<8xi32>")
    mn = b.t(f"vector.shuffle {_vec(b, 'andi', m, 63, 8)}, {mn_hi} [{', '.join(map(str, first))}]"
             f" : vector<8xi32>, vector<8xi32>")
    return sc, mn


def _k4_scales(b: Block) -> tuple[str, str]:
    sc, mn = _six_bit_pairs(b, 4)
    return _times(b, b.f16(0), sc, 8), _times(b, b.f16(2), mn, 8)


def _k_nibbles(b: Block, qs: int, j: int) -> str:
    """Q4_K / Q5_K low codes of chunk j: nibble (s % 2) of qs[32 (s // 2) + 16 (j % 2) + lane]."""
    s = j // 2
    u = b.u32(qs + 32 * (s // 2) + 16 * (j % 2))
    return b.vi("andi", u, 15) if s % 2 == 0 else b.vi("shrui", u, 4)


def _k4_int_scales(b: Block) -> IntScales:
    """The eight 6-bit (scale, min) pairs of _six_bit_pairs in four i32 words, by byte-wise
    SWAR on the 12 packed bytes (a: bytes 0-3, m: 4-7, c: 8-11)."""
    t = b.t
    a, m, c = (b.scalar(4 + off, "i32", 4) for off in (0, 4, 8))

    def op(name, x, k):
        return t(f"arith.{name} {x}, {t.const(str(k), 'i32')} : i32")

    def hi(low, top):  # (low & 15) | (top bits 6-7 of each byte, moved to bits 4-5)
        return t(f"arith.ori {op('andi', low, 0x0F0F0F0F)}, "
                 f"{op('andi', op('shrui', top, 2), 0x30303030)} : i32")
    sc_lo, mn_lo = op("andi", a, 0x3F3F3F3F), op("andi", m, 0x3F3F3F3F)
    sc_hi, mn_hi = hi(c, a), hi(op("shrui", c, 4), m)
    pair = t(f"vector.from_elements {mn_lo}, {mn_hi} : vector<2xi32>")
    mb = t(f"vector.bitcast {pair} : vector<2xi32> to vector<8xi8>")
    mn = t(f"arith.uitofp {mb} : vector<8xi8> to vector<8xf32>")
    return IntScales([sc_lo, sc_hi], 6, b.f16(0), mn, b.f16(2))


@decoder("Q4_K", 256, 144, 32, offsets=True)
class _Q4_K:
    codes = staticmethod(lambda b, j: b.tof(_k_nibbles(b, 16, j)))
    scales = staticmethod(_k4_scales)
    int_scales = staticmethod(_k4_int_scales)


@decoder("Q5_K", 256, 176, 32, offsets=True)
class _Q5_K:
    @staticmethod
    def codes(b: Block, j: int) -> str:
        high = b.vi("andi", b.vi("shrui", b.u32(16 + 16 * (j % 2)), j // 2), 1)
        return b.tof(b.vi("ori", _k_nibbles(b, 48, j), b.vi("shli", high, 4)))

    scales = staticmethod(_k4_scales)
    int_scales = staticmethod(_k4_int_scales)


def _two_bits(b: Block, qs: int, j: int) -> str:
    """Q2_K / Q3_K 2-bit codes of chunk j (element 128 n + 32 p + l, bits 2p of qs[32 n + l])."""
    n, p, half = j // 8, (j % 8) // 2, j % 2
    return b.vi("andi", b.vi("shrui", b.u32(qs + 32 * n + 16 * half), 2 * p), 3)


@decoder("Q2_K", 256, 84, 16, offsets=True)
class _Q2_K:
    codes = staticmethod(lambda b, j: b.tof(_two_bits(b, 16, j)))

    @staticmethod
    def scales(b: Block) -> tuple[str, str]:
        u = b.u32(0)   # sub-block s: low nibble scale, high nibble min
        return (_times(b, b.f16(80), _vec(b, "andi", u, 15, W), W),
                _times(b, b.f16(82), _vec(b, "shrui", u, 4, W), W))


@decoder("Q3_K", 256, 110, 16)
class _Q3_K:
    @staticmethod
    def codes(b: Block, j: int) -> str:
        n, p, half = j // 8, (j % 8) // 2, j % 2
        kept = b.vi("andi", b.vi("shrui", b.u32(16 * half), 4 * n + p), 1)
        return b.tof(b.vi("subi", _two_bits(b, 32, j), b.vi("shli", b.vi("xori", kept, 1), 2)))

    @staticmethod
    def scales(b: Block) -> tuple[str, None]:
        # Scale s: low nibble of byte 96 + s % 8 (bits 4 (s // 8)..), 2 high bits of byte
        # 104 + s % 4 (bits 2 (s // 4)..); read from 94 so 16 bytes stay inside the block.
        u = b.u32(94)
        lo = _pick(b, u, [2 + s % 8 for s in range(W)], W)
        lo = _vec(b, "andi", _vec(b, "shrui", lo, b.t.const(
            "[" + ", ".join(str(4 * (s // 8)) for s in range(W)) + "]", f"vector<{W}xi32>"), W), 15, W)
        hi = _pick(b, u, [10 + s % 4 for s in range(W)], W)
        hi = _vec(b, "andi", _vec(b, "shrui", hi, b.t.const(
            "[" + ", ".join(str(2 * (s // 4)) for s in range(W)) + "]", f"vector<{W}xi32>"), W), 3, W)
        sc = _vec(b, "subi", _vec(b, "ori", lo, _vec(b, "shli", hi, 4, W), W), 32, W)
        return _times(b, b.f16(108), sc, W), None


@decoder("Q6_K", 256, 210, 16)
class _Q6_K:
    @staticmethod
    def codes(b: Block, j: int) -> str:
        e = 16 * j
        n, r = e // 128, e % 128
        u = b.u32(64 * n + r % 64)
        low4 = b.vi("andi", u, 15) if r < 64 else b.vi("shrui", u, 4)
        high2 = b.vi("andi", b.vi("shrui", b.u32(128 + 32 * n + r % 32), 2 * (r // 32)), 3)
        return b.tof(b.vi("subi", b.vi("ori", low4, b.vi("shli", high2, 4)), 32))

    @staticmethod
    def scales(b: Block) -> tuple[str, None]:
        sc = b.t(f"arith.extsi {b.bytes(192)} : vector<{W}xi8> to vector<{W}xi32>")
        return _times(b, b.f16(208), sc, W), None
