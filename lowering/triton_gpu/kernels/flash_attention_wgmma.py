"""Hopper prefill attention written in Gluon: explicit TMA rings, mbarriers and async wgmma.

The same contract as flash_attention.py's `flash_prefill_kernel` (arguments, masks, paged K/V
through a TMA descriptor over the cache seen as 2-D, output `[T, NH*D]`), for pages that hold
whole key blocks; what differs is the schedule, which Triton's own pipeliner does not give:

- the key loop is software-pipelined by hand as in FlashAttention-3's intra-warpgroup overlap:
  iteration j issues S_j = Q K_j^T and then O += P_{j-1} V_{j-1} on the tensor cores, waits
  only for S_j, and runs block j's softmax while the P V product is still in flight;
- K and V arrive through STAGES-deep rings of shared-memory slots, each slot with its own
  mbarrier that the TMA unit completes (no register or address arithmetic per element);
- P stays in registers (the A operand of the P V wgmma) and is listed among the wait's
  dependencies, so its registers stay live until the product that reads them has finished
  (the hazard that made the software-pipelined Triton loop wrong: flash_attention.py).

Two forms:
- `flash_prefill_ws_kernel` (the one the configs name, `..ws`): warp-specialized. A loader warp
  issues the TMA loads (its page-table reads off the consumers' path) and two consumer
  warpgroups of 64 query rows each run the loop above independently, releasing each slot
  through count-2 "empty" mbarriers; with no CTA-wide barrier in the loop one warpgroup's
  softmax overlaps the other's products (FlashAttention-3's ping-pong, here from their drift;
  forcing turns, PINGPONG, measured slower). Measured on the H200 (BENCHMARKS.md, sweep run 8):
  1.07-1.36x the former default Triton config, 0.82-1.06x SDPA; its persistent form
  (flash_attention_persistent.py, `..wspersist`, the same consumer and loader bodies) is the
  shipped choice for most prefill shapes since run 9, the longest-first one-tile form
  (`..wslpt`, paged.tile_order) for a single short prompt.
- `flash_prefill_wgmma_kernel` (flash_attention_wgmma_single.py): one partition of 8 warps
  issuing its own loads, refilling a slot after a CTA-wide barrier each iteration. Measured
  0.87-0.96x the Triton kernel at head dim 128: the sweep's baseline, never offered to the
  tuner. This module holds the helpers the forms share and the host wrapper for both.

Masks are applied only on the key blocks that need them (the window's far edge, the diagonal,
the ragged end), chosen per block by a scalar branch. V rows past the sequence's cached length
(slots that may hold anything, NaN included) are zeroed in shared memory before the product
that would multiply them by P = 0.

Gluon has no interpreter: the CPU checks of these kernels are their offline sm_90 compiles
(tests/lowering/triton_gpu/test_flash_attention_aot.py: no spills, no in-flight wgmma register
hazard in the SASS) and the spec plumbing (test_flash_attention_wgmma.py; the interpreter runs
the Triton twin a WS spec carries); their numbers are checked against torch on the GPU
(tests/gpu/test_flash_wgmma_gpu.py, tools/gpu_sweeps/attention_wgmma.py).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                             warpgroup_mma, warpgroup_mma_wait)

from graphir.lowering.triton_gpu.kernels.flash_attention_epilogue import _ws_store
from graphir.lowering.triton_gpu.kernels.paged import (full_key_range, key_range, mask_allows,
                                                       page_block_row, sequence_rows, tile_order)

# Registers a thread of the second consumer warpgroup (setmaxnreg); the loader warp keeps 24 (it
# holds a few scalars), and Triton gives the first consumer warpgroup what is left of the 64K
# (240 too; with 40 for the loader it got 224). At 240 ptxas spills nothing at head dims 64 and
# 128 for every mask but the chunked one (head dim 128, 128-key blocks: 248 bytes, the
# per-element division of its mask), which keeps the Triton kernel (runnable_config in
# flash_attention.py); at 232 the sliding window spilled 16 bytes.
CONSUMER_REGS = 240
LOADER_REGS = gl.constexpr(24)


@gluon.constexpr_function
def warpgroup_acc_layout(n):
    """The wgmma accumulator layout of one warpgroup's 64-row tile, n columns wide."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, n, 16])


