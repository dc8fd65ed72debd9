"""The bf16 matmul on AMX tiles: y[M, N] = x[M, K] @ W (+ bias) with x and W in bf16, y in f32
or bf16.

One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of x by a 32 x 16 tile of W (as 16 rows of 16
column pairs) into a 16 x 16 f32 tile: 8,192 products, 16 times what an AVX-512 FMA or
`vdpbf16ps` does a cycle. Eight tile registers hold a 2 x 2 block of C (32 x 32) and the two x
and two W tiles of one k step.

W is the bf16-pairs layout of the vdpbf16ps kernel ("nk32p", packed once at load): panel p's
rows kk..kk+15, first or second 64 bytes, are exactly a W tile (16 rows of 16 pairs, 128 bytes
apart), so both kernels share the packing. x is repacked per call into 1 KB tiles
[M/16, K/32, 16, 32] on 64-byte lines, its rows padded with zeros to a multiple of 32: a tile
row then never straddles two cache lines (numpy puts x 16 bytes past one: 1.5x slower), and the
16 rows of a tile do not all fall in one L1 set as rows 8 KB apart do. C accumulates in 4 KB
blocks [M/32, N/32, 32, 32] (a tile's rows in one page; in y's rows they were 16 pages apart),
and after the last k block each block's rows below M go to y with the bias and the rounding to
y's dtype (no pass of their own over y; a ragged M needs no other handling).

Loops: scf.forall over (row chunk of <= ROW_CHUNK rows, group of GROUP_PANELS panels); per k
block of up to KSTEPS k steps, per 32-row block (its x block, 16 KB, stays in L1 over the
group's panels), per panel (the group's W block, 256 KB, in L2 over the row blocks): C loaded
(zero on the first k block), the k steps unrolled (tile values cannot cross scf.for), C stored.
Against panels outer, 32 k steps a block and C in y's rows: 1,080 -> 1,580-1,690 GFLOP/s at
512 x 4096 x 6144 on two cores of an AMX Xeon (torch's oneDNN: 1,850-2,060; BENCHMARKS.md).
Products are exact in f32 and accumulate in f32; as with vdpbf16ps, denormal bf16 inputs count
as zero (the instruction's DAZ).
"""
from __future__ import annotations

from .attention import finish, to_buffer
from .bf16_matmul import kernel_buffers
from .kernel_text import KernelText

NR = 32            # columns a panel (the packed layout's), two C tiles wide
ROWS = 32          # rows a C block, two tiles high
KSTEPS = 8         # k steps (32 k each) a k block at most
GROUP_PANELS = 16  # panels a forall iteration
ROW_CHUNK = 512    # rows a forall iteration: 512 x 256 bf16 of x a k block (256 KB)
TX, TC = "!amx.tile<16x32xbf16>", "!amx.tile<16x16xf32>"


def amx_applies(k_total: int, n: int) -> bool:
    """Whether the AMX kernel takes a K x N weight (whole 32-wide k steps and panels)."""
    return k_total % 32 == 0 and n % NR == 0


def k_steps(k_total: int) -> int:
    """k steps a block: the largest divisor of K/32 not above KSTEPS."""
    steps = k_total // 32
    return max(d for d in range(1, min(steps, KSTEPS) + 1) if steps % d == 0)


