"""The bf16 matmul on AVX512-BF16 (`vdpbf16ps`): y[M, N] = x[M, K] @ W with x and W in bf16.

The f32 kernel of schedules.py widens bf16 to f32 and runs one FMA per product; `vdpbf16ps`
multiplies 32 bf16 pairs and adds them into 16 f32 lanes in one instruction (twice the products
of an f32 FMA, half the weight bytes). W is packed once at load in bf16 pairs (pack_layout.py,
layout "nk32p": packed[p, kk, 2j + t] = W[p*32 + j, 2kk + t]); x's pair (x[m, 2kk], x[m, 2kk+1])
is one 32-bit broadcast. Register block MR x 32: 2 MR f32 accumulators, two W vectors a k pair.

Loops: scf.forall over slices of SP panels (OpenMP, dynamic schedule); per k block of KC pairs
(the slice's W block, SP x KC x 128 bytes, stays in L2; an MR-row x block in L1), every MR-row
block of x (then the remaining rows one by one) runs the register kernel against each panel of
the slice, accumulating into an f32 [M, N] buffer (zero on the first k block). Products are
exact in f32 and each `vdpbf16ps` lane adds its two into the accumulator, so the result differs
from the f32 kernel's (one FMA a product, in k order) by f32 rounding only; denormal bf16
inputs count as zero (the instruction's DAZ), which no weight or activation of a model is.
"""
from __future__ import annotations

from .attention import finish, to_buffer
from .kernel_text import KernelText

LANES = 16     # f32 lanes of a zmm register
NR = 32        # columns a panel: two accumulators a row


def k_pairs_block(k_pairs: int, target: int = 256) -> int:
    """Pairs per k block: the largest divisor of K/2 not above `target`."""
    return max(d for d in range(1, min(k_pairs, target) + 1) if k_pairs % d == 0)


def slice_panels(panels: int) -> int:
    """Panels a forall iteration: at most 16 (a 512 KB W block at KC = 256 pairs), and at
    least ~8 slices so two to eight threads share them evenly."""
    return max(1, min(16, panels // 8))


def kernel_buffers(x_t, w_t, k_total: int, n: int):
    """(writer, x buffer and type, W buffer and type, M) of a kernel on %x and %w."""
    k = KernelText(None, k_total, n)
    xm, xmt = to_buffer(k.t, "%x", x_t)
    wm, wmt = to_buffer(k.t, "%w", w_t)
    return k, xm, xmt, wm, wmt, k.t(f"memref.dim {xm}, {k.t.idx(0)} : {xmt}")


def bf16_matmul_text(x_t, w_t, out_t: str, k_total: int, n: int, mr: int) -> str:
    """@body(%x: bf16 [M, K], %w: bf16 pairs [N/32, K/2, 64]) -> f32 [M, N]."""
    if k_total % 2 or n % NR:
        raise ValueError(f"bf16 matmul kernel: K = {k_total} must be even and N = {n} a "
                         f"multiple of {NR}")
    k, xm, xmt, wm, wmt, m = kernel_buffers(x_t, w_t, k_total, n)
    t = k.t
    omt = f"memref<?x{n}xf32>"
    om = t(f"memref.alloc({m}) : {omt}")
    pairs, panels = k_total // 2, n // NR
    kc, sp = k_pairs_block(pairs), slice_panels(panels)
    slices = -(-panels // sp)
    m_full = k.ix("muli", k.ix("divui", m, mr), mr)
    s_iv = k.fresh("s")
    t.open(f"scf.forall ({s_iv}) in ({slices})")
    p0 = k.ix("muli", s_iv, sp)
    n_p = t.min(t.idx(sp), k.ix("subi", t.idx(panels), p0))

    def kblock(kb, _):
        first = t(f"arith.cmpi eq, {kb}, {t.idx(0)} : index")

        def rows(m0, count):
            def panel(p, _):
                _register_block(k, xm, xmt, wm, wmt, om, omt, k.ix("addi", p0, p), kb, kc,
                                first, m0, count)
                return []
            k.loop(0, n_p, 1, body=panel)
        k.loop(0, m_full, mr, body=lambda m0, _: rows(m0, mr) or [])
        k.loop(m_full, m, 1, body=lambda m0, _: rows(m0, 1) or [])
        return []
    k.loop(0, pairs, kc, body=kblock)
    t.close()
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    return finish(t, [f"%x: {x_t}", f"%w: {w_t}"], out, out_t)


def _register_block(k: KernelText, xm, xmt, wm, wmt, om, omt, panel: str, kb: str, kc: int,
                    first: str, m0: str, count: int) -> None:
    """out[m0 : m0+count, panel*32 : +32] (+)= x[m0 : m0+count, 2kb : 2(kb+kc)] @ W block."""
    t = k.t
    v, vb, vi = f"vector<{LANES}xf32>", f"vector<{2 * LANES}xbf16>", f"vector<{LANES}xi32>"
    zero = t.const("0.0", v)
    col0 = k.ix("muli", panel, NR)
    cols = [col0, k.ix("addi", col0, LANES)]
    rows = [k.ix("addi", m0, r) if r else m0 for r in range(count)]
    init = []
    for r in rows:
        for c in cols:
            old = t(f"vector.load {om}[{r}, {c}] : {omt}, {v}")
            init.append(t(f"arith.select {first}, {zero}, {old} : {v}"))

    def body(kk, accs):
        kp = k.ix("addi", kb, kk)
        w = [t(f"vector.load {wm}[{panel}, {kp}, {t.idx(u * 2 * LANES)}] : {wmt}, {vb}")
             for u in range(2)]
        kx = k.ix("muli", kp, 2)
        out = []
        for i, r in enumerate(rows):
            pair = t(f"vector.load {xm}[{r}, {kx}] : {xmt}, vector<2xbf16>")
            word = t(f"vector.bitcast {pair} : vector<2xbf16> to vector<1xi32>")
            w32 = t(f"vector.extract {word}[0] : i32 from vector<1xi32>")
            a = t(f"vector.bitcast {t(f'vector.broadcast {w32} : i32 to {vi}')} : {vi} to {vb}")
            out += [t(f"x86vector.avx512.dot {accs[2 * i + u]}, {a}, {w[u]} : {vb} -> {v}")
                    for u in range(2)]
        return out
    res = k.loop(0, kc, 1, init, v, body)
    for i, r in enumerate(rows):
        for u, c in enumerate(cols):
            t.stmt(f"vector.store {res[2 * i + u]}, {om}[{r}, {c}] : {omt}, {v}")
