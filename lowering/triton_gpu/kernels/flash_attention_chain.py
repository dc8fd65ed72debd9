"""Chained tiles for the persistent warp-specialized prefill consumers (CHAIN configs).

The persistent consumers (flash_attention_persistent.py) run each tile's key loop on its own
(flash_attention_wgmma._ws_attend): a tile starts with S_0 = Q K_0^T issued and waited for
alone, then block 0's softmax with no product in flight, and ends with the last P V waited
for alone before the output is stored. Those are the pipeline's fill and drain, paid once a
tile: under a causal mask at head dim 64 the kernel's rate falls to 0.87 of its unmasked rate
(BENCHMARKS.md, 2026-12-05), and a sliding window's tiles (few key blocks each) run at 0.76-0.79
of SDPA's causal rate. Here a consumer runs each tile's key loop as before, but the step from
one tile to the next overlaps them: the next tile's block 0 is scored while the current tile's
last P V is in flight:

    issue S_0' = Q' K_0'^T       (the next tile's query rows and first key block)
    issue O += P_last V_last     (the current tile's last block)
    wait for S_0'; block 0's softmax from a fresh row max and sum
    wait for the P V; store the finished tile's rows; O starts from zero

The query rows come by the loader warp's TMA (QTMA, two slots: the next tile's are there when
the step comes), so the step costs the consumer no global load; its facts come with it
through the DYN ring, or by the consumers' own loads with the grid's stride. The finished tile's
facts (rows, head, cached length) ride along until its store. Only the first tile of a program
(no product before it) and its last (nothing after it) keep a fill and a drain.

Each tile's key loop is the other consumers' own (_ws_blocks): a first form that ran all the
tiles' blocks as one flattened loop was right on an H100 but 0-6% slower than DYN + QTMA (the
per-block branch and state cost more than the fill and drain; BENCHMARKS.md, 2026-12-05). This
form, measured on an H100 (BENCHMARKS.md, 2026-12-05, runs 13-14), is 2-4% faster than DYN +
QTMA at head dim 64 under the causal mask (a tuner candidate there) and 6-9% slower at head dim
128 on short tiles and the window (CHAIN_CONFIGS: the sweep's only).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)

from graphir.lowering.triton_gpu.kernels.flash_attention_epilogue import (_ws_store,
                                                                        _ws_store_tma)
from graphir.lowering.triton_gpu.kernels.flash_attention_tiles import (
    _take_tile, _tile, _tile_facts)
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
    _softmax, _ws_block0, _ws_blocks, _ws_fix_v_tail, _ws_last_pv, _ws_release,
    warpgroup_acc_layout, warpgroup_p_layout)


@gluon.jit
def _next_live(t, n, offs_ptr, cache_len_ptr, tile_ids, tile_ready, tile_empty, n_m, T, total,
               max_pages, window, NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
               PAGE_SIZE: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr, DYN: gl.constexpr):
    """The consumer's next tile with key blocks, after tile t (DYN: after its n-th take from
    the loader's ring): (t, n, row0, row_count, h, kv_len, q_lo, start, end, full_lo, full_hi,
    n_blocks), row0 the tile's first row in q / out and row_count the sequence's rows from there
    on (what its store needs: fewer values live between tiles); n_blocks is 0 when there is none
    (t out of range)."""
    seq_start = 0
    seq_len = 0
    cache_len = 0
    pid_m = 0
    h = 0
    b = 0
    kv_len = 0
    q_lo = 0
    start = 0
    end = 0
    full_lo = 0
    full_hi = 0
    n_blocks = 0
    going = True
    while going:
        if DYN:
            t, pid_m, h, seq_start, seq_len, cache_len = _take_tile(tile_ids, tile_ready,
                                                                    tile_empty, n)
            n += 1
        else:
            t += gl.num_programs(0)
        valid = (t >= 0) & (t < total)  # (t < 0: past 2**31, the end)
        if not DYN:
            if valid:  # (the facts of a tile past the end would be read out of bounds)
                pid_m, h, b, seq_start, seq_len, cache_len = _tile_facts(
                    offs_ptr, cache_len_ptr, t, n_m, T, NH, NKV, D, BLOCK_M)
        pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _tile(
            pid_m, h, b, seq_len, cache_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M,
            BLOCK_N)
        n_blocks = gl.where(valid, n_blocks, 0)
        going = valid & (n_blocks == 0)
    return (t, n, seq_start + pid_m * BLOCK_M, seq_len - pid_m * BLOCK_M, h, kv_len, q_lo,
            start, end, full_lo, full_hi, n_blocks)


@gluon.jit
def _advance(t, n, nq, q_ready, q_empty, offs_ptr, cache_len_ptr, tile_ids, tile_ready,
             tile_empty, n_m, T, total, max_pages, window, NH: gl.constexpr, NKV: gl.constexpr,
             D: gl.constexpr, PAGE_SIZE: gl.constexpr, MASK: gl.constexpr,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, DYN: gl.constexpr):
    """Past the last block of the tile whose query rows are the nq-th load (every product that
    read them is done: its output leaves through the slot, which then goes back to the
    loader): the next live tile as _next_live gives it, with nq counting it, once its query
    rows have landed."""
    (t, n, row0, row_count, h, kv_len, q_lo, start, end, full_lo, full_hi,
     n_blocks) = _next_live(t, n, offs_ptr, cache_len_ptr, tile_ids, tile_ready, tile_empty,
                            n_m, T, total, max_pages, window, NH, NKV, D, PAGE_SIZE, MASK,
                            BLOCK_M, BLOCK_N, DYN)
    nq += 1
    if n_blocks > 0:
        mbarrier.wait(q_ready.index(nq % 2), (nq // 2) & 1)
    return (t, n, nq, row0, row_count, h, kv_len, q_lo, start, end, full_lo, full_hi,
            n_blocks)


@gluon.jit
def _wsc_store(out_ptr, odesc, q_smem, q_empty, slot, o, l_i, row0, rows, h, WG: gl.constexpr,
               NH: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr):
    """A finished tile's output rows (its first row row0, `rows` of its sequence from there)
    out through this warpgroup's half of its query slot when they all lie in the sequence
    (_ws_store_tma), then the slot back to the loader once the copy has read them (the next
    tile's rows are in the other slot)."""
    ROWS: gl.constexpr = BLOCK_M // 2
    if (WG + 1) * ROWS <= rows:
        _ws_store_tma(odesc, q_smem.index(slot).slice(WG * ROWS, ROWS), o, l_i,
                      row0 + WG * ROWS, h, D)
        tma.store_wait(0)
    else:
        _ws_store(out_ptr, o, l_i, row0, rows, 0, h, WG, NH, D, BLOCK_M)
    _ws_release(q_empty, slot)


@gluon.jit
def _wsc_consumer(q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                  fixed, out_ptr, odesc, offs_ptr, cache_len_ptr, n_m, n_b, T, max_pages, window,
                  scale, tile_ids, tile_ready, tile_empty, WG: gl.constexpr, NH: gl.constexpr,
                  NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
                  MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, DYN: gl.constexpr):
    """One consumer warpgroup of the persistent kernel with its tiles chained (the module
    docstring): each tile's key loop is _ws_attend's (_ws_blocks), the step between two tiles
    scores the next tile's block 0 while the current tile's last P V runs. The loader is the
    persistent kernel's, with QTMA: the live tiles' query rows in slots 0, 1, 0, ... in the
    order the tiles come."""
    ROWS: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = warpgroup_acc_layout(BLOCK_N)
    o_layout: gl.constexpr = warpgroup_acc_layout(D)
    p_layout: gl.constexpr = warpgroup_p_layout(D)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    total = n_m * NH * n_b
    qk_scale = scale * 1.4426950408889634
    s0 = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    rows = WG * ROWS + gl.arange(0, ROWS, layout=row_s)
    fresh_m = gl.full([ROWS], -1.0e30, gl.float32, layout=row_s)
    fresh_l = gl.zeros([ROWS], gl.float32, layout=row_s)

    t0 = gl.program_id(0) - gl.num_programs(0)  # (the stride's "tile before the first")
    (t, n, row0, row_count, h, kv_len, q_lo, start, end, full_lo, full_hi,
     n_blocks) = _next_live(t0, gl.to_tensor(0), offs_ptr, cache_len_ptr, tile_ids, tile_ready,
                            tile_empty, n_m, T, total, max_pages, window, NH, NKV, D, PAGE_SIZE,
                            MASK, BLOCK_M, BLOCK_N, DYN)
    if n_blocks > 0:
        # Fill: block 0 of the program's first tile, no product before it.
        nq = 0
        nfix = 0
        it = 0  # the global ring index of the tile's block 0
        mbarrier.wait(q_ready.index(0), 0)
        p, m_i, l_i = _ws_block0(q_smem.index(0).slice(WG * ROWS, ROWS), k_ring, k_ready,
                                 k_empty, 0, s0, fresh_m, fresh_l, q_lo + rows, qk_scale, start,
                                 end, full_lo, full_hi, window, D, MASK, BLOCK_N, STAGES)
        o = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
        while n_blocks > 0:
            q = q_smem.index(nq % 2).slice(WG * ROWS, ROWS)
            p, o, m_i, l_i = _ws_blocks(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                                        fixed, it, p, o, m_i, l_i, q_lo + rows, qk_scale, s0,
                                        start, end, full_lo, full_hi, n_blocks, window, WG,
                                        MASK, BLOCK_N, STAGES, 0)
            # This tile's last block: its P V is still to come; its facts for the store.
            last = (it + n_blocks - 1) % STAGES
            last_phase = ((it + n_blocks - 1) // STAGES) & 1
            tail = start + n_blocks * BLOCK_N > kv_len
            last_n0 = start + (n_blocks - 1) * BLOCK_N
            o_kv_len = kv_len
            o_row0 = row0
            o_rows = row_count
            o_h = h
            o_slot = nq % 2
            it += n_blocks
            (t, n, nq, row0, row_count, h, kv_len, q_lo, start, end, full_lo,
             full_hi, n_blocks) = _advance(t, n, nq, q_ready, q_empty, offs_ptr, cache_len_ptr,
                                           tile_ids, tile_ready, tile_empty, n_m, T, total,
                                           max_pages, window, NH, NKV, D, PAGE_SIZE, MASK,
                                           BLOCK_M, BLOCK_N, DYN)
            if n_blocks > 0:
                # The next tile's S_0 first, then the last P V of this one; the next tile's
                # block-0 softmax runs while that product does.
                slot = it % STAGES
                mbarrier.wait(k_ready.index(slot), (it // STAGES) & 1)
                s = warpgroup_mma(q_smem.index(nq % 2).slice(WG * ROWS, ROWS),
                                  k_ring.index(slot).permute((1, 0)), s0, use_acc=False,
                                  is_async=True)
                mbarrier.wait(v_ready.index(last), last_phase)
                if tail:  # (only a tile's last block can hold V rows past its cached length)
                    _ws_fix_v_tail(v_ring, last, fixed, nfix & 1, last_n0, o_kv_len, WG,
                                   BLOCK_N, D)
                    nfix += 1
                o = warpgroup_mma(p, v_ring.index(last), o, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s])
                masked = (start < full_lo) | (start + BLOCK_N > full_hi)
                p_next, alpha, m_next, l_next = _softmax(s, fresh_m, fresh_l, q_lo + rows,
                                                         start, end, window, qk_scale, masked,
                                                         s_layout, MASK, BLOCK_N)
                # The next P goes through the wait, as in _ws_blocks: with both P's that
                # enter the next tile's key loop (the fill's and this one) plain casts, P
                # crossed the loop as 64 fp32 values and every key block swapped its bf16
                # halves back (64 PRMT a block, 1-12% slower on an H200).
                # (The old P is listed to stay live until its product is done.)
                o, _, p = warpgroup_mma_wait(
                    0, deps=[o, p, gl.convert_layout(p_next.to(dtype), p_layout)])
                _ws_release(k_empty, slot)
                mbarrier.arrive(v_empty.index(last))
                _wsc_store(out_ptr, odesc, q_smem, q_empty, o_slot, o, l_i, o_row0, o_rows, o_h,
                           WG, NH, D, BLOCK_M)
                # (A fresh O, not O * 0: O may hold NaN or inf.)
                o = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
                m_i = m_next
                l_i = l_next
            else:
                # Drain: no tile after this one.
                o = _ws_last_pv(p, o, v_ring, v_ready, v_empty, fixed, it - 1, nfix & 1,
                                last_n0, o_kv_len, WG, D, BLOCK_N, STAGES, 1)
                _wsc_store(out_ptr, odesc, q_smem, q_empty, o_slot, o, l_i, o_row0, o_rows, o_h,
                           WG, NH, D, BLOCK_M)
