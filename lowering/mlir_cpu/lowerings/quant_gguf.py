"""GGUF quantized matmul and dequantize kernels (see quant_kernels.py for the two paths).

Row path details (a decode step is bound by the decode arithmetic, and on a cold cache by
streaming the weights): sub-blocks alternate between two partial sums; decoders with
`int_scales` (Q4_K, Q5_K) unpack their 6-bit scales with scalar SWAR ops and take float(sc)
from a 64-entry table as the FMA's broadcast operand, d once per block (the vector decode of
the scales and the lane broadcasts cost ~15 of ~60 cycles a block on Zen 4); every block
prefetches the same block PREFETCH_ROWS rows ahead."""
from __future__ import annotations

from .attention import finish, memref_of, to_buffer
from .quant_decoders import TABLE, Block, Decoder, lane
from .kernel_text import KernelText, hsum, transpose
from .quant_kernels import (Mats, QuantTiles, int_table, k_block, pow2, rows_in_blocks,
                            split_rows, tile_path, x_sums)
from .quant_k_lanes import Repacked


PARALLEL_ITERATIONS = 128


# Rows ahead of the current one whose block the row path prefetches: a decode step streams
# the weights from DRAM once, and the hardware prefetcher alone left two threads at ~11 GB/s
# (measured 15 GB/s with this, Zen 4, cold caches).
PREFETCH_ROWS = 2


def _prefetch(k: KernelText, dec: Decoder, wm: str, wmt: str, row: str, base: str) -> None:
    """Prefetch the cache lines of this block PREFETCH_ROWS weight rows below `row`
    (clamped to the last row: prefetching never faults, but the index must stay in bounds)."""
    t = k.t
    n = wmt.split("<")[1].split("x")[0]
    rows = t.idx(int(n)) if n != "?" else t(f"memref.dim {wm}, {t.idx(0)} : {wmt}")
    pr = t.min(k.ix("addi", row, PREFETCH_ROWS), k.ix("subi", rows, 1))
    for off in range(0, dec.nbytes, 64):
        col = k.ix("addi", base, off) if off else base
        t.stmt(f"memref.prefetch {wm}[{pr}, {col}], read, locality<3>, data : {wmt}")


