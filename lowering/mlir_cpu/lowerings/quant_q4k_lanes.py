"""The Q4_K row path on 8-lane (AVX2) targets: code words in place, scales unpacked at load.

Q4_K weights fixed at load are repacked once (pack_layout.repack_q4k, layout "q4k_r": per
block d, dmin, eight scale bytes, eight min bytes, the 128 code bytes as stored). The row path
(fewer x rows than the tile path's MR: a decode step) then reads a 64-value group's 32 code
bytes as one vector of eight i32 words and takes the eight nibble positions p of each word in
place: `word & (15 << 4p)` is the code times 16**p, exact as a float (four significant bits;
p = 7 is shifted down instead, its top bit being the sign), so a position costs a mask, a
conversion and an FMA, against x' = the group's x values that meet position p, times 16**-p
(exact: a power of two, unless |x| < 2**-102 turns subnormal), laid out once per call in a heap
buffer the deallocation pass frees (`permute_x`). Bytes 4j..4j+3 of a group hold
values 4j..4j+3 in their low nibbles and 32+4j.. in their high ones: even positions form the
group's first sub-block, odd ones its second. A sub-block's sum meets float(scale) from the
table of small integers (one byte load, one broadcast), d once per block, and the mins meet
the sums of x once per block as a vector of eight.

Against the byte-to-lane path (quant_gguf.py: zero-extend 8 code bytes a vector, unpack the
scales from the packed bytes every block) it issues ~30% fewer instructions a block: one
thread on a Zen 3 EPYC, 19.9 -> 16.0 ns a block (BENCHMARKS.md, CPU: Q4_K on AVX2). The tile
path (M >= MR) decodes the repacked blocks to the reference's floats (`DECODER`).
"""
from __future__ import annotations

from .quant_decoders import TABLE, Block, Decoder, _k_nibbles, _times
from .kernel_text import KernelText, hsum
from .quant_kernels import Mats, per_row

GROUP = 64          # values of a 32-byte group of code bytes: two sub-blocks
LANES = 8           # i32 words (and f32 values) a vector
QS, SC, MN = 20, 4, 12   # byte offsets in a repacked block: codes, scale bytes, min bytes


def _scales(b: Block) -> tuple[str, str]:
    sc, mn = b.u32(SC, 8), b.u32(MN, 8)
    return _times(b, b.f16(0), sc, 8), _times(b, b.f16(2), mn, 8)


# The repacked block for the tile path and `dequantize`-style decoding: the codes as Q4_K's
# (moved 4 bytes on), the scales as bytes.
DECODER = Decoder("Q4_K (q4k_r)", 256, 148, 32,
                  codes=lambda b, j: b.tof(_k_nibbles(b, QS, j)), scales=_scales, offsets=True)


