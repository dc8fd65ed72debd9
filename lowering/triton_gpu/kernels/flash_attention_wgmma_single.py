"""The single-partition form of the Gluon prefill kernel (flash_attention_wgmma.py): 8 warps
(two warpgroups of 64 query rows) issue their own TMA loads and refill a ring slot after a
CTA-wide barrier each key block, so both warpgroups move in lockstep.

Measured on the H200 (tools/gpu_sweeps/attention_wgmma.py run 1, BENCHMARKS.md): correct at
every mask, dtype and head dim checked, 0.87-0.96x the Triton kernel at head dim 128 (its best
variant, 128-key blocks in 3 stages: 412 against 448 TFLOP/s at B4 x 4096 causal), 1.04x at
head dim 64. Kept as the sweep's baseline for the warp-specialized form (which the tuner is
offered); `flash_attention_wgmma(..., ws=False)` launches it.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                             warpgroup_mma, warpgroup_mma_wait)

from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
    _issue_kv, _key_blocks, _kv_descriptor, _q_tile, _softmax)
from graphir.lowering.triton_gpu.kernels.paged import sequence_rows, tile_order


@gluon.jit
def _zero_v_tail(ring, slot, n0, kv_len, load_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                 D: gl.constexpr):
    """Zero the V rows of a slot at or past the cached length (their P is 0, but 0 * NaN is
    not): shared -> registers -> shared, then fenced for the async proxy that wgmma reads."""
    v = ring.index(slot).load(load_layout)
    r = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_layout))
    v = gl.where((r < kv_len)[:, None], v, gl.zeros_like(v))
    ring.index(slot).store(v)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def flash_prefill_wgmma_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T,
        NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
        MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr):
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    # One warpgroup per 64 query rows; S [BLOCK_M, BLOCK_N] and O [BLOCK_M, D] in wgmma
    # accumulator layouts with the same rows per thread, so row statistics move between them
    # without data movement; P is the A operand of the P V product, from registers.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    # Coalesced [rows, D] register layout for the q load and the V-tail fix (16-byte vectors).
    TPW_D: gl.constexpr = D // 8
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [NUM_WARPS, 1],
                                               [1, 0])
    kv_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)

    pid_m, h, b = tile_order(NH, NKV, D, BLOCK_M, 0)
    # Metadata clamped as in flash_prefill_kernel: bad offsets or lengths move no access
    # outside the buffers (the host checks them first; valid metadata is unchanged).
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
        k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_smem)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_smem)
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(st), count=1)
            mbarrier.init(v_bars.index(st), count=1)
        fence_async_shared()
        gl.thread_barrier()
        for st in gl.static_range(STAGES):
            _issue_kv(desc, k_bars, k_ring, st, lut_ptr, b, kvh, start + st * BLOCK_N, max_pages,
                      layer_idx, num_layers, num_pages, st < n_blocks, 0, D, PAGE_SIZE, BLOCK_N)
            _issue_kv(desc, v_bars, v_ring, st, lut_ptr, b, kvh, start + st * BLOCK_N, max_pages,
                      layer_idx, num_layers, num_pages, st < n_blocks, 1, D, PAGE_SIZE, BLOCK_N)

        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
        qp = q_lo + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        o = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
        s0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

        # Block 0: S_0 and its softmax (O is still zero: no rescale, no product yet).
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s0, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        masked = (start < full_lo) | (start + BLOCK_N > full_hi)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, start, end, window, qk_scale, masked,
                                      s_layout, MASK, BLOCK_N)
        p = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_blocks):
            n0 = start + j * BLOCK_N
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s0, use_acc=False,
                              is_async=True)
            # V of block j-1 needs no zeroing: block j starts before `end` <= kv_len, so only
            # the last block reaches past the cache's end (fixed after the loop).
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            o = warpgroup_mma(p, v_ring.index(prev), o, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s])
            masked = (n0 < full_lo) | (n0 + BLOCK_N > full_hi)
            p_next, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, n0, end, window, qk_scale,
                                               masked, s_layout, MASK, BLOCK_N)
            # P_{j-1} is read by the product still in flight: it is a dependency of the wait.
            o, p = warpgroup_mma_wait(0, deps=[o, p])
            o = o * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(p_next.to(dtype), p_layout)
            # Slot `prev` is free (both products that read it are done in every warpgroup):
            # refill it with block j - 1 + STAGES.
            gl.thread_barrier()
            nxt = j - 1 + STAGES
            _issue_kv(desc, k_bars, k_ring, prev, lut_ptr, b, kvh, start + nxt * BLOCK_N,
                      max_pages, layer_idx, num_layers, num_pages, nxt < n_blocks, 0, D,
                      PAGE_SIZE, BLOCK_N)
            _issue_kv(desc, v_bars, v_ring, prev, lut_ptr, b, kvh, start + nxt * BLOCK_N,
                      max_pages, layer_idx, num_layers, num_pages, nxt < n_blocks, 1, D,
                      PAGE_SIZE, BLOCK_N)
        # The last block's P V.
        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // STAGES) & 1)
        if start + n_blocks * BLOCK_N > kv_len:
            _zero_v_tail(v_ring, last, start + (n_blocks - 1) * BLOCK_N, kv_len, ld_layout,
                         BLOCK_N, D)
        o = warpgroup_mma(p, v_ring.index(last), o, is_async=True)
        o, p = warpgroup_mma_wait(0, deps=[o, p])
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(st))
            mbarrier.invalidate(v_bars.index(st))

        l_o = gl.convert_layout(l_i, row_o)
        out = o / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
        r = gl.arange(0, BLOCK_M, layout=row_o)
        d = gl.arange(0, D, layout=col_o)
        o_rows = (seq_start + pid_m * BLOCK_M + r).to(gl.int64) * (NH * D) + h * D
        gl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(dtype),
                 mask=(pid_m * BLOCK_M + r < seq_len)[:, None])
