"""CPU quantized matmul kernels (MLIR text): y[M, N] = x[M, K] @ W^T with W decoded inside the
matmul loop, never as a whole float copy (quant_gguf.py, quant_gptq.py hold the encodings' parts).

Two paths, chosen per call from M (rows of x):

row path (fewer than MR rows, e.g. a decode step; and the rows / columns the tile path leaves):
    weights are decoded in registers, factored as y = sum_s scale_s (x . q)_s - sum_s
    offset_s X_s with X_s the sum of x over sub-block (group) s, computed once per call.
    GGUF rows are contiguous along k: each forall iteration takes NB weight rows (NB x a
    block ~ 16 chunks); per block,
    the integer codes (quant_decoders.py) meet MB activation rows in FMAs, a sub-block's
    partial dot product is scaled once, the offsets meet X once per block (vector ops), and
    each output gets one horizontal sum at the end.
    GPTQ codes are contiguous along n: NV vectors of output columns per iteration, one int32
    word vector gives 8 k; per group, sum_k x_k code_k accumulates, then scale * (that - zero
    point * X_group).
tile path (M >= MR): per slice of SP panels of NR columns and per k block of KC, the slice's
    weights are decoded once (exact floats) into an L1/L2 tile S[SP][KC][NR] (GGUF: rows
    decoded along k into T[NR][KC], then transposed in registers W x W at a time; GPTQ:
    decoded straight along n), and every MR-row block of x runs the register-blocked
    outer-product kernel of the packed f32 matmul (MR x NR accumulators, a broadcast of x times
    NR/lanes vectors of S) against it, so a tile's decode is shared by all M rows.

dequantize decodes rows by chunks, bit-identical to the interpreter; products accumulate in f32.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import to_buffer
from .kernel_text import KernelText, hsum


@dataclass(frozen=True)
class QuantTiles:
    """Register tiling of the quantized kernels for a target (lanes f32 per vector, regs)."""
    lanes: int
    regs: int
    mr: int       # rows of the tile path's register block
    nr: int       # panel width: a multiple of 16 and of the lanes

    @staticmethod
    def pick(lanes: int, regs: int) -> "QuantTiles":
        nr = max(2 * lanes, 16)
        nv = nr // lanes
        mr = max(1, min(8, (regs - nv - 1) // nv))
        return QuantTiles(lanes, regs, mr, nr)

    @staticmethod
    def weight_rows(chunks_per_block: int) -> int:
        """GGUF row path: weight rows per block step, so that one step decodes ~16 chunks (one
        K block of one row; eight rows of 32-value blocks): measured fastest on Zen 4 (more rows
        spill and interleave more streams, fewer leave the loop overhead exposed)."""
        return max(1, min(8, 16 // chunks_per_block))

    def row_block(self, width: int, per_row: int) -> int:
        """Activation rows per row-path block: accumulators fit in half the registers."""
        vecs = max(1, width // self.lanes) * per_row
        return max(1, min(4, self.regs // 2 // vecs))


def pow2(n: int) -> bool:
    return n & (n - 1) == 0


# -- pieces shared by GGUF and GPTQ ------------------------------------------------------------------
class Mats:
    """Buffer names of a kernel: x [M, K] f32, out [M, N] f32 and the tile scratch."""

    def __init__(self, k: KernelText, x, x_t):
        t = k.t
        self.xm, self.xmt = to_buffer(t, "%x", x_t)
        self.m = t(f"memref.dim {self.xm}, {t.idx(0)} : {self.xmt}")
        self.omt = f"memref<?x{k.n}xf32>"
        self.om = t(f"memref.alloc({self.m}) : {self.omt}")


def split_rows(k: KernelText, mats: Mats) -> str:
    """Rows the tile path takes: M - M % MR (0 when M < MR)."""
    mr = k.tiles.mr
    return k.ix("muli", k.ix("divui", mats.m, mr), mr)


def microkernel(k: KernelText, mats: Mats, s_mem: str, s_t: str, p: str, kb: str, kc: int,
                 first: str, m0: str, col: str) -> None:
    """out[m0 : m0+MR, col : col+NR] (+)= x[m0 : m0+MR, kb : kb+kc] @ S[p] (S[p] is [kc][NR])."""
    t, tl = k.t, k.tiles
    lanes, mr, nv = tl.lanes, tl.mr, tl.nr // tl.lanes
    v = f"vector<{lanes}xf32>"
    zero = t.const("0.0", v)
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(mr)]
    cols = [k.ix("addi", col, u * lanes) if u else col for u in range(nv)]
    init = []
    for r in range(mr):
        for u in range(nv):
            old = t(f"vector.load {mats.om}[{rows[r]}, {cols[u]}] : {mats.omt}, {v}")
            init.append(t(f"arith.select {first}, {zero}, {old} : {v}"))

    def body(kk, accs):
        bv = [t(f"vector.load {s_mem}[{p}, {kk}, {t.idx(u * lanes)}] : {s_t}, {v}")
              for u in range(nv)]
        kx = k.ix("addi", kb, kk)
        out = []
        for r in range(mr):
            a = t(f"memref.load {mats.xm}[{rows[r]}, {kx}] : {mats.xmt}")
            ab = t(f"vector.broadcast {a} : f32 to {v}")
            out += [t(f"vector.fma {ab}, {bv[u]}, {accs[r * nv + u]} : {v}") for u in range(nv)]
        return out
    res = k.loop(0, kc, 1, init, v, body)
    for r in range(mr):
        for u in range(nv):
            t.stmt(f"vector.store {res[r * nv + u]}, {mats.om}[{rows[r]}, {cols[u]}] : "
                   f"{mats.omt}, {v}")


def tile_path(k: KernelText, mats: Mats, m_tile: str, n_tile: int, kc: int, decode_tile) -> None:
    """Rows [0, m_tile) x columns [0, n_tile) through decoded tiles; decode_tile(p, n0, kb, S,
    S type, T, T type) fills S[p] with W^T[kb : kb+kc, n0 : n0+NR]."""
    t, tl = k.t, k.tiles
    nr = tl.nr
    panels = n_tile // nr
    sp = min(4, max(1, panels // 4))
    slices = -(-panels // sp)
    s_t, tt = f"memref<{sp}x{kc}x{nr}xf32>", f"memref<{nr}x{kc}xf32>"
    s_iv = k.fresh("s")
    any_rows = t(f"arith.cmpi ugt, {m_tile}, {t.idx(0)} : index")
    t.open(f"scf.if {any_rows}")   # fewer than MR rows: the row path does all of them
    t.open(f"scf.forall ({s_iv}) in ({slices})")
    s_mem = t(f"memref.alloca() : {s_t}")
    t_mem = t(f"memref.alloca() : {tt}")
    p0 = k.ix("muli", s_iv, sp)
    n_p = t.min(t.idx(sp), k.ix("subi", t.idx(panels), p0))

    def kblock(kb, _):
        def dec(p, _):
            n0 = k.ix("muli", k.ix("addi", p0, p), nr)
            decode_tile(p, n0, kb, s_mem, s_t, t_mem, tt)
            return []
        k.loop(0, n_p, 1, body=dec)
        first = t(f"arith.cmpi eq, {kb}, {t.idx(0)} : index")

        def mblock(m0, _):
            def panel(p, _):
                col = k.ix("muli", k.ix("addi", p0, p), nr)
                microkernel(k, mats, s_mem, s_t, p, kb, kc, first, m0, col)
                return []
            k.loop(0, n_p, 1, body=panel)
            return []
        k.loop(0, m_tile, tl.mr, body=mblock)
        return []
    k.loop(0, k.k, kc, body=kblock)
    t.close()
    t.close()


def k_block(k_total: int, elems: int, target: int = 256) -> int:
    """The k block of the tile path: whole blocks of `elems`, dividing K, at most ~target."""
    blocks = k_total // elems
    best = 1
    for d in range(1, blocks + 1):
        if blocks % d == 0 and d * elems <= max(target, elems):
            best = d
    return best * elems


SERIAL_ROWS = 16   # x_sums runs serially below this many rows


def x_sums(k: KernelText, mats: Mats, size: int) -> tuple[str, str]:
    """(xs, its type): xs[m, g] = sum of x[m, g*size : (g+1)*size], for the offset terms."""
    t = k.t
    groups = k.k // size
    wd = next(w for w in (16, 8, 4, 2, 1) if size % w == 0)
    v = f"vector<{wd}xf32>"
    xst = f"memref<?x{groups}xf32>"
    xs = t(f"memref.alloc({mats.m}) : {xst}")

    def row(m):
        def group(g, _):
            k0 = k.ix("muli", g, size)

            def add(i, acc):
                x = t(f"vector.load {mats.xm}[{m}, {k.ix('addi', k0, i)}] : {mats.xmt}, {v}")
                return [t(f"arith.addf {acc[0]}, {x} : {v}")]
            parts = k.loop(0, size, wd, [t.const("0.0", v)], v, add)
            t.stmt(f"memref.store {hsum(t, parts[0], wd)}, {xs}[{m}, {g}] : {xst}")
            return []
        k.loop(0, groups, 1, body=group)

    per_row(k, mats, row)
    return xs, xst


def int_table(k: KernelText, size: int, signed: bool = False, heap: bool = False) -> str:
    """memref<size x f32> holding the float of each index (signed: of the index as an int8,
    size 256), so a scale byte's float is one load; on the stack of the task that builds it,
    or (heap) built once a call before the tasks (the deallocation pass frees it)."""
    t = k.t
    tab = t(f"memref.{'alloc' if heap else 'alloca'}() : memref<{size}xf32>")

    def fill(i, _):
        u = t(f"arith.index_castui {i} : index to i32")
        f = (t(f"arith.sitofp {t(f'arith.trunci {u} : i32 to i8')} : i8 to f32") if signed
             else t(f"arith.uitofp {u} : i32 to f32"))
        t.stmt(f"memref.store {f}, {tab}[{i}] : memref<{size}xf32>")
        return []
    k.loop(0, size, 1, body=fill)
    return tab


def per_row(k: KernelText, mats: Mats, row) -> None:
    """row(m) for every row m of x: serially below SERIAL_ROWS rows (a decode step's few rows
    are cheaper than a parallel region's barrier), else one forall iteration a row."""
    t = k.t

    def parallel():
        m = k.fresh("m")
        t.open(f"scf.forall ({m}) in ({mats.m})")
        row(m)
        t.close()
    few = t(f"arith.cmpi ult, {mats.m}, {t.idx(SERIAL_ROWS)} : index")
    k.if_(few, lambda: k.loop(0, mats.m, 1, body=lambda m, _: row(m) or []), parallel)


def rows_in_blocks(k: KernelText, m_lo: str, m_hi: str, mb: int, emit) -> None:
    """emit(m0, rows) for rows [m_lo, m_hi): blocks of mb rows, then single rows."""
    if mb > 1:
        n = k.ix("subi", m_hi, m_lo)
        mid = k.ix("addi", m_lo, k.ix("muli", k.ix("divui", n, mb), mb))
        k.loop(m_lo, mid, mb, body=lambda m, _: emit(m, mb) or [])
        m_lo = mid
    k.loop(m_lo, m_hi, 1, body=lambda m, _: emit(m, 1) or [])
