"""The Q4_K / Q5_K row path on 8-lane (AVX2) targets: code words in place, scales unpacked at
load.

Q4_K weights fixed at load are repacked once (pack_layout.repack_kquant, layout "q4k_r": per
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

Q5_K (layout "q5k_r", 180 bytes: the 32 high-bit bytes follow the scales, then the codes): the
high bit of position p of word j is bit 8 (p // 2) + 2 g + p % 2 of the high-bit word j, and
moves to bit 4 p + 4 (beside the code) by a shift that depends only on g and p's parity, so a
group takes two shifts of the high-bit words and a position one mask and one or more than
Q4_K's (p = 7, whose code is shifted down, takes its bit by a shift and a mask).

Against the byte-to-lane path (quant_gguf.py: zero-extend 8 code bytes a vector, unpack the
scales from the packed bytes every block) it issues ~30% fewer instructions a block: one
thread on a Zen 3 EPYC, 19.9 -> 16.0 ns a block (BENCHMARKS.md, CPU: Q4_K on AVX2). The tile
path (M >= MR) decodes the repacked blocks to the reference's floats (`REPACKED`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..pack_layout import Q4K_LAYOUT, Q5K_LAYOUT
from .quant_decoders import TABLE, Block, Decoder, _k_nibbles, _times
from .kernel_text import KernelText, hsum
from .quant_kernels import Mats, per_row

GROUP = 64          # values of a 32-byte group of code bytes: two sub-blocks
LANES = 8           # i32 words (and f32 values) a vector
SC, MN = 4, 12      # byte offsets in a repacked block: scale bytes, min bytes


def _scales(b: Block) -> tuple[str, str]:
    sc, mn = b.u32(SC, 8), b.u32(MN, 8)
    return _times(b, b.f16(0), sc, 8), _times(b, b.f16(2), mn, 8)


def _q5_codes(b: Block, j: int) -> str:
    """Q5_K's codes of chunk j in the repacked block (high bits at 20, codes at 52)."""
    high = b.vi("andi", b.vi("shrui", b.u32(20 + 16 * (j % 2)), j // 2), 1)
    return b.tof(b.vi("ori", _k_nibbles(b, 52, j), b.vi("shli", high, 4)))


@dataclass(frozen=True)
class Repacked:
    """A repacked K-quant block: its decoder (the tile path's, to the reference's floats), the
    byte offsets of its codes and high bits (None: Q4_K; both unused by other row paths), and
    its row path: prologue(k, mats), once a call before the rows (what dot reads of x), and
    dot(k, mats, wm, wmt, rp, prologue's result, sums of x, m0, mb, cols, table, prefetch);
    task_table: whether dot reads `table` (each task's floats of small integers) at all."""
    decoder: Decoder
    qs: int
    qh: int | None
    prologue: Callable
    dot: Callable
    task_table: bool = True


def words_at(blk: Block, off: int) -> str:
    """The block's 32 bytes at off as eight i32 words."""
    return blk.t(f"vector.bitcast {blk.bytes(off, 32)} : vector<32xi8> to vector<{LANES}xi32>")


def byte_float(blk: Block, off: int, table: str, size: int = TABLE) -> str:
    """table[byte off of the block] (the float of a small integer), broadcast."""
    t = blk.t
    i = t(f"arith.index_castui {blk.byte(off)} : i32 to index")
    return blk.splat(t(f"memref.load {table}[{i}] : memref<{size}xf32>"))


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


def block_loop(k: KernelText, wm: str, wmt: str, dec: Decoder, cols: list[str], npairs: int,
               prefetch, body) -> tuple[list[str], list[str]]:
    """The loop over a weight row's blocks with two vector accumulators per (x row, weight
    row) pair, the sums and the offsets' sums: body(k0, blocks of cols, acc, accm) -> (acc,
    accm) for the block whose first value is k0; returns the final (acc, accm)."""
    t = k.t
    v = f"vector<{LANES}xf32>"

    def block(b, args):
        base = k.ix("muli", b, dec.nbytes)
        prefetch(cols[-1], base)
        blks = [Block(t, wm, wmt, col, base, LANES) for col in cols]
        acc, accm = body(k.ix("muli", b, dec.elems), blks, list(args[:npairs]),
                         list(args[npairs:]))
        return acc + accm
    res = k.loop(0, k.k // dec.elems, 1, [t.const("0.0", v)] * (2 * npairs), v, block)
    return res[:npairs], res[npairs:]


def lanes_dot(k: KernelText, mats: Mats, wm: str, wmt: str, rp: "Repacked", xp, xs, m0: str,
              mb: int, cols: list[str], table: str, prefetch) -> None:
    """out[m0 : m0+mb, cols] = x rows . W rows `cols` (repacked Q4_K / Q5_K `rp`), by words in
    place; an x' vector loaded once serves every weight row."""
    t = k.t
    v, vi = f"vector<{LANES}xf32>", f"vector<{LANES}xi32>"
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mb)]
    pairs = [(i, j) for i in range(mb) for j in range(len(cols))]
    masks = [t.const(str(15 << (4 * p)), vi) for p in range(7)]
    shift = t.const("28", vi)
    dec = rp.decoder

    def vshift(w: str, n: int) -> str:   # w << n (n >= 0) or w >> -n, logical
        if n == 0:
            return w
        op = "shli" if n > 0 else "shrui"
        return t(f"arith.{op} {w}, {t.const(str(abs(n)), vi)} : {vi}")

    def code(p: int, w: str, g: int, hv, qhw) -> str:
        """Nibble position p of words w, times 16**p (Q5_K: with its high bit, times 16**p)."""
        if p == 7:
            c = t(f"arith.shrui {w}, {shift} : {vi}")
            if qhw is None:
                return c
            hb = t(f"arith.andi {vshift(qhw, -(21 + 2 * g))}, {t.const('16', vi)} : {vi}")
            return t(f"arith.ori {c}, {hb} : {vi}")
        c = t(f"arith.andi {w}, {masks[p]} : {vi}")
        if hv is None:
            return c
        hb = t(f"arith.andi {hv[p % 2]}, {t.const(str(1 << (4 * p + 4)), vi)} : {vi}")
        return t(f"arith.ori {c}, {hb} : {vi}")

    def block(k0, blks, acc, accm):
        sums = {q: [None, None] for q in pairs}
        # Q5_K: the block's 32 high-bit bytes, one bit of each per sub-block
        qhs = [None if rp.qh is None else words_at(blk, rp.qh) for blk in blks]
        for g in range(4):
            words = [words_at(blk, rp.qs + 32 * g) for blk in blks]
            # The high bit of position p at bit 4 p + 4: shifted by 4 - 2 g (even p) or
            # 7 - 2 g (odd p) from bit 8 (p // 2) + 2 g + p % 2.
            hvs = [None if q is None else (vshift(q, 4 - 2 * g), vshift(q, 7 - 2 * g))
                   for q in qhs]
            part = {q: [None, None] for q in pairs}
            for p in range(8):
                kx = k.ix("addi", k0, GROUP * g + LANES * p)
                xv = [t(f"vector.load {xp[0]}[{r}, {kx}] : {xp[1]}, {v}") for r in rows]
                for j, w in enumerate(words):
                    c = code(p, w, g, hvs[j], qhs[j])
                    f = t(f"arith.sitofp {c} : {vi} to {v}")
                    for i in range(mb):
                        h = part[(i, j)][p % 2]
                        part[(i, j)][p % 2] = (t(f"arith.mulf {f}, {xv[i]} : {v}") if h is None
                                               else t(f"vector.fma {f}, {xv[i]}, {h} : {v}"))
            for j, blk in enumerate(blks):
                for s_ in (0, 1):
                    sc = byte_float(blk, SC + 2 * g + s_, table)
                    for i in range(mb):
                        h, pv = sums[(i, j)][s_], part[(i, j)][s_]
                        sums[(i, j)][s_] = (t(f"arith.mulf {sc}, {pv} : {v}") if h is None else
                                            t(f"vector.fma {sc}, {pv}, {h} : {v}"))
        g0 = k.ix("divui", k0, 32)
        xsv = [t(f"vector.load {xs[0]}[{r}, {g0}] : {xs[1]}, {v}") for r in rows]
        for j, blk in enumerate(blks):
            d, dmin = blk.splat(blk.f16(0)), blk.splat(blk.f16(2))
            mins = t(f"arith.uitofp {blk.bytes(MN, 8)} : vector<8xi8> to {v}")
            for i in range(mb):
                n = pairs.index((i, j))
                tot = t(f"arith.addf {sums[(i, j)][0]}, {sums[(i, j)][1]} : {v}")
                acc[n] = t(f"vector.fma {d}, {tot}, {acc[n]} : {v}")
                accm[n] = t(f"vector.fma {dmin}, {t(f'arith.mulf {mins}, {xsv[i]} : {v}')}, "
                            f"{accm[n]} : {v}")
        return acc, accm
    acc, accm = block_loop(k, wm, wmt, dec, cols, len(pairs), prefetch, block)
    for n, (i, j) in enumerate(pairs):
        y = t(f"arith.subf {hsum(t, acc[n], LANES)}, {hsum(t, accm[n], LANES)} : f32")
        t.stmt(f"memref.store {y}, {mats.om}[{rows[i]}, {cols[j]}] : {mats.omt}")


REPACKED = {
    Q4K_LAYOUT: Repacked(Decoder("Q4_K (q4k_r)", 256, 148, 32, offsets=True, scales=_scales,
                                 codes=lambda b, j: b.tof(_k_nibbles(b, 20, j))), 20, None,
                         permute_x, lanes_dot),
    Q5K_LAYOUT: Repacked(Decoder("Q5_K (q5k_r)", 256, 180, 32, offsets=True, scales=_scales,
                                 codes=_q5_codes), 52, 20, permute_x, lanes_dot),
}