@gluon.constexpr_function
def warpgroup_p_layout(n):
    """P as the register A operand of a product into warpgroup_acc_layout(n)."""
    return gl.DotOperandLayout(operand_index=0, parent=warpgroup_acc_layout(n), k_width=2)



@gluon.jit
def _issue_kv(desc, bars, ring, slot, lut_ptr, b, kvh, n0, max_pages, layer_idx, num_layers,
              num_pages, pred, KV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
              BLOCK_N: gl.constexpr):
    """TMA load of K (KV=0) or V (KV=1) rows n0..n0+BLOCK_N-1 into ring slot `slot`; skipped
    (no bytes expected) when pred is false."""
    row = page_block_row(lut_ptr, b, n0, max_pages, layer_idx, num_layers, KV, PAGE_SIZE,
                         num_pages, False)
    bar = bars.index(slot)
    mbarrier.expect(bar, BLOCK_N * D * desc.dtype.primitive_bitwidth // 8, pred=pred)
    tma.async_copy_global_to_shared(desc, [row.to(gl.int32), kvh * D], bar, ring.index(slot),
                                    pred=pred)


@gluon.jit
def _softmax(s, m_i, l_i, qp, n0, end, window, qk_scale, masked, s_layout: gl.constexpr,
             MASK: gl.constexpr, BLOCK_N: gl.constexpr):
    """Block scores s (raw q.k, fp32) -> (p, alpha, m_new, l_new) of the online softmax, in log2
    units; the mask is applied only when `masked` (a scalar) holds."""
    if masked:
        kp = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = mask_allows(qp, kp, window, MASK) & (kp < end)[None, :]
        s = gl.where(ok, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - m_new[:, None])
    else:
        # Mask-free: the row max is taken before scaling (scale >= 0, checked by the host).
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _key_blocks(cache_len_ptr, b, pid_m, seq_len, max_pages, window, PAGE_SIZE: gl.constexpr,
                MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The key blocks query tile pid_m of sequence b sees, as flash_prefill_kernel works them
    out: (kv_len, q_lo, start, end, full_lo, full_hi, n_blocks), [full_lo, full_hi) the blocks
    every query of the tile may see whole. The cached length is clamped as there."""
    return _key_blocks_at(gl.load(cache_len_ptr + b), pid_m, seq_len, max_pages, window,
                          PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)


@gluon.jit
def _key_blocks_at(cache_len, pid_m, seq_len, max_pages, window, PAGE_SIZE: gl.constexpr,
                   MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """_key_blocks for a cached length already loaded (clamped here)."""
    cache_len = gl.minimum(gl.maximum(cache_len, 0), max_pages * PAGE_SIZE)
    kv_len = cache_len + seq_len
    q_lo = cache_len + pid_m * BLOCK_M
    q_hi = gl.minimum(kv_len, q_lo + BLOCK_M) - 1
    start, end = key_range(q_lo, q_hi, kv_len, window, MASK)
    start = (start // BLOCK_N) * BLOCK_N
    lo, hi = full_key_range(q_lo, q_hi, kv_len, window, MASK)
    full_lo = gl.maximum(gl.cdiv(lo, BLOCK_N) * BLOCK_N, start)
    full_hi = (hi // BLOCK_N) * BLOCK_N
    return kv_len, q_lo, start, end, full_lo, full_hi, gl.cdiv(end - start, BLOCK_N)


@gluon.jit
def _q_tile(q_ptr, seq_start, seq_len, pid_m, h, NH: gl.constexpr, D: gl.constexpr,
            BLOCK_M: gl.constexpr, ld_layout: gl.constexpr):
    """The tile's queries in shared memory (one coalesced load; rows past the sequence
    zero), laid out for wgmma."""
    i = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    dq = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    q_rows = (seq_start + pid_m * BLOCK_M + i).to(gl.int64) * (NH * D) + h * D
    q = gl.load(q_ptr + q_rows[:, None] + dq[None, :],
                mask=(pid_m * BLOCK_M + i < seq_len)[:, None], other=0.0)
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], q.dtype)
    return gl.allocate_shared_memory(q.dtype, [BLOCK_M, D], layout, q)


@gluon.jit
def _kv_descriptor(blocks_ptr, num_pages, num_layers, NKV: gl.constexpr, D: gl.constexpr,
                   PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, kv_smem: gl.constexpr):
    """A TMA descriptor over the cache seen as 2-D [rows, NKV * D], its bounds the cache's real
    rows (capped at 2**31 - 1: TMA coordinates are 32-bit), boxes of one key block of a head."""
    rows = gl.minimum(num_pages.to(gl.int64) * (2 * PAGE_SIZE) * num_layers,
                      2**31 - 1).to(gl.int32)
    return tma.make_tensor_descriptor(blocks_ptr, shape=[rows, NKV * D], strides=[NKV * D, 1],
                                      block_shape=[BLOCK_N, D], layout=kv_smem)


def flash_attention_wgmma(q, input_row_offsets, cache_lengths, lookup_table, blocks,
                          layer_idx: int, mask="CAUSAL", window: int = 0,
                          scale: float | None = None, max_seq_len: int | None = None,
                          block_m: int = 128, block_n: int = 128, stages: int = 2,
                          num_warps: int = 8, ws: bool = False,
                          consumer_regs: int = CONSUMER_REGS, pingpong: bool = False,
                          lpt: bool = False):
    """The single-partition kernel, or the warp-specialized one (ws, pingpong), on torch
    tensors (q [T, NH, D] -> [T, NH*D]), launched as flash_attention.py's `flash_attention`
    launches its kernels; pages must hold whole key blocks (page_size % block_n == 0)."""
    from graphir.lowering.triton_gpu.kernels import flash_attention as fa
    from graphir.lowering.triton_gpu.kernels.paged import check_attention_args, mask_id

    T, NH, D = q.shape
    _, page_size, NKV, m = check_attention_args("flash_attention_wgmma", q, blocks, mask, window)
    if page_size % block_n:
        raise ValueError(f"flash_attention_wgmma: page size {page_size} does not hold whole "
                         f"key blocks of {block_n}")
    scale = float(D ** -0.5 if scale is None else scale)
    fa.check_scale(scale)
    cx = dict(NH=NH, NKV=NKV, D=D, PAGE_SIZE=page_size, MASK=mask_id(m), BLOCK_M=block_m,
              BLOCK_N=block_n, STAGES=stages)
    if ws:
        kernel, num_warps = flash_prefill_ws_kernel, 4
        cx.update(CONSUMER_REGS=consumer_regs, PINGPONG=int(pingpong), LPT=int(lpt))
    else:
        from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma_single import (
            flash_prefill_wgmma_kernel as kernel)
    return fa.launch(kernel, q, input_row_offsets, cache_lengths, lookup_table, blocks,
                     layer_idx, window, scale, max_seq_len, block_m, cx, True,
                     num_warps=num_warps)


# ---------------------------------------------------------------------------------------------
# Warp-specialized form: one loader warp feeds the K/V rings through TMA, two consumer
# warpgroups (64 query rows each) run the pipelined loop independently.
# The consumers never wait for each other (no CTA-wide barrier in the loop), so one's softmax
# overlaps the other's products (FlashAttention-3's ping-pong arises from their drift rather
# than being forced), and the loader's page-table loads stay off their critical path.
# ---------------------------------------------------------------------------------------------


@gluon.jit
def _ws_load_tile(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b, kvh,
                  start, n_blocks, it, max_pages, layer_idx, num_layers, num_pages,
                  D: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
    """The loader's TMA loads of one tile's key blocks, the first at global ring index `it`
    (0 for the one-tile kernel), each into a slot its consumers have released."""
    for j in range(n_blocks):
        g = it + j
        slot = g % STAGES
        # A fresh barrier counts as having completed the phase of parity 1: the first pass
        # through the ring does not wait.
        free = ((g // STAGES) & 1) ^ 1
        n0 = start + j * BLOCK_N
        mbarrier.wait(k_empty.index(slot), free)
        _issue_kv(desc, k_ready, k_ring, slot, lut_ptr, b, kvh, n0, max_pages, layer_idx,
                  num_layers, num_pages, True, 0, D, PAGE_SIZE, BLOCK_N)
        mbarrier.wait(v_empty.index(slot), free)
        _issue_kv(desc, v_ready, v_ring, slot, lut_ptr, b, kvh, n0, max_pages, layer_idx,
                  num_layers, num_pages, True, 1, D, PAGE_SIZE, BLOCK_N)


@gluon.jit
def _ws_loader(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b, kvh, start,
               n_blocks, max_pages, layer_idx, num_layers, num_pages, D: gl.constexpr,
               PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _ws_load_tile(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b, kvh,
                  start, n_blocks, 0, max_pages, layer_idx, num_layers, num_pages, D, PAGE_SIZE,
                  BLOCK_N, STAGES)


@gluon.jit
def _ws_release(bars, slot):
    """Both products that read `slot` are done in this warpgroup: once all four warps are past
    their wait (a barrier of this partition's warps only), one thread arrives for it."""
    gl.thread_barrier()
    mbarrier.arrive(bars.index(slot))


@gluon.jit
def _ws_fix_v_tail(ring, slot, fixed, phase, n0, kv_len, WG: gl.constexpr,
                   BLOCK_N: gl.constexpr, D: gl.constexpr):
    """Zero the V rows of a slot at or past the cached length: each consumer warpgroup zeroes
    its half of the slot, then both wait for each other (barrier `fixed`, count 2, in its
    `phase`: 0 where a program fixes at most one block, the fixes' parity in the persistent
    kernel)."""
    HALF: gl.constexpr = BLOCK_N // 2
    TPW_D: gl.constexpr = D // 8
    lay: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    part = ring.index(slot).slice(WG * HALF, HALF)
    v = part.load(lay)
    r = n0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, lay))
    part.store(gl.where((r < kv_len)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.arrive(fixed)
    mbarrier.wait(fixed, phase)


@gluon.jit
def _ws_start(q_lo, scale, WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr):
    """A consumer warpgroup's starting state for one tile: (qk_scale in log2 units, its query
    positions, m, l, O, a zero score tile for the products that start from zero)."""
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = warpgroup_acc_layout(BLOCK_N)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    qp = q_lo + WG * ROWS + gl.arange(0, ROWS, layout=row_s)
    m_i = gl.full([ROWS], -1.0e30, gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    o = gl.zeros([ROWS, D], gl.float32, layout=warpgroup_acc_layout(D))
    s0 = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    return scale * 1.4426950408889634, qp, m_i, l_i, o, s0


@gluon.jit
def _ws_attend(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed, turn, it,
               fix_phase, q_lo, kv_len, start, end, full_lo, full_hi, n_blocks, window, scale,
               WG: gl.constexpr, D: gl.constexpr, MASK: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, PINGPONG: gl.constexpr, RELEASE_LAST: gl.constexpr):
    """One consumer warpgroup's 64 query rows (q, in shared memory) over key blocks
    start.. of one tile: (o, l), the unnormalized output and the row sums. `it` is the global
    index of the tile's first key block in the rings (0 for the one-tile kernel; the
    persistent kernel counts across its tiles), so slot and parity follow it; fix_phase is the
    V-tail barrier's phase; RELEASE_LAST releases the last block's V slot too (a later tile
    refills it)."""
    qk_scale, qp, m_i, l_i, o, s0 = _ws_start(q_lo, scale, WG, D, BLOCK_N)
    p, m_i, l_i = _ws_block0(q, k_ring, k_ready, k_empty, it, s0, m_i, l_i, qp, qk_scale, start,
                             end, full_lo, full_hi, window, D, MASK, BLOCK_N, STAGES)
    p, o, m_i, l_i = _ws_blocks(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, turn, it,
                                p, o, m_i, l_i, qp, qk_scale, s0, start, end, full_lo, full_hi,
                                n_blocks, window, WG, MASK, BLOCK_N, STAGES, PINGPONG)
    o = _ws_last_pv(p, o, v_ring, v_ready, v_empty, fixed, it + n_blocks - 1, fix_phase,
                    start + (n_blocks - 1) * BLOCK_N, kv_len, WG, D, BLOCK_N, STAGES,
                    RELEASE_LAST)
    return o, l_i


@gluon.jit
def _ws_block0(q, k_ring, k_ready, k_empty, it, s0, m_i, l_i, qp, qk_scale, start, end, full_lo,
               full_hi, window, D: gl.constexpr, MASK: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr):
    """A tile's key block 0 (global ring index it) scored alone, no product in flight: S_0
    waited for, its K slot released, the softmax from (m_i, l_i). Returns (P as the P V
    operand, m, l)."""
    s_layout: gl.constexpr = warpgroup_acc_layout(BLOCK_N)
    first = it % STAGES
    mbarrier.wait(k_ready.index(first), (it // STAGES) & 1)
    s = warpgroup_mma(q, k_ring.index(first).permute((1, 0)), s0, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    # Every K slot a block fills is released once (the loader refills it STAGES blocks on).
    _ws_release(k_empty, first)
    masked = (start < full_lo) | (start + BLOCK_N > full_hi)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, start, end, window, qk_scale, masked,
                                  s_layout, MASK, BLOCK_N)
    return gl.convert_layout(p.to(q.dtype), warpgroup_p_layout(D)), m_i, l_i


@gluon.jit
def _ws_last_pv(p, o, v_ring, v_ready, v_empty, fixed, g_last, fix_phase, n0, kv_len,
                WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                RELEASE: gl.constexpr):
    """O += P V of a tile's last key block (global ring index g_last, first key n0), waited
    for; its V rows at or past kv_len zeroed first (only a last block can hold such rows).
    RELEASE gives its slot back to the loader."""
    last = g_last % STAGES
    mbarrier.wait(v_ready.index(last), (g_last // STAGES) & 1)
    if n0 + BLOCK_N > kv_len:
        _ws_fix_v_tail(v_ring, last, fixed, fix_phase, n0, kv_len, WG, BLOCK_N, D)
    o = warpgroup_mma(p, v_ring.index(last), o, is_async=True)
    o, p = warpgroup_mma_wait(0, deps=[o, p])
    if RELEASE:
        _ws_release(v_empty, last)
    return o


@gluon.jit
def _ws_blocks(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, turn, it, p, o, m_i, l_i,
               qp, qk_scale, s0, start, end, full_lo, full_hi, n_blocks, window,
               WG: gl.constexpr, MASK: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    """Key blocks 1..n_blocks-1 of a tile whose block 0 is scored (p its P V operand, m, l):
    per block j, S_j issued, then P_{j-1} V_{j-1}, block j's softmax while that product runs.
    Returns (p of the last block, o without its P V, m, l)."""
    dtype: gl.constexpr = q.dtype
    s_layout: gl.constexpr = s0.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o.type.layout)
    p_layout: gl.constexpr = p.type.layout
    for j in range(1, n_blocks):
        g = it + j
        n0 = start + j * BLOCK_N
        slot = g % STAGES
        prev = (g - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
        if PINGPONG:
            # FlashAttention-3's ping-pong: the warpgroups take turns issuing their two
            # products, so one's softmax runs while the other's products hold the tensor
            # cores. Turn k of warpgroup 0 waits for parity (k + 1) & 1 (its first turn passes
            # on the fresh barrier), of warpgroup 1 for k & 1 (after warpgroup 0's first).
            mbarrier.wait(turn.index(WG), ((j - 1) & 1) ^ (1 - WG))
        s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s0, use_acc=False,
                          is_async=True)
        # Block j - 1 holds no slot past the cache's end: block j starts before `end`, which
        # is at most kv_len. Only the last block can (fixed after the loop), so no warpgroup
        # waits for the other inside the loop (with PINGPONG that wait could never end).
        mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
        o = warpgroup_mma(p, v_ring.index(prev), o, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))
        s = warpgroup_mma_wait(1, deps=[s])
        masked = (n0 < full_lo) | (n0 + BLOCK_N > full_hi)
        p_next, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, n0, end, window, qk_scale, masked,
                                           s_layout, MASK, BLOCK_N)
        # The next P passes through the wait: were both P's that meet at the loop's head
        # (block 0's and this one) plain casts, LLVM would hoist the cast past the join, P
        # would cross the back edge as fp32 values, and ptxas could pack its bf16 pairs the
        # other way round, swapping every register's halves around each P V (the one-tile
        # and deep kernels' second consumer did: 30-60 PRMT a block). The wait's result is
        # opaque to that fold.
        # (The old P is listed to stay live until its product is done.)
        o, _, p = warpgroup_mma_wait(
            0, deps=[o, p, gl.convert_layout(p_next.to(dtype), p_layout)])
        # K of block j (its S is done) and V of block j - 1 (its product is done).
        _ws_release(k_empty, slot)
        mbarrier.arrive(v_empty.index(prev))
        o = o * gl.convert_layout(alpha, row_o)[:, None]
    return p, o, m_i, l_i


@gluon.jit
def _ws_rings(dtype: gl.constexpr, kv_smem: gl.constexpr, D: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The warp-specialized kernels' K/V rings and their mbarriers, initialized (the caller
    fences them for the async proxy): per slot `ready` (the loader's TMA completes it) and
    `empty` (both consumer warpgroups arrive), and `fixed`, the V-tail fix's meeting point."""
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_smem)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_smem)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    fixed = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(st), count=1)
        mbarrier.init(v_ready.index(st), count=1)
        mbarrier.init(k_empty.index(st), count=2)
        mbarrier.init(v_empty.index(st), count=2)
    mbarrier.init(fixed, count=2)
    return k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed


@gluon.jit
def _ws_consumer(q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed, turn,
                 out_ptr, seq_start, seq_len, pid_m, h, q_lo, kv_len, start, end, full_lo,
                 full_hi, n_blocks, window, scale, WG: gl.constexpr, NH: gl.constexpr,
                 D: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    q = q_smem.slice(WG * 64, 64)
    o, l_i = _ws_attend(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed, turn, 0, 0,
                        q_lo, kv_len, start, end, full_lo, full_hi, n_blocks, window, scale, WG,
                        D, MASK, BLOCK_N, STAGES, PINGPONG, 0)
    _ws_store(out_ptr, o, l_i, seq_start, seq_len, pid_m, h, WG, NH, D, BLOCK_M)


@gluon.jit
def flash_prefill_ws_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T,
        NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
        MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr = 0,
        LPT: gl.constexpr = 0):
    """Launched with num_warps=4 (consumer warpgroup 0); warp_specialize adds consumer
    warpgroup 1 and the loader warp. PINGPONG makes the consumers alternate their products;
    LPT takes the grid's programs longest first (paged.tile_order)."""
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    TPW_D: gl.constexpr = D // 8
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    kv_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)

    pid_m, h, b = tile_order(NH, NKV, D, BLOCK_M, LPT)
    seq_start, seq_len = sequence_rows(offs_ptr, b, T)
    if pid_m * BLOCK_M < seq_len:
        kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _key_blocks(
            cache_len_ptr, b, pid_m, seq_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M,
            BLOCK_N)
        kvh = h // (NH // NKV)

        # Q in shared memory (fenced below with the barriers' init for the wgmma's reads).
        q_smem = _q_tile(q_ptr, seq_start, seq_len, pid_m, h, NH, D, BLOCK_M, ld_layout)
        desc = _kv_descriptor(blocks_ptr, num_pages, num_layers, NKV, D, PAGE_SIZE, BLOCK_N,
                              kv_smem)
        k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed = _ws_rings(
            dtype, kv_smem, D, BLOCK_N, STAGES)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()
        gl.thread_barrier()
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        gl.warp_specialize(
            [(_ws_consumer, (q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
                             turn, out_ptr, seq_start, seq_len, pid_m, h, q_lo, kv_len, start,
                             end, full_lo, full_hi, n_blocks, window, scale, WG0, NH, D, MASK,
                             BLOCK_M, BLOCK_N, STAGES, PINGPONG)),
             (_ws_consumer, (q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
                             turn, out_ptr, seq_start, seq_len, pid_m, h, q_lo, kv_len, start,
                             end, full_lo, full_hi, n_blocks, window, scale, WG1, NH, D, MASK,
                             BLOCK_M, BLOCK_N, STAGES, PINGPONG)),
             (_ws_loader, (desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr,
                           b, kvh, start, n_blocks, max_pages, layer_idx, num_layers, num_pages,
                           D, PAGE_SIZE, BLOCK_N, STAGES))],
            [4, 1], [CONSUMER_REGS, LOADER_REGS])
