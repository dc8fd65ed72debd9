"""Persistent form of the warp-specialized Gluon prefill kernel (flash_attention_wgmma.py).

One program per SM walks the query tiles in the longest-first order (paged.lpt_tile), striding
by the grid: tile t = program, program + grid, ... The loader warp runs ahead into the next
tile while the consumer warpgroups finish the current one, so a tile's first K/V loads, its
query load and its page lookups overlap the previous tile's last products and output stores,
and the TMA descriptor, the shared memory and the mbarriers are set up once per SM instead of
once per tile. What it is for: short or causal prefill (B4 x 2048 causal ran 0.82x SDPA with
one program per tile, where the per-program setup and the tail of each program are a larger
share of the work; FlashAttention-3 takes its tiles the same way).

Ring bookkeeping across tiles: the loader and both consumers count key blocks from the
program's first tile on (`it`), so slot and parity are those of the global block index; each
works out every tile's key-block range with the same pure function (`_tile`), so they agree.
Every K and V slot a block fills is released once (the last block's V too, unlike the one-tile
kernel, which may leave it). The V-tail fix waits in the parity of the fixes done so far.

Tiles handed out at run time (a DYN config, `..persistdyn`): striding by the grid gives each
program a fixed share, and under a causal mask the shares differ, since the longest-first order
falls in a sawtooth (one descent per sequence and head group): program 0 takes the longest tile
of every round. Counted in key blocks, the busiest program then does 3% more than the mean at
B4 x 4096 and B1 x 16384 (132 programs) and 15% more at B4 x 2048 (the prefill there ran at
0.86-0.91x SDPA against 0.99-1.05x at 4096; BENCHMARKS.md, run 9). With DYN each program takes
its first tile by its number and every later one from a counter in global memory (one atomic
add by the loader warp as it starts the current tile's loads, under which its latency hides;
handed to the consumers through a small ring of shared-memory slots with the tile's facts, its
sequence's rows and cached length, so the consumers read no metadata), so the longest-first
order is served greedily: in the same count the busiest program is within 0.4-1.6% of the mean
at these shapes (`python -m graphir.tools.tile_balance`); measured on an H100, B4 x 2048 causal
+6%, the sliding window +3-7%, head dim 64 causal +2-5% (BENCHMARKS.md, 2026-12-05). The
counter (two int32: tiles handed out, programs done) must be zero at launch; the last program
out sets it back to zero, so one zeroed buffer serves every launch in stream order (the plan's
zeroed scratch, `zeroed_counter` on the torch path).

The step between two tiles (tools/gpu_sweeps/prefill_timeline.py stamps it): a consumer
warpgroup writes its finished rows into the shared memory of its query rows (free once its
last S is done) and one TMA store takes them out (_ws_store_tma; rows that run past the
sequence take the masked stores); with QTMA the slot goes back to the loader at the next
tile's start, without it the warpgroup waits for the copy before it writes its next rows
there. With QTMA the loader also posts each tile, its query tile and head with it, as soon as
the tile before has its first two key blocks issued. On an H100 that cut the step from ~1.9 to
~1.1 key-block times a tile at B4 x 2048 causal and made DYN + QTMA 1.04-1.07x faster; the
forms without QTMA 1.02-1.05x on an H200 (BENCHMARKS.md, 2026-12-05, fourteenth session).

A tuner config (`..persist`, flash_attention_configs.py): flash_attention.aot_specs turns a
one-tile spec into this form (`as_persistent`): the one-tile kernel's arguments plus n_m (query
tiles of the longest sequence) and n_b (sequences), a 1-D grid of min(tiles, NUM_SMS) programs
(the plan writes that grid and those two arguments: lowerings/attention.py). Gluon has no
interpreter: Triton's runs the persistent Triton kernel below in its place (same arguments,
grid and tile order); the Gluon kernel is compiled offline for sm_90 in CI
(tests/lowering/triton_gpu/test_flash_attention_aot.py) and checked on the GPU by
tests/gpu/test_flash_wgmma_gpu.py.
"""

from __future__ import annotations

