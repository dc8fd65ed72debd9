"""The Q6_K row path on 8-lane (AVX2) targets: six-bit codes taken a byte position at a time
from words built in registers.

Q6_K weights fixed at load are repacked once (pack_layout, layout "q6k_r", 212 bytes a block:
d, two zero bytes, the 16 int8 scales, four 32-byte groups of low-nibble bytes, two of
high-bit bytes), each group's bytes transposed so that byte b of its i32 word j holds value
8 b + j of the group. A low-nibble group g = 2 n + h (ql[64 n + 32 h:][:32]) and its high-bit
group n (qh[32 n:][:32]) then give, with five vector ops, two words whose bytes are whole
six-bit codes (even: the low nibbles, values 32 h + 8 b + j of the block's half n; odd: the
high nibbles, 64 + 32 h + 8 b + j); a byte position b costs a mask (`W & (63 << 8 b)`: the
code times 2**8b, exact as a float), a conversion and an FMA against x scaled by 2**-8b,
prepared once a call (exact: a power of two, unless |x| < 2**-102 turns subnormal). The
8 values of a byte position are 8 consecutive values of x, and positions b = 2 s', 2 s' + 1
fill one 16-value sub-block, so its scale is one broadcast (a byte index into a table of the
256 int8 values as floats, built once a call). The codes' offset of 32 meets the sums of x
per sub-block once a block: y = sum d (sum_s sc_s (q . x)_s - 32 sum_s sc_s X_s).

Against the byte path (quant_gguf.py: zero-extend bytes, shift, mask and merge the two parts
of every code, subtract 32): one thread on a Zen 3 EPYC, 37-39 -> 25-28 ns a block (BENCHMARKS.md,
"... Q6_K on AVX2"). The tile path decodes the repacked blocks to the reference's floats.
"""
from __future__ import annotations

from ..pack_layout import Q6K_LAYOUT
from .kernel_text import KernelText, hsum
from .quant_decoders import Block, Decoder, _times
from .quant_k_lanes import LANES, Repacked, block_loop, byte_float, words_at
from .quant_kernels import Mats, int_table, per_row, x_sums

SC, QL, QH = 4, 20, 148     # byte offsets in a repacked block: scales, low nibbles, high bits
SIGNED = 256                # entries of the table of int8 values as floats


def _codes(b: Block, j: int) -> str:
    """The tile path's codes (minus 32) of values [16 j, 16 j + 16) of a repacked block: bytes
    b0, b0 + 1 of the group's eight words (a shuffle), their nibble and two high bits."""
    t = b.t
    n, r = divmod(16 * j, 128)
    par, h, b0 = r // 64, r % 64 // 32, r % 32 // 8
    pick = ", ".join(str(4 * lane + b0 + i) for i in (0, 1) for lane in range(LANES))

    def gather(off: int) -> str:
        g = b.bytes(off, 32)
        v = t(f"vector.shuffle {g}, {g} [{pick}] : vector<32xi8>, vector<32xi8>")
        return t(f"arith.extui {v} : vector<16xi8> to vector<16xi32>")
    ql = gather(QL + 32 * (2 * n + h))
    low = b.vi("andi", ql, 15) if par == 0 else b.vi("shrui", ql, 4)
    high = b.vi("andi", b.vi("shrui", gather(QH + 32 * n), 2 * h + 4 * par), 3)
    return b.tof(b.vi("subi", b.vi("ori", low, b.vi("shli", high, 4)), 32))


def _scales(b: Block) -> tuple[str, None]:
    sc = b.t(f"arith.extsi {b.bytes(SC, 16)} : vector<16xi8> to vector<16xi32>")
    return _times(b, b.f16(0), sc, 16), None