def _gguf_dot(k: KernelText, mats: Mats, dec: Decoder, wm: str, wmt: str, xs, m0: str, mb: int,
              cols: list[str], table: str | None) -> None:
    """out[m0 : m0+mb, cols] = x rows . W rows, each block decoded in registers: codes times x
    summed per sub-block, then times the sub-block's scale; offsets once per block against the
    sums of x (xs). With a table (decoders with int_scales), the sub-block's scale is
    float(sc[s]) read from it as the FMA's broadcast operand and d multiplies the block's sum
    once; otherwise the scale vector is decoded and its lanes broadcast."""
    t = k.t
    wd, ns, nc = dec.width, dec.n_sub, len(cols)
    v, vs = f"vector<{wd}xf32>", f"vector<{max(ns, 1)}xf32>"
    zero, zero_s = t.const("0.0", v), t.const("0.0", vs)
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mb)]
    has_off = xs is not None
    per_sub = dec.sub // wd if dec.sub else 0
    # Sub-blocks alternate between two sums: one chain of an FMA per sub-block would bound the
    # loop by the FMA latency.
    nsplit = 2 if per_sub and ns >= 2 else 1
    n_acc = mb * nc
    na = n_acc if table else nsplit * n_acc

    def block(b, args):
        accs, accm = list(args[:na]), list(args[na:])
        base = k.ix("muli", b, dec.nbytes)
        k0 = k.ix("muli", b, dec.elems)
        blks = [Block(t, wm, wmt, c, base, wd) for c in cols]
        _prefetch(k, dec, wm, wmt, cols[-1], base)
        ints = [dec.int_scales(blk) for blk in blks] if table else None
        sums = [[None] * n_acc for _ in range(nsplit)] if table else None
        part = [None] * n_acc
        for c in range(dec.chunks):
            kc = k.ix("addi", k0, c * wd) if c else k0
            xv = [t(f"vector.load {mats.xm}[{r}, {kc}] : {mats.xmt}, {v}") for r in rows]
            for j, blk in enumerate(blks):
                q = dec.codes(blk, c)
                for i in range(mb):
                    n = i * nc + j
                    if not per_sub:
                        accs[n] = t(f"vector.fma {xv[i]}, {q}, {accs[n]} : {v}")
                    elif c % per_sub == 0:
                        part[n] = t(f"arith.mulf {xv[i]}, {q} : {v}")
                    else:
                        part[n] = t(f"vector.fma {xv[i]}, {q}, {part[n]} : {v}")
            if not per_sub or c % per_sub != per_sub - 1:
                continue
            s = c // per_sub
            for j, blk in enumerate(blks):
                if table:
                    f = t(f"memref.load {table}[{ints[j].index(t, s)}] : memref<{TABLE}xf32>")
                    sc = t(f"vector.broadcast {f} : f32 to {v}")
                else:
                    sc = lane(blk, dec.block_scales(blk)[0], s, ns)
                for i in range(mb):
                    n = i * nc + j
                    if table:
                        h = sums[s % nsplit]
                        h[n] = (t(f"arith.mulf {sc}, {part[n]} : {v}") if h[n] is None else
                                t(f"vector.fma {sc}, {part[n]}, {h[n]} : {v}"))
                    else:
                        h = (s % nsplit) * n_acc + n
                        accs[h] = t(f"vector.fma {sc}, {part[n]}, {accs[h]} : {v}")
        if table:
            for j in range(nc):
                d = t(f"vector.broadcast {ints[j].d} : f32 to {v}")
                for i in range(mb):
                    n = i * nc + j
                    tot = sums[0][n]
                    for h in range(1, nsplit):
                        tot = t(f"arith.addf {tot}, {sums[h][n]} : {v}")
                    accs[n] = t(f"vector.fma {d}, {tot}, {accs[n]} : {v}")
        if has_off:
            g0 = k.ix("muli", b, ns)
            xsv = [t(f"vector.load {xs[0]}[{r}, {g0}] : {xs[1]}, {vs}") for r in rows]
            for j, blk in enumerate(blks):
                if table:
                    dm = t(f"vector.broadcast {ints[j].dmin} : f32 to {vs}")
                for i in range(mb):
                    n = i * nc + j
                    if table:
                        mx = t(f"arith.mulf {ints[j].mins}, {xsv[i]} : {vs}")
                        accm[n] = t(f"vector.fma {dm}, {mx}, {accm[n]} : {vs}")
                    else:
                        off = dec.block_scales(blk)[1]
                        accm[n] = t(f"vector.fma {off}, {xsv[i]}, {accm[n]} : {vs}")
        return accs + accm
    inits = [zero] * na + ([zero_s] * n_acc if has_off else [])
    res = k.loop(0, k.k // dec.elems, 1, inits, [v] * na + [vs] * (len(inits) - na), block)
    for i in range(mb):
        for j, c in enumerate(cols):
            n = i * nc + j
            tot = res[n]
            for h in range(1, na // n_acc):
                tot = t(f"arith.addf {tot}, {res[h * n_acc + n]} : {v}")
            y = hsum(t, tot, wd)
            if has_off:
                y = t(f"arith.subf {y}, {hsum(t, res[na + n], ns)} : f32")
            t.stmt(f"memref.store {y}, {mats.om}[{rows[i]}, {c}] : {mats.omt}")


def _gguf_rows(k: KernelText, mats: Mats, dec: Decoder, wm: str, wmt: str, xs, m_lo: str, m_hi: str,
               n_lo: int, n_hi: int, lanes=None) -> None:
    """Rows [m_lo, m_hi) x columns [n_lo, n_hi) by the row path (lanes: (Repacked, the permuted
    x): repacked K-quant words in place, quant_k_lanes.py)."""
    t, nb = k.t, QuantTiles.weight_rows(dec.chunks)
    if n_hi <= n_lo:
        return
    mb = k.tiles.row_block(dec.width, 2 * nb if xs is not None or lanes is not None else nb)
    # Each parallel iteration takes several groups of nb weight rows: a few hundred iterations
    # per call, enough to balance the threads without a shared-counter grab per group.
    count = n_hi - n_lo
    per = nb * max(1, count // (nb * PARALLEL_ITERATIONS))
    g = k.fresh("g")
    t.open(f"scf.forall ({g}) in ({-(-count // per)})")
    table = (int_table(k, TABLE) if dec.int_scales is not None
             or (lanes is not None and lanes[0].task_table) else None)
    start = k.ix("addi", k.ix("muli", g, per), n_lo)
    end = t.min(k.ix("addi", start, per), t.idx(n_hi))

    def dot(m, r, cols):
        if lanes is None:
            return _gguf_dot(k, mats, dec, wm, wmt, xs, m, r, cols, table)
        lanes[0].dot(k, mats, wm, wmt, lanes[0], lanes[1], xs, m, r, cols, table,
                     lambda col, base: _prefetch(k, dec, wm, wmt, col, base))

    def rows_of(cols, mb_):
        rows_in_blocks(k, m_lo, m_hi, mb_, lambda m, r: dot(m, r, cols))

    def step(n0, _):
        full = t(f"arith.cmpi ule, {k.ix('addi', n0, nb)}, {end} : index")
        k.if_(full, lambda: rows_of([k.ix("addi", n0, j) if j else n0 for j in range(nb)], mb),
              lambda: k.loop(n0, end, 1, body=lambda n, _: rows_of([n], 1) or []))
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
                     tiles: QuantTiles, repacked: Repacked | None = None) -> str:
    """@body(%x: f32 [M, K], %w: uint8 [N, row bytes]) -> f32 [M, N] for a GGUF decoder
    (repacked: W is a K-quant repacked at load, "q4k_r" / "q5k_r" / "q6k_r", dec its decoder,
    and the row path takes its words in place, quant_k_lanes.py, quant_q6_lanes.py)."""
    if not pow2(dec.width):
        raise ValueError(f"quantized kernel: chunk width {dec.width} is not a power of two")
    k = KernelText(tiles, k_total, n)
    t = k.t
    mats = Mats(k, "%x", x_t)
    wm, wmt = to_buffer(t, "%w", w_t)
    n_tile = n - n % tiles.nr
    m_tile = split_rows(k, mats)
    xs = x_sums(k, mats, dec.sub) if dec.offsets else None
    lanes = (repacked, repacked.prologue(k, mats)) if repacked is not None else None
    if n_tile:
        kc = k_block(k_total, dec.elems)
        tile_path(k, mats, m_tile, n_tile, kc, _gguf_decode_tile(k, dec, wm, wmt, kc))
        _gguf_rows(k, mats, dec, wm, wmt, xs, t.idx(0), m_tile, n_tile, n, lanes)
        _gguf_rows(k, mats, dec, wm, wmt, xs, m_tile, mats.m, 0, n, lanes)
    else:
        _gguf_rows(k, mats, dec, wm, wmt, xs, t.idx(0), mats.m, 0, n, lanes)
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