from dataclasses import replace

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from graphir.lowering.triton_gpu.kernels.flash_attention import flash_prefill_kernel, prefill_tile
from graphir.lowering.triton_gpu.kernels.flash_attention_deep import _ws_attend_deep
from graphir.lowering.triton_gpu.kernels.flash_attention_chain import _wsc_consumer
from graphir.lowering.triton_gpu.kernels.flash_attention_configs import PERSISTENT_FLAGS
from graphir.lowering.triton_gpu.kernels.flash_attention_epilogue import _ws_store, _ws_store_tma
from graphir.lowering.triton_gpu.kernels.flash_attention_tiles import (
    FACTS, TILE_SLOTS, _post_tile, _take_tile, _tile, _tile_facts)
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
    LOADER_REGS, _kv_descriptor, _ws_attend, _ws_load_tile, _ws_release, _ws_rings,
    flash_prefill_ws_kernel)
from graphir.lowering.triton_gpu.kernels.paged import L2_GROUP_BYTES, lpt_tile
from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, KernelSpec, cdiv
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


@gluon.jit
def _wsp_loader(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, offs_ptr,
                cache_len_ptr, lut_ptr, n_m, n_b, T, max_pages, window, layer_idx, num_layers,
                num_pages, sched_ptr, tile_ids, tile_ready, tile_empty, qdesc, q_smem, q_ready,
                q_empty, NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
                PAGE_SIZE: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, DYN: gl.constexpr,
                QTMA: gl.constexpr):
    it = 0
    nq = 0
    total = n_m * NH * n_b
    if DYN:
        # With QTMA each tile is posted (and its query rows loaded) while the tile before it
        # still has key blocks to load: once that tile's first two blocks are issued (the
        # ones after wait for slots its consumers free a block at a time), so the consumers
        # find the next tile's facts and rows there when they finish (the step between
        # tiles 1.28 -> 1.14 key-block times at B4 x 2048; prefill_timeline.py).
        t = gl.program_id(0)
        pid_m, h, b, seq_start, seq_len, cache_len, nq = _wsp_post(
            offs_ptr, cache_len_ptr, t, 0, nq, n_m, T, max_pages, window, tile_ids, tile_ready,
            tile_empty, qdesc, q_smem, q_ready, q_empty, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M,
            BLOCK_N, QTMA)
        n = 0
        while (t >= 0) & (t < total):  # (t < 0: past 2**31, the end)
            nxt = next_tile(sched_ptr)  # its latency hides under the first blocks' loads
            pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _tile(
                pid_m, h, b, seq_len, cache_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M,
                BLOCK_N)
            kvh = h // (NH // NKV)
            if QTMA:
                head = gl.minimum(n_blocks, 2)
            else:
                # Posted after the tile's last block: posted earlier, the deep consumers at
                # head dim 64 reloaded a parked register in their key loop under a window.
                head = n_blocks
            _ws_load_tile(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b,
                          kvh, start, head, it, max_pages, layer_idx, num_layers, num_pages, D,
                          PAGE_SIZE, BLOCK_N, STAGES)
            n += 1
            if (nxt >= 0) & (nxt < total):
                nb, nh, nbq, seq_start, seq_len, cache_len, nq = _wsp_post(
                    offs_ptr, cache_len_ptr, nxt, n, nq, n_m, T, max_pages, window, tile_ids,
                    tile_ready, tile_empty, qdesc, q_smem, q_ready, q_empty, NH, NKV, D,
                    PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, QTMA)
            else:  # past the last: the end
                nb = pid_m
                nh = h
                nbq = b
                _post_tile(tile_ids, tile_ready, tile_empty, n, nxt, 0, 0, 0, 0, 0)
            _ws_load_tile(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b,
                          kvh, start + head * BLOCK_N, n_blocks - head, it + head, max_pages,
                          layer_idx, num_layers, num_pages, D, PAGE_SIZE, BLOCK_N, STAGES)
            it += n_blocks
            t = nxt
            pid_m = nb
            h = nh
            b = nbq
        schedule_done(sched_ptr)
    else:
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            pid_m, h, b, seq_start, seq_len, cache_len = _tile_facts(
                offs_ptr, cache_len_ptr, t, n_m, T, NH, NKV, D, BLOCK_M)
            it, nq = _wsp_load(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                               lut_ptr, pid_m, h, b, seq_start, seq_len, cache_len, it, nq, n_m,
                               max_pages, window, layer_idx, num_layers, num_pages, qdesc,
                               q_smem, q_ready, q_empty, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M,
                               BLOCK_N, STAGES, QTMA)