def amx_matmul_text(x_t, w_t, out_t: str, k_total: int, n: int, bias_t=None) -> str:
    """@body(%x: bf16 [M, K], %w: bf16 pairs [N/32, K/2, 64][, %b: [N]]) -> out_t, [M, N] f32
    or bf16: the bias added and the result rounded as each block is copied out (no pass of its
    own over [M, N])."""
    if not amx_applies(k_total, n):
        raise ValueError(f"AMX matmul kernel: K = {k_total} and N = {n} must be multiples of "
                         f"32")
    k, xm, xmt, wm, wmt, m = kernel_buffers(x_t, w_t, k_total, n)
    t = k.t
    out_el = out_t.rsplit("x", 1)[1].rstrip(">")
    omt = f"memref<?x{n}x{out_el}>"
    om = t(f"memref.alloc({m}) {{alignment = 64 : i64}} : {omt}")
    bm, bmt = to_buffer(t, "%b", bias_t) if bias_t is not None else (None, None)
    kt_n, panels, ks = k_total // 32, n // NR, k_steps(k_total)
    mpad = k.ix("muli", k.ix("divui", k.ix("addi", m, ROWS - 1), ROWS), ROWS)
    xpt = f"memref<?x{kt_n}x16x32xbf16>"
    xp = t(f"memref.alloc({k.ix('divui', mpad, 16)}) {{alignment = 64 : i64}} : {xpt}")
    _pack_x(k, xm, xmt, xp, xpt, m, mpad, kt_n)
    cpt = f"memref<?x{panels}x{ROWS}x{NR}xf32>"
    cp = t(f"memref.alloc({k.ix('divui', mpad, ROWS)}) {{alignment = 64 : i64}} : {cpt}")
    groups = -(-panels // GROUP_PANELS)
    chunks = k.ix("divui", k.ix("addi", mpad, ROW_CHUNK - 1), ROW_CHUNK)
    it = k.fresh("it")
    t.open(f"scf.forall ({it}) in ({k.ix('muli', chunks, groups)})")
    g = k.ix("remui", it, groups)
    r_lo = k.ix("muli", k.ix("divui", it, groups), ROW_CHUNK)
    r_hi = t.min(k.ix("addi", r_lo, ROW_CHUNK), mpad)
    p0 = k.ix("muli", g, GROUP_PANELS)
    n_p = t.min(t.idx(GROUP_PANELS), k.ix("subi", t.idx(panels), p0))
    ops = dict(xp=xp, xpt=xpt, wm=wm, wmt=wmt, om=om, omt=omt, cp=cp, cpt=cpt, ks=ks, m=m,
               out_el=out_el, bm=bm, bmt=bmt)

    def kblock(kt0: str, first: bool, last: bool) -> None:
        def rows(r0, _):
            def panel(pi, _):
                _block(k, ops, k.ix("addi", p0, pi), r0, kt0, first, last)
                return []
            k.loop(0, n_p, 1, body=panel)
            return []
        k.loop(r_lo, r_hi, ROWS, body=rows)

    blocks = kt_n // ks
    kblock(t.idx(0), True, blocks == 1)
    if blocks > 2:
        k.loop(ks, kt_n - ks, ks, body=lambda kt0, _: kblock(kt0, False, False) or [])
    if blocks > 1:
        kblock(t.idx(kt_n - ks), False, True)
    t.close()
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    sig = [f"%x: {x_t}", f"%w: {w_t}"] + ([f"%b: {bias_t}"] if bias_t is not None else [])
    return finish(t, sig, out, out_t)


def _pack_x(k: KernelText, xm, xmt, xp, xpt, m, mpad, kt_n: int) -> None:
    """xp[r/16, kt, r%16, :] = x[r, 32 kt : 32 kt + 32], rows m..mpad zero."""
    t = k.t
    vb = "vector<32xbf16>"
    zero = t.const("0.0", vb)
    last = k.ix("subi", m, 1)
    rt = k.fresh("rt")
    t.open(f"scf.forall ({rt}) in ({k.ix('divui', mpad, 16)})")

    def row(r, _):
        i = k.ix("addi", k.ix("muli", rt, 16), r)
        src = t.min(i, last)
        keep = t(f"arith.cmpi ult, {i}, {m} : index")

        def step(kt, _):
            v = t(f"vector.load {xm}[{src}, {k.ix('muli', kt, 32)}] : {xmt}, {vb}")
            v = t(f"arith.select {keep}, {v}, {zero} : {vb}")
            t.stmt(f"vector.store {v}, {xp}[{rt}, {kt}, {r}, {t.idx(0)}] : {xpt}, {vb}")
            return []
        k.loop(0, kt_n, 1, body=step)
        return []
    k.loop(0, 16, 1, body=row)
    t.close()


def _block(k: KernelText, o: dict, p: str, r0: str, kt0: str, first: bool, last: bool):
    """C block (r0 / 32, p) (+)= x block @ W block over ks k steps from k step kt0; after the
    last k block its rows below M go to out."""
    t = k.t
    rb = k.ix("divui", r0, ROWS)
    at = [[f"{rb}, {p}, {t.idx(16 * i)}, {t.idx(16 * j)}" for j in range(2)] for i in range(2)]
    c = [[t(f"amx.tile_zero : {TC}") if first else
          t(f"amx.tile_load {o['cp']}[{at[i][j]}] : {o['cpt']} into {TC}")
          for j in range(2)] for i in range(2)]
    rt = k.ix("divui", r0, 16)
    rts = [rt, k.ix("addi", rt, 1)]
    for s in range(o["ks"]):
        kt = k.ix("addi", kt0, s)
        kp = k.ix("muli", kt, 16)
        a = [t(f"amx.tile_load {o['xp']}[{rts[i]}, {kt}, {t.idx(0)}, {t.idx(0)}] : "
               f"{o['xpt']} into {TX}") for i in range(2)]
        b = [t(f"amx.tile_load {o['wm']}[{p}, {kp}, {t.idx(32 * j)}] : {o['wmt']} into {TX}")
             for j in range(2)]
        c = [[t(f"amx.tile_mulf {a[i]}, {b[j]}, {c[i][j]} : {TX}, {TX}, {TC}")
              for j in range(2)] for i in range(2)]
    for i in range(2):
        for j in range(2):
            t.stmt(f"amx.tile_store {o['cp']}[{at[i][j]}], {c[i][j]} : {o['cpt']}, {TC}")
    if last:
        _copy_out(k, o, rb, p, r0)


def _copy_out(k: KernelText, o: dict, rb: str, p: str, r0: str) -> None:
    """out[r0 + r, 32p : 32p + 32] = C block (rb, p) row r (+ bias, in out's type), for the
    rows below M (the block was just stored: it is in L1)."""
    t = k.t
    v, vo = "vector<16xf32>", f"vector<16x{o['out_el']}>"
    col = k.ix("muli", p, NR)
    cols = [col, k.ix("addi", col, 16)]
    bias = []
    if o["bm"] is not None:
        bel = o["bmt"].rsplit("x", 1)[1].rstrip(">")
        for c in cols:
            b = t(f"vector.load {o['bm']}[{c}] : {o['bmt']}, vector<16x{bel}>")
            bias.append(b if bel == "f32" else t(f"arith.extf {b} : vector<16x{bel}> to {v}"))

    def row(r, _):
        rr = k.ix("subi", r, r0)
        for j in range(2):
            x = t(f"vector.load {o['cp']}[{rb}, {p}, {rr}, {t.idx(16 * j)}] : {o['cpt']}, {v}")
            if bias:
                x = t(f"arith.addf {x}, {bias[j]} : {v}")
            if o["out_el"] != "f32":
                x = t(f"arith.truncf {x} : {v} to {vo}")
            t.stmt(f"vector.store {x}, {o['om']}[{r}, {cols[j]}] : {o['omt']}, {vo}")
        return []
    k.loop(r0, t.min(k.ix("addi", r0, ROWS), o["m"]), 1, body=row)
