"""The prefill kernel of round 1 (issue 10, first pass), kept verbatim for the sweep only: the
timed, hardware-checked reference of the shipped kernel (lowering/triton_gpu/kernels/
flash_attention.py), which ports this loop (its epilogue recomputes the output rows instead of
keeping them across the loops: fewer spills at 128 registers).

Two loops per program (mask-free blocks, then the edge blocks), the page lookup pipelined by
Triton, P V issued after the softmax (no overlap); grid (query blocks, NH, batch) with the
longest query block first within each (head, sequence). Imported by tools/gpu_sweeps/attention.py
(files starting with "_" are not sweeps themselves).
"""
import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.paged import (full_key_range, key_range, mask_allows,
                                                       page_block_row, slot_offsets)


@triton.jit
def _kv_tile_r1(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx, num_layers,
             KV: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
             BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """K (KV=0) or V (KV=1) rows n0..n0+BLOCK_N-1 of KV head kvh; rows at or past `end` read as
    zero when MASKED (slots past the cached length may hold anything, NaN included)."""
    r = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    valid = (n0 + r) < end
    if PAGE_SIZE % BLOCK_N == 0:
        row = page_block_row(lut_ptr, b, n0, max_pages, layer_idx, num_layers, KV, PAGE_SIZE)
        if USE_TMA:
            t = desc.load([row.to(tl.int32), kvh * D])
            if MASKED and KV == 1:
                # K needs no zeroing: the softmax masks those scores before any use.
                t = tl.where(valid[:, None], t, 0.0)
        else:
            ptrs = blocks_ptr + (row * (NKV * D) + kvh * D) + r[:, None] * (NKV * D) + d[None, :]
            if MASKED:
                t = tl.load(ptrs, mask=valid[:, None], other=0.0)
            else:
                t = tl.load(ptrs)
    else:
        base = slot_offsets(lut_ptr, b, n0 + r, max_pages, layer_idx, num_layers, valid, KV,
                            PAGE_SIZE, NKV, D) + kvh * D
        ptrs = blocks_ptr + base[:, None] + d[None, :]
        if MASKED:
            t = tl.load(ptrs, mask=valid[:, None], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _softmax_step_r1(acc, l_i, m_i, q, k, v, qp, n0, end, window, qk_scale, MASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the online softmax (running max m_i in log2 units)."""
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        kp = n0 + tl.arange(0, BLOCK_N)
        ok = mask_allows(qp, kp, window, MASK) & (kp < end)[None, :]
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def round1_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_TMA: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start = tl.load(offs_ptr + b)
    seq_len = tl.load(offs_ptr + b + 1) - seq_start
    if pid_m * BLOCK_M < seq_len:
        cache_len = tl.load(cache_len_ptr + b)
        kv_len = cache_len + seq_len
        kvh = h // (NH // NKV)
        i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = i < seq_len
        qp = cache_len + i
        d = tl.arange(0, D)
        rows = (seq_start + i).to(tl.int64) * (NH * D) + h * D
        q = tl.load(q_ptr + rows[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
        q_lo = cache_len + pid_m * BLOCK_M
        q_hi = tl.minimum(kv_len, q_lo + BLOCK_M) - 1
        start, end = key_range(q_lo, q_hi, kv_len, window, MASK)
        start = (start // BLOCK_N) * BLOCK_N
        lo, hi = full_key_range(q_lo, q_hi, kv_len, window, MASK)
        full_lo = tl.maximum(tl.cdiv(lo, BLOCK_N) * BLOCK_N, start)
        full_hi = (hi // BLOCK_N) * BLOCK_N
        none_full = full_hi <= full_lo
        full_lo = tl.where(none_full, start, full_lo)
        full_hi = tl.where(none_full, start, full_hi)
        if (PAGE_SIZE % BLOCK_N == 0) and USE_TMA:
            desc = tl.make_tensor_descriptor(
                blocks_ptr, shape=[num_pages * (2 * PAGE_SIZE) * num_layers, NKV * D],
                strides=[NKV * D, 1], block_shape=[BLOCK_N, D])
        else:
            desc = blocks_ptr
        qk_scale = scale * 1.4426950408889634
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for n0 in range(full_lo, full_hi, BLOCK_N):
            n0 = tl.multiple_of(n0, BLOCK_N)
            k = _kv_tile_r1(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, 0, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, False)
            v = _kv_tile_r1(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, 1, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, False)
            acc, l_i, m_i = _softmax_step_r1(acc, l_i, m_i, q, k, v, qp, n0, end, window, qk_scale,
                                          MASK, BLOCK_N, False)
        # Edge blocks: those before the shared range (window edge) and after it (diagonal,
        # partial last block), walked as one loop so their code is emitted once.
        n_head = (full_lo - start) // BLOCK_N
        n_edge = n_head + tl.cdiv(end - full_hi, BLOCK_N)
        for j in range(0, n_edge):
            n0 = tl.where(j < n_head, start + j * BLOCK_N, full_hi + (j - n_head) * BLOCK_N)
            n0 = tl.multiple_of(n0, BLOCK_N)
            k = _kv_tile_r1(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, 0, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, True)
            v = _kv_tile_r1(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, 1, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, True)
            acc, l_i, m_i = _softmax_step_r1(acc, l_i, m_i, q, k, v, qp, n0, end, window, qk_scale,
                                          MASK, BLOCK_N, True)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None])
