"""GGUF quantized matmul and dequantize kernels (see quant_kernels.py for the two paths)."""
from __future__ import annotations

from .attention import finish, memref_of, to_buffer
from .quant_decoders import Block, Decoder, lane
from .kernel_text import KernelText, hsum, transpose
from .quant_kernels import (Mats, QuantTiles, k_block, pow2, rows_in_blocks,
                            split_rows, tile_path, x_sums)


PARALLEL_ITERATIONS = 128


def _gguf_dot(k: KernelText, mats: Mats, dec: Decoder, wm: str, wmt: str, xs, m0: str, mb: int,
              cols: list[str]) -> None:
    """out[m0 : m0+mb, cols] = x rows . W rows, each block decoded in registers: codes times x
    summed per sub-block, then times the sub-block's scale; offsets once per block against the
    sums of x (xs)."""
    t = k.t
    wd, ns, nc = dec.width, dec.n_sub, len(cols)
    v, vs = f"vector<{wd}xf32>", f"vector<{max(ns, 1)}xf32>"
    zero, zero_s = t.const("0.0", v), t.const("0.0", vs)
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mb)]
    has_off = xs is not None
    per_sub = dec.sub // wd if dec.sub else 0

    def block(b, args):
        acc = list(args[:mb * nc])
        accm = list(args[mb * nc:])
        base = k.ix("muli", b, dec.nbytes)
        k0 = k.ix("muli", b, dec.elems)
        blks = [Block(t, wm, wmt, c, base, wd) for c in cols]
        part = [None] * (mb * nc)
        for c in range(dec.chunks):
            kc = k.ix("addi", k0, c * wd) if c else k0
            xv = [t(f"vector.load {mats.xm}[{r}, {kc}] : {mats.xmt}, {v}") for r in rows]
            for j, blk in enumerate(blks):
                q = dec.codes(blk, c)
                for i in range(mb):
                    n = i * nc + j
                    if not per_sub:
                        acc[n] = t(f"vector.fma {xv[i]}, {q}, {acc[n]} : {v}")
                    elif c % per_sub == 0:
                        part[n] = t(f"arith.mulf {xv[i]}, {q} : {v}")
                    else:
                        part[n] = t(f"vector.fma {xv[i]}, {q}, {part[n]} : {v}")
            if per_sub and c % per_sub == per_sub - 1:
                for j, blk in enumerate(blks):
                    sc = lane(blk, dec.block_scales(blk)[0], c // per_sub, ns)
                    for i in range(mb):
                        n = i * nc + j
                        acc[n] = t(f"vector.fma {sc}, {part[n]}, {acc[n]} : {v}")
        if has_off:
            g0 = k.ix("muli", b, ns)
            xsv = [t(f"vector.load {xs[0]}[{r}, {g0}] : {xs[1]}, {vs}") for r in rows]
            for j, blk in enumerate(blks):
                off = dec.block_scales(blk)[1]
                for i in range(mb):
                    accm[i * nc + j] = t(f"vector.fma {off}, {xsv[i]}, {accm[i * nc + j]} : {vs}")
        return acc + accm
    n_acc = mb * nc
    inits = [zero] * n_acc + ([zero_s] * n_acc if has_off else [])
    res = k.loop(0, k.k // dec.elems, 1, inits, [v] * n_acc + [vs] * (len(inits) - n_acc), block)
    for i in range(mb):
        for j, c in enumerate(cols):
            y = hsum(t, res[i * nc + j], wd)
            if has_off:
                y = t(f"arith.subf {y}, {hsum(t, res[n_acc + i * nc + j], ns)} : f32")
            t.stmt(f"memref.store {y}, {mats.om}[{rows[i]}, {c}] : {mats.omt}")


def _gguf_rows(k: KernelText, mats: Mats, dec: Decoder, wm: str, wmt: str, xs, m_lo: str, m_hi: str,
               n_lo: int, n_hi: int) -> None:
    """Rows [m_lo, m_hi) x columns [n_lo, n_hi) by the row path."""
    t, nb = k.t, QuantTiles.weight_rows(dec.chunks)
    if n_hi <= n_lo:
        return
    mb = k.tiles.row_block(dec.width, 2 * nb if xs is not None else nb)
    # Each parallel iteration takes several groups of nb weight rows: a few hundred iterations
    # per call, enough to balance the threads without a shared-counter grab per group.
    count = n_hi - n_lo
    per = nb * max(1, count // (nb * PARALLEL_ITERATIONS))
    g = k.fresh("g")
    t.open(f"scf.forall ({g}) in ({-(-count // per)})")
    start = k.ix("addi", k.ix("muli", g, per), n_lo)
    end = t.min(k.ix("addi", start, per), t.idx(n_hi))

    def step(n0, _):
        full = t(f"arith.cmpi ule, {k.ix('addi', n0, nb)}, {end} : index")

        def group():
            cols = [k.ix("addi", n0, j) if j else n0 for j in range(nb)]
            rows_in_blocks(k, m_lo, m_hi, mb,
                           lambda m, r: _gguf_dot(k, mats, dec, wm, wmt, xs, m, r, cols))

        def tail():
            k.loop(n0, end, 1, body=lambda n, _: rows_in_blocks(
                k, m_lo, m_hi, 1, lambda m, r: _gguf_dot(k, mats, dec, wm, wmt, xs, m, r, [n])) or [])
        k.if_(full, group, tail)
        return []
    k.loop(start, end, nb, body=step)
    t.close()


def _gguf_decode_tile(k: KernelText, dec: Decoder, wm: str, wmt: str, kc: int):
    """decode_tile for the tile path: rows into T[NR][kc] along k, then W x W transposes to S."""
    t, nr, wd = k.t, k.tiles.nr, dec.width
    v = f"vector<{wd}xf32>"

    def fill(p, n0, kb, s_mem, s_t, t_mem, tt):
        b0 = k.ix("divui", kb, dec.elems)

        def row(r, _):
            n = k.ix("addi", n0, r)

            def block(bi, _):
                b = k.ix("addi", b0, bi)
                blk = Block(t, wm, wmt, n, k.ix("muli", b, dec.nbytes), wd)
                for c in range(dec.chunks):
                    col = k.ix("addi", k.ix("muli", bi, dec.elems), c * wd)
                    t.stmt(f"vector.store {dec.value(blk, c)}, {t_mem}[{r}, {col}] : {tt}, {v}")
                return []
            k.loop(0, kc // dec.elems, 1, body=block)
            return []
        k.loop(0, nr, 1, body=row)

        def kt_step(kt, _):
            for rg in range(0, nr, wd):
                vs = [t(f"vector.load {t_mem}[{t.idx(rg + i)}, {kt}] : {tt}, {v}") for i in range(wd)]
                for i, col in enumerate(transpose(t, vs, wd)):
                    t.stmt(f"vector.store {col}, {s_mem}[{p}, {k.ix('addi', kt, i)}, "
                           f"{t.idx(rg)}] : {s_t}, {v}")
            return []
        k.loop(0, kc, wd, body=kt_step)
    return fill


def gguf_matmul_text(x_t, w_t, out_t: str, dec: Decoder, k_total: int, n: int,
                     tiles: QuantTiles) -> str:
    """@body(%x: f32 [M, K], %w: uint8 [N, row bytes]) -> f32 [M, N] for a GGUF decoder."""
    if not pow2(dec.width):
        raise ValueError(f"quantized kernel: chunk width {dec.width} is not a power of two")
    k = KernelText(tiles, k_total, n)
    t = k.t
    mats = Mats(k, "%x", x_t)
    wm, wmt = to_buffer(t, "%w", w_t)
    n_tile = n - n % tiles.nr
    m_tile = split_rows(k, mats)
    xs = x_sums(k, mats, dec.sub) if dec.offsets else None
    if n_tile:
        kc = k_block(k_total, dec.elems)
        tile_path(k, mats, m_tile, n_tile, kc, _gguf_decode_tile(k, dec, wm, wmt, kc))
        _gguf_rows(k, mats, dec, wm, wmt, xs, t.idx(0), m_tile, n_tile, n)
        _gguf_rows(k, mats, dec, wm, wmt, xs, m_tile, mats.m, 0, n)
    else:
        _gguf_rows(k, mats, dec, wm, wmt, xs, t.idx(0), mats.m, 0, n)
    out = t(f"bufferization.to_tensor {mats.om} restrict writable : {mats.omt} to {out_t}")
    return finish(t, [f"%x: {x_t}", f"%w: {w_t}"], out, out_t)


def gguf_dequantize_text(w_t, out_t: str, dec: Decoder, rows: int, k_total: int) -> str:
    """@body(%w: uint8 [rows, row bytes]) -> f32 [rows, K]: every row decoded by chunks."""
    k = KernelText(QuantTiles(16, 32, 1, 16), k_total, rows)
    t = k.t
    wm, wmt = to_buffer(t, "%w", w_t)
    omt = memref_of(out_t)
    om = t(f"memref.alloc() : {omt}")
    v = f"vector<{dec.width}xf32>"
    g = k.fresh("r")
    t.open(f"scf.forall ({g}) in ({rows})")

    def block(b, _):
        blk = Block(t, wm, wmt, g, k.ix("muli", b, dec.nbytes), dec.width)
        for c in range(dec.chunks):
            col = k.ix("addi", k.ix("muli", b, dec.elems), c * dec.width)
            t.stmt(f"vector.store {dec.value(blk, c)}, {om}[{g}, {col}] : {omt}, {v}")
        return []
    k.loop(0, k_total // dec.elems, 1, body=block)
    t.close()
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    return finish(t, [f"%w: {w_t}"], out, out_t)
