"""Skinny-M matmul pieces: a GEMV-style kernel (no tensor cores) and the split-K reduce.

For a handful of rows the matmul is a stream over the weight (50 MB for 6144x4096 bf16: ~12 us at
4.3 TB/s), and what matters is keeping enough bytes in flight on every SM, not the math. The GEMV
kernel gives each program one row of A and BLOCK_N rows of B; it accumulates the elementwise
products in a [BLOCK_N, BLOCK_K] fp32 register tile and reduces across K once at the end, so the
loop body is loads and FMAs only (PREFETCH: the next block's loads issued before this block's
FMAs). Row programs of one N tile are adjacent in launch order (rows
are grid axis 0), so a few rows share each weight tile through L2.

LATE_WAIT (one row, no split: the B1 decode step's qkv projection, whose x is a graph input
and whose weight and bias are loaded, so no kernel ahead of it writes what it reads) waits for
its predecessor only before its store. Launched early behind the step's metadata upload, it
streams its weight while the upload runs (the runtime allows that launch only where the
buffers passed are such: runtime/cuda/call_plan.py); the offline compiler checks in the PTX
that everything before the wait is a load of A, B or the bias (`pdl_early_reads`).

SPLIT_K > 1 (grid axis 2) writes fp32 partials `[SPLIT_K, M, N]` to `c_ptr`, which
`splitk_reduce_kernel` sums (adding the bias and casting) into C; the same reduce serves the
tiled kernel's split-K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.matmul import k_range
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


@triton.jit
def gemv_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, LATE_WAIT: tl.constexpr = False):
    if not LATE_WAIT:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo, k_hi = k_range(K, pid_k, SPLIT_K, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    x_ptrs = a_ptr + row * K + k_lo + rk
    w_ptrs = b_ptr + rn_c[:, None] * K + (k_lo + rk)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # The weight streams through once: its loads are evict-first, so it does not push A out of
    # L2.
    if PREFETCH and EVEN_K:
        # Register double-buffering: the next block's loads go out before this block's FMAs,
        # so a warp keeps two blocks of the weight in flight rather than one (a split of an
        # EVEN_K launch holds at least one whole block).
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs)
        for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            w_next = tl.load(w_ptrs, eviction_policy="evict_first")
            x_next = tl.load(x_ptrs)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w = w_next
            x = x_next
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                kmask = (k0 + rk) < k_hi
                x = tl.load(x_ptrs, mask=kmask, other=0.0)
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1)
    if HAS_BIAS and SPLIT_K == 1:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    dst = row
    if SPLIT_K > 1:
        dst += pid_k.to(tl.int64) * M
    if LATE_WAIT:
        pdl_wait()
    tl.store(c_ptr + dst * N + rn, out.to(c_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, c_ptr, M, N, HAS_BIAS: tl.constexpr,
                         SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    pdl_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = M.to(tl.int64) * N
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
