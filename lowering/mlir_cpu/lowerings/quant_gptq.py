"""GPTQ 4- and 8-bit quantized matmul kernel (see quant_kernels.py for the two paths).

Codes are packed along k (P = 32 / bits per int32 word: 8 or 4) with the output columns
contiguous, so a word vector decodes V output columns at P values of k; scales (float16) and
zero points (`bits` wide, packed along n, P a word) are per group of k and per column. A weight
fixed at load comes reordered into panels of W columns (`panel`; pack_gptq.py), so that the row
path's task reads its columns' words as one contiguous run instead of one short run a page.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import finish, to_buffer
from .kernel_text import KernelText
from .quant_kernels import Mats, QuantTiles, k_block, rows_in_blocks, split_rows, tile_path, x_sums


@dataclass
class Gptq:
    """GPTQ operands: K inputs, N outputs, group size, zero points (False: symmetric, zero
    point 2 ** (bits - 1)), v1's stored zero - 1, code width, the panel width of a weight
    reordered at load (None: as stored)."""
    k: int
    n: int
    group: int
    asym: bool
    plus_one: bool
    bits: int = 4
    panel: int | None = None

    @property
    def per(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def width(self) -> int:
        return column_width(self.n)


def column_width(n: int) -> int:
    """Output columns a code-word vector decodes: the widest of 16, 8, 4, 2, 1 dividing N."""
    return next(w for w in (16, 8, 4, 2, 1) if n % w == 0)


class _GptqMem:
    def __init__(self, k: KernelText, q: Gptq, w_t, z_t):
        t = k.t
        rows = q.k * q.bits // 8 + 2 * (q.k // q.group)
        wm, wmt = to_buffer(t, "%w", w_t)
        self.flat_t = f"memref<{rows * q.n}xi8>"
        self.w = t(f"memref.collapse_shape {wm} [[0, 1]] : {wmt} into {self.flat_t}")
        self.z = self.zt = None
        if z_t is not None:
            self.z, self.zt = to_buffer(t, "%z", z_t)
        self.q, self.k = q, k

    def _at(self, row: str, rows: int, n: str) -> str:
        """Element index of [row, n] in a [rows, N] array stored as is, or in panels of W
        columns ([N/W, rows, W])."""
        ix, w = self.k.ix, self.q.panel
        if w is None:
            return ix("addi", ix("muli", row, self.q.n), n)
        head = ix("addi", ix("muli", ix("divui", n, w), rows), row)
        return ix("addi", ix("muli", head, w), ix("remui", n, w))

    def words(self, kw: str, n: str) -> str:
        """vector<V x i32> of qweight[kw, n : n+V]."""
        t, v, q = self.k.t, self.q.width, self.q
        off = self.k.ix("muli", self._at(kw, q.k // q.per, n), 4)
        raw = t(f"vector.load {self.w}[{off}] : {self.flat_t}, vector<{4 * v}xi8>")
        return t(f"vector.bitcast {raw} : vector<{4 * v}xi8> to vector<{v}xi32>")

    def scale(self, g: str, n: str) -> str:
        t, v, q = self.k.t, self.q.width, self.q
        off = self.k.ix("addi", self.k.ix("muli", self._at(g, q.k // q.group, n), 2),
                        q.k * q.bits // 8 * q.n)
        raw = t(f"vector.load {self.w}[{off}] : {self.flat_t}, vector<{2 * v}xi8>")
        h = t(f"vector.bitcast {raw} : vector<{2 * v}xi8> to vector<{v}xf16>")
        return t(f"arith.extf {h} : vector<{v}xf16> to vector<{v}xf32>")

    def zero(self, g: str, n: str) -> str:
        t, v, q = self.k.t, self.q.width, self.q
        vt = f"vector<{v}xi32>"
        if self.z is None:
            return t.const(str(1 << (q.bits - 1)), vt)
        p = q.per
        nw = v // p   # asymmetric weights have N % P == 0, so V >= P
        words = t(f"vector.load {self.z}[{g}, {self.k.ix('divui', n, p)}] : {self.zt}, "
                  f"vector<{nw}xi32>")
        spread = t(f"vector.shuffle {words}, {words} [{', '.join(str(i // p) for i in range(v))}]"
                   f" : vector<{nw}xi32>, vector<{nw}xi32>")
        shifts = t.const("[" + ", ".join(str(q.bits * (i % p)) for i in range(v)) + "]", vt)
        z = t(f"arith.andi {t(f'arith.shrui {spread}, {shifts} : {vt}')}, "
              f"{t.const(str(q.mask), vt)} : {vt}")
        return t(f"arith.addi {z}, {t.const('1', vt)} : {vt}") if self.q.plus_one else z

    def decode(self, words: str, shift, zero: str, scale: str) -> str:
        """(code - zero) * scale of the codes at bit `shift` (int or index value) of words."""
        t, v = self.k.t, self.q.width
        vt, ft = f"vector<{v}xi32>", f"vector<{v}xf32>"
        if isinstance(shift, int):
            sh = t.const(str(shift), vt)
        else:
            sh = t(f"vector.broadcast {t(f'arith.index_cast {shift} : index to i32')} : i32 to {vt}")
        code = t(f"arith.andi {t(f'arith.shrui {words}, {sh} : {vt}')}, "
                 f"{t.const(str(self.q.mask), vt)} : {vt}")
        c = t(f"arith.sitofp {t(f'arith.subi {code}, {zero} : {vt}')} : {vt} to {ft}")
        return t(f"arith.mulf {c}, {scale} : {ft}")

    def at(self, kx: str, n: str) -> str:
        """W^T[kx, n : n+V], the group looked up for this k."""
        k = self.k
        q = self.q
        g = k.ix("divui", kx, q.group)
        shift = k.ix("muli", k.ix("remui", kx, q.per), q.bits)
        return self.decode(self.words(k.ix("divui", kx, q.per), n), shift, self.zero(g, n),
                           self.scale(g, n))


def _gptq_dot(k: KernelText, mats: Mats, gm: _GptqMem, xs, m0: str, mb: int, n0: str, nv: int) -> None:
    """out[m0 : m0+mb, n0 : n0 + nv V] = x rows @ W^T, decoded in registers. With whole words
    per group: per group, sum_k x_k code_k, then times the scale after subtracting the zero
    point times the group's sum of x (xs)."""
    t, q = k.t, gm.q
    v = q.width
    ft, it = f"vector<{v}xf32>", f"vector<{v}xi32>"
    zero = t.const("0.0", ft)
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mb)]
    cols = [k.ix("addi", n0, u * v) if u else n0 for u in range(nv)]

    def fma(kx: str, ws: list[str], accs: list[str], shift: int = 0) -> list[str]:
        """accs + x[row, kx] ws, ws being the codes times 2**shift (x scaled to match)."""
        out = list(accs)
        for r in range(mb):
            a = t(f"memref.load {mats.xm}[{rows[r]}, {kx}] : {mats.xmt}")
            if shift:
                a = t(f"arith.mulf {a}, {t.const(repr(2.0 ** -shift), 'f32')} : f32")
            ab = t(f"vector.broadcast {a} : f32 to {ft}")
            for u in range(nv):
                out[r * nv + u] = t(f"vector.fma {ab}, {ws[u]}, {out[r * nv + u]} : {ft}")
        return out

    if xs is not None:
        izero, per = t.const("0", it), q.per
        masks = [t.const(str(q.mask << (q.bits * s)), it) for s in range(per - 1)]

        def group(g, accs):
            scales = [gm.scale(g, c) for c in cols]
            neg_z = [t(f"arith.sitofp {t(f'arith.subi {izero}, {gm.zero(g, c)} : {it}')}"
                       f" : {it} to {ft}") for c in cols]

            def word(kw, parts):
                k0 = k.ix("addi", k.ix("muli", g, q.group), k.ix("muli", kw, per))
                ws = [gm.words(k.ix("divui", k0, per), c) for c in cols]
                for s in range(per):
                    # Codes masked where they lie (the code times 2**(bits s), exact as a float
                    # and positive below the top position), x scaled by 2**-(bits s) to match:
                    # one integer op a vector, not a shift and a mask. The top position (its
                    # bits reach the sign) is shifted down, which leaves the code alone. The
                    # scaling is exact unless x falls below float32's normal range by it
                    # (|x| < 2**-102 at 4 bits), as in quant_k_lanes.py's row path.
                    top, shift = s == per - 1, q.bits * s
                    codes = []
                    for u in range(nv):
                        if top:
                            c = t(f"arith.shrui {ws[u]}, {t.const(str(shift), it)} : {it}")
                        else:
                            c = t(f"arith.andi {ws[u]}, {masks[s]} : {it}")
                        codes.append(t(f"arith.sitofp {c} : {it} to {ft}"))
                    parts = fma(k.ix("addi", k0, s) if s else k0, codes, parts,
                                0 if top else shift)
                return parts
            parts = k.loop(0, q.group // per, 1, [zero] * (mb * nv), ft, word)
            out = list(accs)
            for r in range(mb):
                xsum = t(f"memref.load {xs[0]}[{rows[r]}, {g}] : {xs[1]}")
                xb = t(f"vector.broadcast {xsum} : f32 to {ft}")
                for u in range(nv):
                    p = t(f"vector.fma {neg_z[u]}, {xb}, {parts[r * nv + u]} : {ft}")
                    out[r * nv + u] = t(f"vector.fma {scales[u]}, {p}, {out[r * nv + u]} : {ft}")
            return out
        res = k.loop(0, q.k // q.group, 1, [zero] * (mb * nv), ft, group)
    else:
        res = k.loop(0, q.k, 1, [zero] * (mb * nv), ft,
                     lambda kx, accs: fma(kx, [gm.at(kx, c) for c in cols], accs))
    for r in range(mb):
        for u in range(nv):
            t.stmt(f"vector.store {res[r * nv + u]}, {mats.om}[{rows[r]}, {cols[u]}] : "
                   f"{mats.omt}, {ft}")


def _gptq_rows(k: KernelText, mats: Mats, gm: _GptqMem, xs, m_lo: str, m_hi: str, n_lo: int,
               n_hi: int) -> None:
    t, v = k.t, gm.q.width
    if n_hi <= n_lo:
        return
    vecs = (n_hi - n_lo) // v
    per = max(1, v // k.tiles.lanes)
    nv = next(x for x in (8, 4, 2, 1) if vecs % x == 0 and x * per <= k.tiles.regs // 4)
    mb = k.tiles.row_block(v, 2 * nv)
    s = k.fresh("g")
    t.open(f"scf.forall ({s}) in ({vecs // nv})")
    n0 = k.ix("addi", k.ix("muli", s, nv * v), n_lo)
    rows_in_blocks(k, m_lo, m_hi, mb, lambda m, r: _gptq_dot(k, mats, gm, xs, m, r, n0, nv))
    t.close()


def _gptq_decode_tile(k: KernelText, gm: _GptqMem, kc: int):
    t, nr, v = k.t, k.tiles.nr, gm.q.width
    ft = f"vector<{v}xf32>"

    def fill(p, n0, kb, s_mem, s_t, t_mem, tt):
        def kstep(kk, _):
            kx = k.ix("addi", kb, kk)
            for u in range(nr // v):
                w = gm.at(kx, k.ix("addi", n0, u * v))
                t.stmt(f"vector.store {w}, {s_mem}[{p}, {kk}, {t.idx(u * v)}] : {s_t}, {ft}")
            return []
        k.loop(0, kc, 1, body=kstep)
    return fill


def gptq_matmul_text(x_t, w_t, z_t, out_t: str, q: Gptq, tiles: QuantTiles) -> str:
    """@body(%x: f32 [M, K] (already permuted), %w: uint8 [K bits/8 + 2G, N][, %z: i32
    [G, N bits/32]])."""
    k = KernelText(tiles, q.k, q.n)
    t = k.t
    mats = Mats(k, "%x", x_t)
    gm = _GptqMem(k, q, w_t, z_t)
    n_tile = q.n - q.n % tiles.nr if tiles.nr % q.width == 0 else 0
    m_tile = split_rows(k, mats)
    xs = x_sums(k, mats, q.group) if q.group % q.per == 0 else None
    if n_tile:
        kc = k_block(q.k, q.per if q.k % q.per == 0 else 1)
        tile_path(k, mats, m_tile, n_tile, kc, _gptq_decode_tile(k, gm, kc))
        _gptq_rows(k, mats, gm, xs, t.idx(0), m_tile, n_tile, q.n)
        _gptq_rows(k, mats, gm, xs, m_tile, mats.m, 0, q.n)
    else:
        _gptq_rows(k, mats, gm, xs, t.idx(0), mats.m, 0, q.n)
    out = t(f"bufferization.to_tensor {mats.om} restrict writable : {mats.omt} to {out_t}")
    sig = [f"%x: {x_t}", f"%w: {w_t}"] + ([f"%z: {z_t}"] if z_t is not None else [])
    return finish(t, sig, out, out_t)
