"""One decode token's qkv projection with rope_split_store in its epilogue.

At one new token the qkv projection is a GEMV (matmul_skinny.gemv_kernel) and rope_split_store
a second kernel that reads its output back, waits for it (a PDL boundary) and walks a chain of
dependent metadata loads: ~2 us of a ~45 us B1 step. Here each program computes PAIRS rope
pairs of one head (rows r and r + D/2 for the half-split pairing, 2 i and 2 i + 1 when
interleaved), so the rotation, the q store and the paged k/v stores happen in the GEMV's
epilogue, and the metadata loads (the token's sequence, its position, the rope row, the cache
slot) go out before the weight loop, under the stream. The products are rotated in fp32
before rounding (the two-kernel path rounds them to qkv's dtype first).

Heads are [q | k | v] as in rope_split_store; v rows are stored unrotated. One program per
PAIRS pairs: ((NH + 2 NKV) D / 2) / PAIRS programs, PAIRS dividing D / 2 so a program stays in
one head. Positions and page ids are clamped as rope_split_store clamps them (bad metadata
stays inside the buffers). The lowering (lowerings/qkv_rope.py) uses it for one-row steps
where the tuned qkv GEMV has two rows a program per pair.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .matmul_skinny import gemv_rows
from .paged import find_sequence, page_slot, slot_offsets
from .pdl import pdl_wait
from .spec import KernelSpec, cdiv, triton_dtype

META = 1  # where the metadata loads go (see the kernel); tools/gpu_sweeps/qkv_rope_ab.py


@triton.jit
def gemv_rope_store_kernel(
        x_ptr, w_ptr, bias_ptr, offs_ptr, cache_len_ptr, lut_ptr, freqs_ptr, blocks_ptr,
        q_out_ptr, K, batch, max_pages, layer_idx, num_layers, num_pages, rope_rows,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr,
        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
        META: tl.constexpr = 1):
    pdl_wait()
    HALF: tl.constexpr = D // 2
    p0 = tl.program_id(0) * PAIRS
    head = p0 // HALF
    j = p0 % HALF + tl.arange(0, PAIRS)          # the pairs' frequencies
    if INTERLEAVED:
        r0 = head * D + 2 * j
        r1 = r0 + 1
    else:
        r0 = head * D + j
        r1 = r0 + HALF
    rows = tl.reshape(tl.join(r0, r1), (2 * PAIRS,)).to(tl.int64)
    # META: where the token's metadata loads go relative to the weight loop. 0: after it;
    # 1: the sequence's length and start before it (in flight under the stream, waited for
    # after it), the rope row and the page id after; 2: all before it; 3: the lengths before
    # it, the rope row and the page id in its second step (the lengths are there by then),
    # so that nothing is left to wait for after it.
    t = tl.zeros((1,), tl.int32)
    if META == 3:
        out, cos, sin, page, spos = _loop_with_meta(
            x_ptr, w_ptr, rows, K, offs_ptr, cache_len_ptr, lut_ptr, freqs_ptr, t, j, batch,
            max_pages, num_pages, rope_rows, D, PAGE_SIZE, PAIRS, BLOCK_K, EVEN_K)
    if META >= 1 and META <= 2:
        b = find_sequence(offs_ptr, t, batch)
        clen = tl.load(cache_len_ptr + b)
        start = tl.load(offs_ptr + b)
    if META == 2:
        pos = clen - start
        fpos = tl.minimum(tl.maximum(pos, 0), rope_rows - 1).to(tl.int64)
        cos = tl.load(freqs_ptr + fpos * D + 2 * j).to(tl.float32)
        sin = tl.load(freqs_ptr + fpos * D + 2 * j + 1).to(tl.float32)
    if META <= 2:
        out = gemv_rows(x_ptr, w_ptr, rows, K, 0, K, 2 * PAIRS, BLOCK_K, EVEN_K, PREFETCH)
    if META == 0:
        b = find_sequence(offs_ptr, t, batch)
        clen = tl.load(cache_len_ptr + b)
        start = tl.load(offs_ptr + b)
    if META <= 1:
        pos = clen - start
        fpos = tl.minimum(tl.maximum(pos, 0), rope_rows - 1).to(tl.int64)
        cos = tl.load(freqs_ptr + fpos * D + 2 * j).to(tl.float32)
        sin = tl.load(freqs_ptr + fpos * D + 2 * j + 1).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    a, bb = tl.split(tl.reshape(out, (PAIRS, 2)))
    col0 = r0 - head * D                        # the pairs' columns within their head
    col1 = r1 - head * D
    # (each branch names its own values: Triton merges same-named ones of both sides)
    if head < NH:
        tl.store(q_out_ptr + r0, (a * cos - bb * sin).to(q_out_ptr.dtype.element_ty))
        tl.store(q_out_ptr + r1, (a * sin + bb * cos).to(q_out_ptr.dtype.element_ty))
    elif head < NH + NKV:
        if META == 3:
            kb = page_slot(page, spos, layer_idx, num_layers, 0, PAGE_SIZE, NKV, D)
        else:
            kb = slot_offsets(lut_ptr, b, pos, max_pages, layer_idx, num_layers, t == 0, 0,
                              PAGE_SIZE, NKV, D, num_pages)
        kb += (head - NH) * D
        tl.store(blocks_ptr + kb + col0, (a * cos - bb * sin).to(blocks_ptr.dtype.element_ty))
        tl.store(blocks_ptr + kb + col1, (a * sin + bb * cos).to(blocks_ptr.dtype.element_ty))
    else:
        if META == 3:
            vb = page_slot(page, spos, layer_idx, num_layers, 1, PAGE_SIZE, NKV, D)
        else:
            vb = slot_offsets(lut_ptr, b, pos, max_pages, layer_idx, num_layers, t == 0, 1,
                              PAGE_SIZE, NKV, D, num_pages)
        vb += (head - NH - NKV) * D
        tl.store(blocks_ptr + vb + col0, a.to(blocks_ptr.dtype.element_ty))
        tl.store(blocks_ptr + vb + col1, bb.to(blocks_ptr.dtype.element_ty))


@triton.jit
def _loop_with_meta(x_ptr, w_ptr, rows, K, offs_ptr, cache_len_ptr, lut_ptr, freqs_ptr, t, j,
                    batch, max_pages, num_pages, rope_rows, D: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr):
    """gemv_rows over all of K (no prefetch) that also reads the token's metadata: the
    sequence's length and start before the loop, the rope row (cos, sin) and the page id in
    its second step. Returns (products, cos, sin, page id checked as slot_offsets checks it,
    position clamped into the lookup-table row)."""
    b = find_sequence(offs_ptr, t, batch)
    clen = tl.load(cache_len_ptr + b)
    start = tl.load(offs_ptr + b)
    cos = tl.zeros((PAIRS,), tl.float32)
    sin = tl.zeros((PAIRS,), tl.float32)
    page = tl.zeros((1,), tl.int32)
    spos = tl.zeros((1,), tl.int32)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((2 * PAIRS, BLOCK_K), tl.float32)
    n = tl.cdiv(K, BLOCK_K)
    at = tl.minimum(n - 1, 1)
    for it in range(0, n):
        k0 = it * BLOCK_K
        if EVEN_K:
            x = tl.load(x_ptr + k0 + rk)
            w = tl.load(w_ptr + rows[:, None] * K + (k0 + rk)[None, :],
                        eviction_policy="evict_first")
        else:
            km = (k0 + rk) < K
            x = tl.load(x_ptr + k0 + rk, mask=km, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * K + (k0 + rk)[None, :], mask=km[None, :],
                        other=0.0, eviction_policy="evict_first")
        if it == at:
            pos = clen - start
            fpos = tl.minimum(tl.maximum(pos, 0), rope_rows - 1).to(tl.int64)
            cos = tl.load(freqs_ptr + fpos * D + 2 * j).to(tl.float32)
            sin = tl.load(freqs_ptr + fpos * D + 2 * j + 1).to(tl.float32)
            spos = tl.minimum(tl.maximum(pos, 0), max_pages * PAGE_SIZE - 1)
            pg = tl.load(lut_ptr + tl.cast(b, tl.int64) * max_pages + spos // PAGE_SIZE)
            page = tl.where(pg.to(tl.uint32) < num_pages.to(tl.uint32), pg, 0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1), cos, sin, page, spos


def pairs_ok(pairs: int, head_dim: int) -> bool:
    """Whether programs of `pairs` pairs stay within one head."""
    return pairs >= 1 and pairs & (pairs - 1) == 0 and (head_dim // 2) % pairs == 0


def spec(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int, dtype: str,
         freqs_dtype: str, interleaved: bool, has_bias: bool, K: int, pairs: int,
         block_k: int, num_warps: int, prefetch: bool, meta: int | None = None) -> KernelSpec:
    """The kernel for one layer shape and GEMV tile (BLOCK_K, warps, prefetch of the tuned
    qkv GEMV; 2 x pairs rows a program)."""
    if not pairs_ok(pairs, head_dim):
        raise ValueError(f"gemv_rope_store: {pairs} pairs a program do not divide head_dim / 2 "
                         f"= {head_dim // 2}")
    t, tf = triton_dtype(dtype), triton_dtype(freqs_dtype)
    meta = META if meta is None else meta
    sig = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "offs_ptr": "*i32",
           "cache_len_ptr": "*i32", "lut_ptr": "*i32", "freqs_ptr": f"*{tf}",
           "blocks_ptr": f"*{t}", "q_out_ptr": f"*{t}", "K": "i32", "batch": "i32",
           "max_pages": "i32", "layer_idx": "i32", "num_layers": "i32", "num_pages": "i32",
           "rope_rows": "i32"}
    ce = {"NH": n_heads, "NKV": n_kv_heads, "D": head_dim, "PAGE_SIZE": page_size,
          "INTERLEAVED": interleaved, "HAS_BIAS": has_bias, "PAIRS": pairs,
          "BLOCK_K": block_k, "EVEN_K": K % block_k == 0, "PREFETCH": prefetch, "META": meta}
    sig.update({k: "constexpr" for k in ce})
    programs = cdiv((n_heads + 2 * n_kv_heads) * head_dim // 2, pairs)
    tag = f"k{block_k}w{num_warps}p{pairs}m{meta}" + ("_pf" if prefetch else "") \
        + ("_bias" if has_bias else "")
    return KernelSpec(
        name=f"gemv_rope_store_{t}_{tag}", fn=gemv_rope_store_kernel, signature=sig,
        constexprs=ce, num_warps=num_warps, num_stages=1,
        grid=lambda: (programs, 1, 1), grid_args=(),
        divisible_by_16=("x_ptr", "w_ptr", "freqs_ptr", "blocks_ptr", "q_out_ptr"),
        notes="one token (M = 1); layer_idx < num_layers")
