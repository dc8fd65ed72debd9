"""Quantized GEMV for decode batches (X of 1 to 4 rows): no tensor cores, no padding.

At batch 1 the dequantize-in-the-loop matmuls (quant.py, quant_gptq.py) pad X to a 16-row dot
tile and move every decoded tile through the dot operand layout; here each program owns
BLOCK_N weight rows (GGUF) or columns (GPTQ) and a contiguous run of K, decodes in registers
with the same decoders (so every weight value is the bit pattern the reference gives) and
multiplies by X in fp32 FMAs into an accumulator of the tile's own shape, summed across lanes
once at the end; the weight is never rounded to X's dtype (the dot path rounds it). X is read
once per step and broadcast over the weight tile (a lane holding several weight rows reuses
its X registers), two columns per word: every decoder's planes pair up on columns 2j, 2j + 1. K is split over grid axis 2 as the matmuls do
(SPLIT_K > 1: fp32 partials `[SPLIT_K, M, N]` summed by matmul_skinny.splitk_reduce_kernel),
so a 4096-row weight still spreads over a few hundred programs.

Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K), the matmuls' order, so launch rules and
lowerings are shared. The selection (which M take this path) lives in quant.config_for and
quant_gptq.config_for behind GEMV_ENABLED / GEMV_MAX_M below.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.quant_gguf import deq_planes
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

# The shipped switch: flip after measuring on the GPU (tools/gpu_sweeps/quant.py times both).
GEMV_ENABLED = True
# Row buckets (largest M, BLOCK_M): one kernel per bucket, X rows past M clamped; BLOCK_M is
# 1, 2 or 4 (the kernels keep one accumulator per row).
GEMV_BUCKETS = ((1, 1), (2, 2), (4, 4))
# Largest M the switch sends to the GEMV, per weight family. H200 sweep (tools/gpu_sweeps/
# quant.py, bf16 X, 4096x4096 and 14336x4096): GGUF's GEMV beat the dot path at M = 1, 2, 4 for
# every encoding (1.0x to 2.0x); GPTQ's only at M = 1 (1.2x; 0.6x to 1.0x at M = 2, 4), except
# with desc_act, whose dot path gathers X through the permutation (2x to 4x at M <= 4).
GEMV_MAX_M = {"gguf": 4, "gptq": 1, "gptq_perm": 4}


def gemv_bucket(m_max: int | None, enabled: bool | None = None,
                family: str = "gguf") -> int | None:
    """BLOCK_M of the GEMV bucket for m_max, or None when the matmul path takes it;
    enabled None follows GEMV_ENABLED and GEMV_MAX_M[family], True / False forces the choice
    (sweeps time both)."""
    if not (GEMV_ENABLED if enabled is None else enabled) or m_max is None:
        return None
    if enabled is None and m_max > GEMV_MAX_M[family]:
        return None
    return next((bm for top, bm in GEMV_BUCKETS if m_max <= top), None)


@triton.jit
def _row(x_ptr, pid_m, j: tl.constexpr, BLOCK_M: tl.constexpr, M, K):
    """Start of X row j of this program's rows (clamped to the last row)."""
    return x_ptr + tl.minimum(pid_m * BLOCK_M + j, M - 1).to(tl.int64) * K