def prologue(k: KernelText, mats: Mats) -> tuple:
    """Once a call: (xp, its type) = x scaled by 2**-8b at position 32 g + 8 b + j, the sums
    of x per 16-value sub-block, and the table float(int8(u)) for u < 256."""
    t = k.t
    xpt = f"memref<?x{k.k}xf32>"
    xp = t(f"memref.alloc({mats.m}) : {xpt}")
    v = f"vector<{LANES}xf32>"
    scale = [t.const(repr(2.0 ** (-8 * b)), v) for b in range(3)]

    def row(m):
        def run(g, _):
            for b in range(4):
                col = k.ix("addi", k.ix("muli", g, 32), 8 * b)
                x = t(f"vector.load {mats.xm}[{m}, {col}] : {mats.xmt}, {v}")
                x = t(f"arith.mulf {x}, {scale[b]} : {v}") if b in (1, 2) else x
                t.stmt(f"vector.store {x}, {xp}[{m}, {col}] : {xpt}, {v}")
            return []
        k.loop(0, k.k // 32, 1, body=run)
    per_row(k, mats, row)
    return (xp, xpt), x_sums(k, mats, 16), int_table(k, SIGNED, signed=True, heap=True)


def dot(k: KernelText, mats: Mats, wm: str, wmt: str, rp: Repacked, pre, xs, m0: str,
        mb: int, cols: list[str], table: str, prefetch) -> None:
    """out[m0 : m0+mb, cols] = x rows . W rows `cols` ("q6k_r"), a byte position at a time;
    an x vector loaded once serves every weight row."""
    (xp, xpt), (x16, x16t), tab = pre
    t = k.t
    v, vi = f"vector<{LANES}xf32>", f"vector<{LANES}xi32>"
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mb)]
    pairs = [(i, j) for i in range(mb) for j in range(len(cols))]
    c = {x: t.const(str(x), vi) for x in (0x0F0F0F0F, 0x30303030, 2, 4)}
    masks = [t.const(str(63 << (8 * b)), vi) for b in range(3)]
    top = t.const("24", vi)
    dec = rp.decoder

    def block(k0, blks, acc, accm):
        sums = {(q, par): None for q in pairs for par in (0, 1)}  # two chains a pair
        for n in range(2):
            qh = [words_at(blk, QH + 32 * n) for blk in blks]
            for h in range(2):
                # even: low nibbles | high bits 2h, 2h+1 moved to 4, 5 of each byte;
                # odd: high nibbles | high bits 2h+4, 2h+5 moved likewise
                words = []
                for blk, q in zip(blks, qh):
                    w = words_at(blk, QL + 32 * (2 * n + h))
                    lo_hi = t(f"arith.shli {q}, {c[4] if h == 0 else c[2]} : {vi}")
                    hi_hi = q if h == 0 else t(f"arith.shrui {q}, {c[2]} : {vi}")
                    w_odd = t(f"arith.shrui {w}, {c[4]} : {vi}")
                    words.append([t(f"arith.ori {t(f'arith.andi {a}, {c[0x0F0F0F0F]} : {vi}')}, "
                                    f"{t(f'arith.andi {hb}, {c[0x30303030]} : {vi}')} : {vi}")
                                  for a, hb in ((w, lo_hi), (w_odd, hi_hi))])
                for par in range(2):
                    for half in range(2):
                        part = {q: None for q in pairs}
                        for b in (2 * half, 2 * half + 1):
                            col = k.ix("addi", k0, 128 * n + 64 * par + 32 * h + 8 * b)
                            xv = [t(f"vector.load {xp}[{r}, {col}] : {xpt}, {v}") for r in rows]
                            for j, wd in enumerate(words):
                                cv = (t(f"arith.andi {wd[par]}, {masks[b]} : {vi}") if b < 3
                                      else t(f"arith.shrui {wd[par]}, {top} : {vi}"))
                                f = t(f"arith.sitofp {cv} : {vi} to {v}")
                                for i in range(mb):
                                    p = part[(i, j)]
                                    part[(i, j)] = (t(f"arith.mulf {f}, {xv[i]} : {v}") if p is None
                                                    else t(f"vector.fma {f}, {xv[i]}, {p} : {v}"))
                        s = 8 * n + 4 * par + 2 * h + half
                        for j, blk in enumerate(blks):
                            sc = byte_float(blk, SC + s, tab, SIGNED)
                            for i in range(mb):
                                acc_s, p = sums[(i, j), par], part[(i, j)]
                                sums[(i, j), par] = (
                                    t(f"arith.mulf {sc}, {p} : {v}") if acc_s is None
                                    else t(f"vector.fma {sc}, {p}, {acc_s} : {v}"))
        g0 = k.ix("divui", k0, 16)
        xsv = [[t(f"vector.load {x16}[{r}, {k.ix('addi', g0, 8 * u) if u else g0}] : {x16t}, {v}")
                for u in (0, 1)] for r in rows]
        for j, blk in enumerate(blks):
            d = blk.splat(blk.f16(0))
            # the 16 scales as floats, against the sub-blocks' sums of x (the offset of 32)
            ints = [t(f"arith.extsi {blk.bytes(SC + 8 * u, 8)} : vector<8xi8> to {vi}")
                    for u in (0, 1)]
            scf = [t(f"arith.sitofp {iv} : {vi} to {v}") for iv in ints]
            for i in range(mb):
                n_ = pairs.index((i, j))
                corr = t(f"vector.fma {scf[1]}, {xsv[i][1]}, "
                         f"{t(f'arith.mulf {scf[0]}, {xsv[i][0]} : {v}')} : {v}")
                tot = t(f"arith.addf {sums[(i, j), 0]}, {sums[(i, j), 1]} : {v}")
                acc[n_] = t(f"vector.fma {d}, {tot}, {acc[n_]} : {v}")
                accm[n_] = t(f"vector.fma {d}, {corr}, {accm[n_]} : {v}")
        return acc, accm
    acc, accm = block_loop(k, wm, wmt, dec, cols, len(pairs), prefetch, block)
    for n_, (i, j) in enumerate(pairs):
        y = t(f"math.fma {t.const('-32.0', 'f32')}, {hsum(t, accm[n_], LANES)}, "
              f"{hsum(t, acc[n_], LANES)} : f32")
        t.stmt(f"memref.store {y}, {mats.om}[{rows[i]}, {cols[j]}] : {mats.omt}")


REPACKED_Q6 = {Q6K_LAYOUT: Repacked(Decoder("Q6_K (q6k_r)", 256, 212, 16, codes=_codes,
                                            scales=_scales), 0, None, prologue, dot,
                                    task_table=False)}