def permute_x(k: KernelText, mats: Mats) -> tuple[str, str]:
    """(xp, its type): xp[m, 64 g + 8 p + j] = x[m, 64 g + 32 (p % 2) + 4 j + p // 2] * 16**-p
    for p < 7 (p = 7 unscaled), the x values that meet nibble position p of the group's words."""
    t = k.t
    xpt = f"memref<?x{k.k}xf32>"
    xp = t(f"memref.alloc({mats.m}) : {xpt}")
    v32, v8 = "vector<32xf32>", f"vector<{LANES}xf32>"
    scale = [t.const(repr(2.0 ** (-4 * p)), v8) for p in range(7)]

    def row(m):
        def group(g, _):
            k0 = k.ix("muli", g, GROUP)
            halves = [t(f"vector.load {mats.xm}[{m}, {k.ix('addi', k0, 32 * h) if h else k0}] : "
                        f"{mats.xmt}, {v32}") for h in (0, 1)]
            for p in range(8):
                h = halves[p % 2]
                lanes = ", ".join(str(4 * j + p // 2) for j in range(LANES))
                v = t(f"vector.shuffle {h}, {h} [{lanes}] : {v32}, {v32}")
                if p < 7 and p:
                    v = t(f"arith.mulf {v}, {scale[p]} : {v8}")
                t.stmt(f"vector.store {v}, {xp}[{m}, {k.ix('addi', k0, 8 * p)}] : {xpt}, {v8}")
            return []
        k.loop(0, k.k // GROUP, 1, body=group)
    per_row(k, mats, row)
    return xp, xpt


def lanes_dot(k: KernelText, mats: Mats, wm: str, wmt: str, xp, xs, m0: str, mb: int,
              cols: list[str], table: str, prefetch) -> None:
    """out[m0 : m0+mb, cols] = x rows . W rows `cols` (repacked Q4_K), by words in place; an
    x' vector loaded once serves every weight row."""
    t = k.t
    v, vi, v8i8 = f"vector<{LANES}xf32>", f"vector<{LANES}xi32>", "vector<8xi8>"
    zero = t.const("0.0", v)
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mb)]
    pairs = [(i, j) for i in range(mb) for j in range(len(cols))]
    masks = [t.const(str(15 << (4 * p)), vi) for p in range(7)]
    shift = t.const("28", vi)

    def at(col: str, base: str, off: int) -> str:
        return f"{wm}[{col}, {k.ix('addi', base, off)}]"

    def byte_float(col: str, base: str, off: int) -> str:
        """float(byte off of the block) from the table, broadcast."""
        y = t(f"memref.load {at(col, base, off)} : {wmt}")
        f = t(f"memref.load {table}[{t(f'arith.index_castui {y} : i8 to index')}] : "
              f"memref<{TABLE}xf32>")
        return t(f"vector.broadcast {f} : f32 to {v}")

    def half(col: str, base: str, off: int) -> str:
        """The float16 at byte off of the block, as f32, broadcast."""
        raw = t(f"vector.load {at(col, base, off)} : {wmt}, vector<2xi8>")
        h = t(f"vector.bitcast {raw} : vector<2xi8> to vector<1xf16>")
        e = t(f"vector.extract {h}[0] : f16 from vector<1xf16>")
        return t(f"vector.broadcast {t(f'arith.extf {e} : f16 to f32')} : f32 to {v}")

    def block(b, args):
        acc, accm = list(args[:len(pairs)]), list(args[len(pairs):])
        base = k.ix("muli", b, DECODER.nbytes)
        k0 = k.ix("muli", b, DECODER.elems)
        prefetch(cols[-1], base)
        sums = {q: [None, None] for q in pairs}
        for g in range(4):
            words = []
            for col in cols:
                raw = t(f"vector.load {at(col, base, QS + 32 * g)} : {wmt}, vector<32xi8>")
                words.append(t(f"vector.bitcast {raw} : vector<32xi8> to {vi}"))
            part = {q: [None, None] for q in pairs}
            for p in range(8):
                kx = k.ix("addi", k0, GROUP * g + LANES * p)
                xv = [t(f"vector.load {xp[0]}[{r}, {kx}] : {xp[1]}, {v}") for r in rows]
                for j, w in enumerate(words):
                    c = (t(f"arith.andi {w}, {masks[p]} : {vi}") if p < 7 else
                         t(f"arith.shrui {w}, {shift} : {vi}"))
                    f = t(f"arith.sitofp {c} : {vi} to {v}")
                    for i in range(mb):
                        h = part[(i, j)][p % 2]
                        part[(i, j)][p % 2] = (t(f"arith.mulf {f}, {xv[i]} : {v}") if h is None
                                               else t(f"vector.fma {f}, {xv[i]}, {h} : {v}"))
            for j, col in enumerate(cols):
                for s_ in (0, 1):
                    sc = byte_float(col, base, SC + 2 * g + s_)
                    for i in range(mb):
                        h, pv = sums[(i, j)][s_], part[(i, j)][s_]
                        sums[(i, j)][s_] = (t(f"arith.mulf {sc}, {pv} : {v}") if h is None else
                                            t(f"vector.fma {sc}, {pv}, {h} : {v}"))
        g0 = k.ix("muli", b, 8)
        xsv = [t(f"vector.load {xs[0]}[{r}, {g0}] : {xs[1]}, {v}") for r in rows]
        for j, col in enumerate(cols):
            d, dmin = half(col, base, 0), half(col, base, 2)
            mb8 = t(f"vector.load {at(col, base, MN)} : {wmt}, {v8i8}")
            mins = t(f"arith.uitofp {mb8} : {v8i8} to {v}")
            for i in range(mb):
                n = pairs.index((i, j))
                tot = t(f"arith.addf {sums[(i, j)][0]}, {sums[(i, j)][1]} : {v}")
                acc[n] = t(f"vector.fma {d}, {tot}, {acc[n]} : {v}")
                accm[n] = t(f"vector.fma {dmin}, {t(f'arith.mulf {mins}, {xsv[i]} : {v}')}, "
                            f"{accm[n]} : {v}")
        return acc + accm
    res = k.loop(0, k.k // DECODER.elems, 1, [zero] * (2 * len(pairs)), v, block)
    for n, (i, j) in enumerate(pairs):
        y = t(f"arith.subf {hsum(t, res[n], LANES)}, {hsum(t, res[len(pairs) + n], LANES)} : f32")
        t.stmt(f"memref.store {y}, {mats.om}[{rows[i]}, {cols[j]}] : {mats.omt}")