@gluon.jit
def _wsp_post(offs_ptr, cache_len_ptr, t, n, nq, n_m, T, max_pages, window, tile_ids,
              tile_ready, tile_empty, qdesc, q_smem, q_ready, q_empty, NH: gl.constexpr,
              NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr, MASK: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, QTMA: gl.constexpr):
    """DYN: tile t, the loader's n-th, handed to the consumers with its facts (they read no
    metadata), its query rows loaded (QTMA); (its _tile_facts, the next nq)."""
    pid_m, h, b, seq_start, seq_len, cache_len = _tile_facts(offs_ptr, cache_len_ptr, t, n_m, T,
                                                             NH, NKV, D, BLOCK_M)
    _post_tile(tile_ids, tile_ready, tile_empty, n, t, pid_m, h, seq_start, seq_len, cache_len)
    if QTMA:
        pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _tile(
            pid_m, h, b, seq_len, cache_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M,
            BLOCK_N)
        nq = _wsp_load_q(qdesc, q_smem, q_ready, q_empty, seq_start + pid_m * BLOCK_M, h, nq,
                         n_blocks, D, BLOCK_M)
    return pid_m, h, b, seq_start, seq_len, cache_len, nq


@gluon.jit
def _wsp_load_q(qdesc, q_smem, q_ready, q_empty, row0, h, nq, n_blocks, D: gl.constexpr,
                BLOCK_M: gl.constexpr):
    """QTMA: a tile's query rows from row0 (head h) into Q slot nq % 2 once both consumers have
    given it back, if the tile has key blocks; the next nq. Rows past the sequence are the next
    sequence's (or, past T, zeros): each row's scores, softmax and output are its own, and
    those rows are never stored."""
    if n_blocks > 0:
        slot = nq % 2
        mbarrier.wait(q_empty.index(slot), ((nq // 2) & 1) ^ 1)
        bar = q_ready.index(slot)
        mbarrier.expect(bar, BLOCK_M * D * qdesc.dtype.primitive_bitwidth // 8)
        tma.async_copy_global_to_shared(qdesc, [row0, h * D], bar, q_smem.index(slot))
        nq += 1
    return nq


@gluon.jit
def _wsp_load(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, pid_m, h, b,
              seq_start, seq_len, cache_len, it, nq, n_m, max_pages, window, layer_idx,
              num_layers, num_pages, qdesc, q_smem, q_ready, q_empty, NH: gl.constexpr,
              NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr, MASK: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              QTMA: gl.constexpr):
    """The loads of a tile (its _tile_facts given; QTMA: its query rows into Q slot nq % 2
    first), its key blocks from global ring index `it` on; the next (it, nq)."""
    pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _tile(
        pid_m, h, b, seq_len, cache_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
    if QTMA:
        nq = _wsp_load_q(qdesc, q_smem, q_ready, q_empty, seq_start + pid_m * BLOCK_M, h, nq,
                         n_blocks, D, BLOCK_M)
    _ws_load_tile(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b,
                  h // (NH // NKV), start, n_blocks, it, max_pages, layer_idx, num_layers,
                  num_pages, D, PAGE_SIZE, BLOCK_N, STAGES)
    return it + n_blocks, nq


@gluon.jit
def _wsp_consumer(q_ptr, q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty,
                  v_empty, fixed, out_ptr, odesc, offs_ptr, cache_len_ptr, n_m, n_b, T, max_pages,
                  window, scale, tile_ids, tile_ready, tile_empty, WG: gl.constexpr,
                  NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
                  PAGE_SIZE: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, DEEP: gl.constexpr,
                  DYN: gl.constexpr, QTMA: gl.constexpr, CHAIN: gl.constexpr):
    it = 0
    nfix = 0
    nq = 0
    total = n_m * NH * n_b
    if CHAIN:  # the tiles chained through the pipeline (flash_attention_chain.py)
        _wsc_consumer(q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty,
                      v_empty, fixed, out_ptr, odesc, offs_ptr, cache_len_ptr, n_m, n_b, T,
                      max_pages, window, scale, tile_ids, tile_ready, tile_empty, WG, NH, NKV,
                      D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, STAGES, DYN)
    elif DYN:
        n = 0
        t, pid_m, h, seq_start, seq_len, cache_len = _take_tile(tile_ids, tile_ready,
                                                                tile_empty, n)
        while (t >= 0) & (t < total):  # (t < 0: past 2**31, the end)
            it, nfix, nq = _wsp_tile(q_ptr, q_smem, q_ready, q_empty, k_ring, v_ring, k_ready,
                                     v_ready, k_empty, v_empty, fixed, out_ptr, odesc, pid_m, h,
                                     seq_start, seq_len, cache_len, it, nfix, nq, n_m,
                                     max_pages, window, scale, WG, NH, NKV, D, PAGE_SIZE, MASK,
                                     BLOCK_M, BLOCK_N, STAGES, DEEP, QTMA)
            n += 1
            t, pid_m, h, seq_start, seq_len, cache_len = _take_tile(tile_ids, tile_ready,
                                                                    tile_empty, n)
    else:
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            pid_m, h, b, seq_start, seq_len, cache_len = _tile_facts(
                offs_ptr, cache_len_ptr, t, n_m, T, NH, NKV, D, BLOCK_M)
            it, nfix, nq = _wsp_tile(q_ptr, q_smem, q_ready, q_empty, k_ring, v_ring, k_ready,
                                     v_ready, k_empty, v_empty, fixed, out_ptr, odesc, pid_m, h,
                                     seq_start, seq_len, cache_len, it, nfix, nq, n_m,
                                     max_pages, window, scale, WG, NH, NKV, D, PAGE_SIZE, MASK,
                                     BLOCK_M, BLOCK_N, STAGES, DEEP, QTMA)
    if not CHAIN:  # the last tile's output store reads its rows before the exit
        tma.store_wait(0)


@gluon.jit
def _wsp_tile(q_ptr, q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty,
              v_empty, fixed, out_ptr, odesc, pid_m, h, seq_start, seq_len, cache_len, it, nfix,
              nq, n_m,
              max_pages, window, scale, WG: gl.constexpr, NH: gl.constexpr, NKV: gl.constexpr,
              D: gl.constexpr, PAGE_SIZE: gl.constexpr, MASK: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              DEEP: gl.constexpr, QTMA: gl.constexpr):
    """One consumer warpgroup's share of a tile (its _tile_facts given), its key blocks from
    global ring index `it` on, after `nfix` V-tail fixes and `nq` query tiles loaded by the
    loader (QTMA); (it, nfix, nq) after it."""
    ROWS: gl.constexpr = BLOCK_M // 2
    TPW_D: gl.constexpr = D // 8
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _tile(
        pid_m, h, 0, seq_len, cache_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
    if n_blocks > 0:
        if QTMA:  # the loader's TMA brought them (into the slot its nq-th load used)
            q_slot = nq % 2
            mbarrier.wait(q_ready.index(q_slot), (nq // 2) & 1)
            q = q_smem.index(q_slot).slice(WG * ROWS, ROWS)
            if nq > 0:
                # The previous tile's output store has long read its rows out of the other
                # slot by now (waiting for it at its store cost ~0.2 key blocks a tile).
                tma.store_wait(0)
                _ws_release(q_empty, 1 - q_slot)
        else:
            # This warpgroup's query rows (rows past the sequence zero). The previous tile's
            # products that read q have all been waited for, and its output store has read
            # its rows out of q (every thread past the wait before any writes).
            q = q_smem.index(0).slice(WG * ROWS, ROWS)
            rows = _q_rows(q_ptr, seq_start, seq_len, pid_m * BLOCK_M + WG * ROWS, h, NH, D,
                           ROWS, ld_layout)
            tma.store_wait(0)
            gl.thread_barrier()
            q.store(rows)
            fence_async_shared()
            gl.thread_barrier()
        # (The turn barrier is not used without ping-pong: `fixed` stands in for it.)
        if DEEP:
            o, l_i = _ws_attend_deep(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                                     fixed, it, nfix & 1, q_lo, kv_len, start, end, full_lo,
                                     full_hi, n_blocks, window, scale, WG, D, MASK, BLOCK_N,
                                     STAGES)
        else:
            o, l_i = _ws_attend(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                                fixed, fixed, it, nfix & 1, q_lo, kv_len, start, end,
                                full_lo, full_hi, n_blocks, window, scale, WG, D, MASK,
                                BLOCK_N, STAGES, 0, 1)
        nfix += (start + n_blocks * BLOCK_N > kv_len).to(gl.int32)
        it += n_blocks
        # Every product that read q has been waited for: this warpgroup's query rows in
        # shared memory carry its output rows out (one TMA store) when they all lie in the
        # sequence. (Not for the deep consumers that load their own rows, a tuner candidate
        # only: there ptxas parked 40 bytes of their state on the stack.)
        if (QTMA or not DEEP) and (pid_m * BLOCK_M + (WG + 1) * ROWS <= seq_len):
            _ws_store_tma(odesc, q, o, l_i, seq_start + pid_m * BLOCK_M + WG * ROWS, h, D)
        else:
            _ws_store(out_ptr, o, l_i, seq_start, seq_len, pid_m, h, WG, NH, D, BLOCK_M)
        if QTMA:
            nq += 1  # (the slot goes back at the next tile's start)
    return it, nfix, nq


@gluon.jit
def _q_rows(q_ptr, seq_start, seq_len, row0, h, NH: gl.constexpr, D: gl.constexpr,
            ROWS: gl.constexpr, ld_layout: gl.constexpr):
    """Query rows [row0, row0 + ROWS) of the sequence in registers (one coalesced load; rows
    past the sequence zero)."""
    i = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
    dq = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    q_rows = (seq_start + i).to(gl.int64) * (NH * D) + h * D
    return gl.load(q_ptr + q_rows[:, None] + dq[None, :], mask=(i < seq_len)[:, None],
                   other=0.0)


@gluon.jit
def _wsp_shared(q_ptr, out_ptr, blocks_ptr, T, num_pages, num_layers, NH: gl.constexpr,
                NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                QTMA: gl.constexpr):
    """The persistent kernel's shared memory, mbarriers (initialized and fenced) and TMA
    descriptors: (q_smem, qdesc, odesc, desc, the K/V rings and their barriers as _ws_rings
    gives them, tile_ids, tile_ready, tile_empty, q_ready, q_empty)."""
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    kv_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2 if QTMA else 1, BLOCK_M, D], q_layout)
    if QTMA:
        qdesc = tma.make_tensor_descriptor(q_ptr, shape=[T, NH * D], strides=[NH * D, 1],
                                           block_shape=[BLOCK_M, D], layout=q_layout)
    else:
        qdesc = q_ptr  # (unused)
    # The output leaves through the query rows' shared memory (a warpgroup's half each;
    # _wsp_tile and the chained consumers' _wsc_store).
    o_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, D], dtype)
    odesc = tma.make_tensor_descriptor(out_ptr, shape=[T, NH * D], strides=[NH * D, 1],
                                       block_shape=[BLOCK_M // 2, D], layout=o_layout)
    desc = _kv_descriptor(blocks_ptr, num_pages, num_layers, NKV, D, PAGE_SIZE, BLOCK_N, kv_smem)
    k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed = _ws_rings(dtype, kv_smem, D,
                                                                          BLOCK_N, STAGES)
    # DYN's ring of tile numbers and their facts, each slot with `ready` (the loader arrives)
    # and `empty` (both consumer warpgroups arrive); set up whether or not DYN uses them.
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    tile_ids = gl.allocate_shared_memory(gl.int32, [TILE_SLOTS, FACTS],
                                         gl.SwizzledSharedLayout(1, 1, 1, [0]))
    tile_ready = gl.allocate_shared_memory(gl.int64, [TILE_SLOTS, 1], bar_layout)
    tile_empty = gl.allocate_shared_memory(gl.int64, [TILE_SLOTS, 1], bar_layout)
    # QTMA's two query slots: `ready` (the TMA completes it), `empty` (both warpgroups).
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    for i in gl.static_range(TILE_SLOTS):
        mbarrier.init(tile_ready.index(i), count=1)
        mbarrier.init(tile_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)
    fence_async_shared()
    gl.thread_barrier()
    return (q_smem, qdesc, odesc, desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
            fixed, tile_ids, tile_ready, tile_empty, q_ready, q_empty)


@gluon.jit
def flash_prefill_wsp_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T, n_m, n_b, sched_ptr,
        NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
        MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, DEEP: gl.constexpr = 0,
        DYN: gl.constexpr = 0, QTMA: gl.constexpr = 0, CHAIN: gl.constexpr = 0):
    """flash_prefill_ws_kernel's arguments plus n_m (query tiles of the longest sequence), n_b
    (sequences) and sched_ptr (DYN's counter; None without DYN); launched with num_warps=4 on a
    1-D grid of at most one program per SM. DEEP gives the consumers the deeper pipeline of
    flash_attention_deep.py, DYN hands the tiles out at run time, QTMA has the loader warp
    bring each tile's query rows by TMA into one of two slots (the consumers load them
    themselves otherwise), so the next tile's are there when the consumers start it; CHAIN
    (with QTMA) has the consumers score the next tile's first key block while the current
    tile's last P V product runs (flash_attention_chain.py)."""
    (q_smem, qdesc, odesc, desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
     tile_ids, tile_ready, tile_empty, q_ready, q_empty) = _wsp_shared(
        q_ptr, out_ptr, blocks_ptr, T, num_pages, num_layers, NH, NKV, D, PAGE_SIZE, BLOCK_M,
        BLOCK_N, STAGES, QTMA)
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize(
        [(_wsp_consumer, (q_ptr, q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready,
                          k_empty, v_empty, fixed, out_ptr, odesc, offs_ptr, cache_len_ptr, n_m,
                          n_b, T, max_pages, window, scale, tile_ids, tile_ready, tile_empty, WG0,
                          NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, STAGES, DEEP, DYN,
                          QTMA, CHAIN)),
         (_wsp_consumer, (q_ptr, q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready,
                          k_empty, v_empty, fixed, out_ptr, odesc, offs_ptr, cache_len_ptr, n_m,
                          n_b, T, max_pages, window, scale, tile_ids, tile_ready, tile_empty, WG1,
                          NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, STAGES, DEEP, DYN,
                          QTMA, CHAIN)),
         (_wsp_loader, (desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, offs_ptr,
                        cache_len_ptr, lut_ptr, n_m, n_b, T, max_pages, window, layer_idx,
                        num_layers, num_pages, sched_ptr, tile_ids, tile_ready, tile_empty,
                        qdesc, q_smem, q_ready, q_empty, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M,
                        BLOCK_N, STAGES, DYN, QTMA))],
        [4, 1], [CONSUMER_REGS, LOADER_REGS])


@triton.jit
def flash_prefill_persistent_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T, n_m, n_b, sched_ptr,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr, DYN: tl.constexpr = 0):
    """The Triton kernel's persistent form, at the Gluon kernel's arguments, grid and tile
    order: the twin Triton's interpreter runs in its place (Gluon has none), and a config of
    its own (a PERSISTENT config without WS). DYN: tiles from the counter at sched_ptr."""
    pdl_wait()
    total = n_m * NH * n_b
    if DYN:
        t = tl.program_id(0)
        while (t >= 0) & (t < total):  # (t < 0: past 2**31, the end)
            pid_m, h, b = lpt_tile(t, n_m, NH, NKV, D, BLOCK_M, L2_GROUP_BYTES)
            prefill_tile(q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr,
                         max_pages, layer_idx, num_layers, num_pages, window, scale, T, pid_m,
                         h, b, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, USE_TMA, SOFTCAP)
            t = next_tile(sched_ptr)
        schedule_done(sched_ptr)
    else:
        for t in range(tl.program_id(0), total, tl.num_programs(0)):
            pid_m, h, b = lpt_tile(t, n_m, NH, NKV, D, BLOCK_M, L2_GROUP_BYTES)
            prefill_tile(q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr,
                         max_pages, layer_idx, num_layers, num_pages, window, scale, T, pid_m,
                         h, b, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, USE_TMA, SOFTCAP)


@triton.jit
def next_tile(sched_ptr):
    """The next tile of a DYN launch: the first wave's tiles are the programs' own numbers,
    so the counter numbers the tiles after it."""
    return tl.atomic_add(sched_ptr, 1) + tl.num_programs(0)


@triton.jit
def schedule_done(sched_ptr):
    """A program's last use of the counter (after its last take, whose result it has read):
    the last program out sets both words back to zero for the next launch."""
    if tl.atomic_add(sched_ptr + 1, 1) == tl.num_programs(0) - 1:
        tl.atomic_xchg(sched_ptr, 0)
        tl.atomic_xchg(sched_ptr + 1, 0)


def grid_rule(BLOCK_M: int, NH: int, programs: int = NUM_SMS):
    """Grid of the persistent kernels: one program per SM, fewer when there are fewer tiles."""
    return lambda batch, max_seq_len: (
        min(max(1, cdiv(max_seq_len, BLOCK_M)) * NH * batch, programs), 1, 1)


def persistent_kernel(fn, constexprs: dict):
    """(kernel, constexprs) of the persistent form of a one-tile prefill kernel launched with
    `constexprs` (the persistent kernels always take the tiles longest first, never in turns)."""
    # (Compared by identity: hashing a jitted function hashes its source and what it calls.)
    if fn is flash_prefill_ws_kernel:
        kernel = flash_prefill_wsp_kernel
        # (The persistent kernels' own forms: the one-tile constexprs name them only when set.)
        constexprs = {**constexprs, **{k: constexprs.get(k, 0) for k in PERSISTENT_FLAGS}}
    elif fn is flash_prefill_kernel:
        kernel = flash_prefill_persistent_kernel
    else:
        raise ValueError(f"no persistent form of {fn}")
    constexprs = {**constexprs, "DYN": constexprs.get("DYN", 0)}
    order = kernel.arg_names  # (the signature lists the constexprs in the kernel's order)
    return kernel, {k: constexprs[k] for k in sorted(
        (k for k in constexprs if k not in ("PINGPONG", "LPT")), key=order.index)}


def as_persistent(spec: KernelSpec) -> KernelSpec:
    """The persistent form of a one-tile prefill spec (flash_attention.aot_specs builds it for
    a PERSISTENT config): its arguments plus n_m (query tiles of the longest sequence) and n_b
    (sequences) last, then a DYN config's counter (int32 x 2, zero at launch), its grid one
    program per SM; the Gluon kernel's twin is the persistent Triton kernel at the same
    arguments."""
    fn, cx = persistent_kernel(spec.fn, spec.constexprs)
    runtime = {k: v for k, v in spec.signature.items() if v != "constexpr"}
    if not cx["DYN"]:
        cx = {"sched_ptr": None, **cx}
    sig = {**runtime, "n_m": "i32", "n_b": "i32", "sched_ptr": "*i32" if cx["DYN"] else
           "constexpr", **{k: "constexpr" for k in cx if k != "sched_ptr"}}
    return replace(spec, fn=fn, signature=sig, constexprs=cx,
                   grid=grid_rule(cx["BLOCK_M"], cx["NH"]),
                   notes=spec.notes + "; persistent: n_m = cdiv(longest sequence, BLOCK_M), "
                         "n_b = sequences, a 1-D grid of at most one program per SM"
                         + ("; sched_ptr: int32 x 2, zero at the first launch (the kernel "
                            "leaves it zero)" if cx["DYN"] else ""))