@triton.jit
def _store_row(c_ptr, acc, pid_m, pid_k, j: tl.constexpr, BLOCK_M: tl.constexpr, M, N, rn,
               AXES: tl.constexpr, SPLIT_K: tl.constexpr):
    # GGUF tiles [BLOCK_N, NG, L] sum their last two axes, GPTQ tiles [KW, BLOCK_N] the first.
    if AXES == 3:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        out = tl.sum(acc, axis=0)
    m = pid_m * BLOCK_M + j
    dst = m.to(tl.int64) * N + rn
    ok = (rn < N) & (m < M)
    if SPLIT_K > 1:
        tl.store(c_ptr + pid_k.to(tl.int64) * M * N + dst, out, mask=ok)
    else:
        tl.store(c_ptr + dst, out.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _x_pair(row, kw, live):
    """X values 2 kw and 2 kw + 1 of a row in fp32, read as one word (16-bit X: 32 bits, a
    bfloat16 widened by a shift or a mask; float32 X: 64 bits); 0 where `live` is false."""
    if row.dtype.element_ty == tl.float32:
        w = tl.load(row.to(tl.pointer_type(tl.uint64)) + kw, mask=live, other=0)
        lo = (w & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        hi = (w >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        w = tl.load(row.to(tl.pointer_type(tl.uint32)) + kw, mask=live, other=0)
        if row.dtype.element_ty == tl.bfloat16:
            lo = (w << 16).to(tl.float32, bitcast=True)
            hi = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _fma_pair(acc, row, kw, live, w0, w1):
    xa, xb = _x_pair(row, kw, live)
    return acc + xa * w0 + xb * w1


# One accumulator per X row (BLOCK_M <= 4), each in the weight tile's own shape: a 4-D
# [BLOCK_M, ...] accumulator would carry a layout of its own, and every decoded tile would
# cross shared memory to reach it.
@triton.jit
def gguf_gemv_kernel(x_ptr, w_ptr, c_ptr, M, N, row_bytes, n_groups, groups_per_split,
                     ENC: tl.constexpr, E: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    pdl_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    K = n_groups * E
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N and groups past the run are clamped: every address stays in X and W.
    p8 = w_ptr + (tl.minimum(rn, N - 1).to(tl.int64) * row_bytes)[:, None, None]
    x0 = _row(x_ptr, pid_m, 0, BLOCK_M, M, K)
    x1 = _row(x_ptr, pid_m, 1, BLOCK_M, M, K)
    x2 = _row(x_ptr, pid_m, 2, BLOCK_M, M, K)
    x3 = _row(x_ptr, pid_m, 3, BLOCK_M, M, K)
    g_lo = pid_k * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, n_groups)
    acc0 = tl.zeros((BLOCK_N, NG, L), tl.float32)
    acc1 = tl.zeros((BLOCK_N, NG, L), tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG, L), tl.float32)
    acc3 = tl.zeros((BLOCK_N, NG, L), tl.float32)
    for g0 in range(g_lo, g_hi, NG):
        g = g0 + tl.arange(0, NG)
        # A group past the run multiplies X zeros (the weight of a clamped group is real data).
        live = (g < g_hi)[None, :, None]
        ws, idx = deq_planes(p8, tl.minimum(g, n_groups - 1)[None, :, None], ENC, L)
        if P == 1:      # unquantized rows
            k = idx[0]
            w = ws[0]
            acc0 += tl.load(x0 + k, mask=live, other=0.0).to(tl.float32) * w
            if BLOCK_M > 1:
                acc1 += tl.load(x1 + k, mask=live, other=0.0).to(tl.float32) * w
            if BLOCK_M > 2:
                acc2 += tl.load(x2 + k, mask=live, other=0.0).to(tl.float32) * w
                acc3 += tl.load(x3 + k, mask=live, other=0.0).to(tl.float32) * w
        else:
            # Every decoder's planes come in pairs whose values sit at columns 2j, 2j + 1 of X,
            # j = (start of a run of L) + lane (quant_gguf.py: e = ... + 2 i): one word of X
            # feeds both, and a lane's words are contiguous (vector loads).
            for p in tl.static_range(0, P, 2):
                kw = tl.max_contiguous(tl.multiple_of(idx[p] >> 1, [1, 1, L]), [1, 1, L])
                acc0 = _fma_pair(acc0, x0, kw, live, ws[p], ws[p + 1])
                if BLOCK_M > 1:
                    acc1 = _fma_pair(acc1, x1, kw, live, ws[p], ws[p + 1])
                if BLOCK_M > 2:
                    acc2 = _fma_pair(acc2, x2, kw, live, ws[p], ws[p + 1])
                    acc3 = _fma_pair(acc3, x3, kw, live, ws[p], ws[p + 1])
    _store_row(c_ptr, acc0, pid_m, pid_k, 0, BLOCK_M, M, N, rn, 3, SPLIT_K)
    if BLOCK_M > 1:
        _store_row(c_ptr, acc1, pid_m, pid_k, 1, BLOCK_M, M, N, rn, 3, SPLIT_K)
    if BLOCK_M > 2:
        _store_row(c_ptr, acc2, pid_m, pid_k, 2, BLOCK_M, M, N, rn, 3, SPLIT_K)
        _store_row(c_ptr, acc3, pid_m, pid_k, 3, BLOCK_M, M, N, rn, 3, SPLIT_K)


@triton.jit
def _gptq_plane(w, s, zs, BITS: tl.constexpr, p: tl.constexpr):
    code = (w >> (BITS * p)) & ((1 << BITS) - 1)
    return ((code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s + zs


@triton.jit
def gptq_words(words, scales, z_ptr, row, rn, rn_c, nmask, N, group_size, BITS: tl.constexpr,
               HAS_ZEROS: tl.constexpr, ZERO_PLUS_ONE: tl.constexpr, KW: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One step's GPTQ tile: the code words `[KW, BLOCK_N]` of word rows `row`, their group
    scales (fp32) and -(zero point * scale), so (code - z) * s is one FFMA per code. Masked,
    not clamped, along N: the columns stay provably contiguous (16-byte copies)."""
    P: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    w = tl.load(words + row.to(tl.int64)[:, None] * N + rn[None, :], mask=nmask[None, :], other=0)
    grp = (row * P) // group_size
    s = tl.load(scales + grp[:, None] * N + rn[None, :], mask=nmask[None, :],
                other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zw = tl.load(z_ptr + grp[:, None] * (N // P) + (rn_c // P)[None, :])
        z = ((zw >> ((rn_c % P) * BITS)[None, :]) & MASK).to(tl.float32)
        if ZERO_PLUS_ONE:
            z = z + 1.0
    else:
        z = tl.full((KW, BLOCK_N), 1 << (BITS - 1), tl.float32)
    return w, s, -(z * s)


@triton.jit
def gptq_gemv_kernel(x_ptr, w_ptr, z_ptr, perm_ptr, c_ptr, M, N, K, group_size,
                     tiles_per_split, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     ZERO_PLUS_ONE: tl.constexpr, HAS_PERM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    pdl_wait()
    # quant_gptq.gptq_matmul_kernel's layout and decode; the decoded plane stays fp32.
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)
    nmask = rn < N
    x0 = _row(x_ptr, pid_m, 0, BLOCK_M, M, K)
    x1 = _row(x_ptr, pid_m, 1, BLOCK_M, M, K)
    x2 = _row(x_ptr, pid_m, 2, BLOCK_M, M, K)
    x3 = _row(x_ptr, pid_m, 3, BLOCK_M, M, K)
    words = w_ptr.to(tl.pointer_type(tl.int32))
    scales = (w_ptr + (K * BITS // 8).to(tl.int64) * N).to(tl.pointer_type(tl.float16))
    r = tl.arange(0, KW)
    acc0 = tl.zeros((KW, BLOCK_N), tl.float32)
    acc1 = tl.zeros((KW, BLOCK_N), tl.float32)
    acc2 = tl.zeros((KW, BLOCK_N), tl.float32)
    acc3 = tl.zeros((KW, BLOCK_N), tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        row = k0 // P + r
        live = (row < K // P)[:, None]
        row = tl.minimum(row, K // P - 1)
        w, s, zs = gptq_words(words, scales, z_ptr, row, rn, rn_c, nmask, N, group_size, BITS,
                              HAS_ZEROS, ZERO_PLUS_ONE, KW, BLOCK_N)
        if HAS_PERM:
            for p in tl.static_range(P):
                wv = _gptq_plane(w, s, zs, BITS, p)
                kc = tl.load(perm_ptr + tl.minimum(k0 + r * P + p, K - 1))[:, None]
                acc0 += tl.load(x0 + kc, mask=live, other=0.0).to(tl.float32) * wv
                if BLOCK_M > 1:
                    acc1 += tl.load(x1 + kc, mask=live, other=0.0).to(tl.float32) * wv
                if BLOCK_M > 2:
                    acc2 += tl.load(x2 + kc, mask=live, other=0.0).to(tl.float32) * wv
                    acc3 += tl.load(x3 + kc, mask=live, other=0.0).to(tl.float32) * wv
        else:
            # Planes p, p + 1 multiply X columns 2j, 2j + 1 (j = (k0 + r P + p) / 2): one word.
            for p in tl.static_range(0, P, 2):
                w0 = _gptq_plane(w, s, zs, BITS, p)
                w1 = _gptq_plane(w, s, zs, BITS, p + 1)
                kw = ((k0 + r * P + p) >> 1)[:, None]
                acc0 = _fma_pair(acc0, x0, kw, live, w0, w1)
                if BLOCK_M > 1:
                    acc1 = _fma_pair(acc1, x1, kw, live, w0, w1)
                if BLOCK_M > 2:
                    acc2 = _fma_pair(acc2, x2, kw, live, w0, w1)
                    acc3 = _fma_pair(acc3, x3, kw, live, w0, w1)
    _store_row(c_ptr, acc0, pid_m, pid_k, 0, BLOCK_M, M, N, rn, 2, SPLIT_K)
    if BLOCK_M > 1:
        _store_row(c_ptr, acc1, pid_m, pid_k, 1, BLOCK_M, M, N, rn, 2, SPLIT_K)
    if BLOCK_M > 2:
        _store_row(c_ptr, acc2, pid_m, pid_k, 2, BLOCK_M, M, N, rn, 2, SPLIT_K)
        _store_row(c_ptr, acc3, pid_m, pid_k, 3, BLOCK_M, M, N, rn, 2, SPLIT_K)
