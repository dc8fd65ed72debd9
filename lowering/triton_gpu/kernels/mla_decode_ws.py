"""MLA decode attention in latent space, warp-specialized in Gluon for Hopper (the `..ws` configs
of mla_decode.py): the same arguments, partition rule and partial outputs as
`mla_absorbed_kernel`, for DeepSeek's sizes (R = 512 latent columns, 64 rope columns, so
576-wide keys whose first 512 columns are the values), bf16 or fp16, pages holding whole key
blocks.

Why a second kernel: at 128 heads the step is bound by the tensor cores, and the Triton kernel
reaches a quarter of their rate. With 64 query rows per program its fp32 output (64 x 512)
does not fit one warpgroup's registers, so Triton splits every product of its 8 warps by
columns: the score rows are shared by the two warpgroups (a shared-memory round trip for each
row max) and nothing overlaps the score product, the softmax and the value product. Here the
roles are explicit (FlashMLA's division of the output by columns, with its own schedule):

- a loader warp streams each block of BLOCK_N latent rows into a STAGES-deep ring by TMA
  (nine 64-column boxes a block) and looks the pages up off the consumers' path;
- warpgroup 0 computes the scores S = Q K^T of every block (Q in shared memory), runs the
  online softmax, hands P (bf16) and the rescale factor to warpgroup 1 through shared memory,
  and accumulates the left 256 value columns with P from its registers, the product of block
  j - 1 overlapping the scores of block j (FlashAttention-3's intra-warpgroup overlap);
- warpgroup 1 accumulates the right 256 value columns from the shared P, so its product runs
  while warpgroup 0 computes the next block's scores.

Synchronisation is by mbarriers only: per ring slot `ready` (TMA bytes) and `empty` (both
warpgroups arrive once they are done with the block), `p_ready` (warpgroup 0 wrote P and the
factor) and `p_free` (warpgroup 1 has read them). Rows of the last block at or past a tile's
last visible key may hold anything (unwritten slots, NaN included): warpgroup 0 zeroes their
value columns in the slot before either warpgroup multiplies them by P = 0.

Gluon has no interpreter: the CPU checks are the offline sm_90 compile (no spills) and the
interpreter running the Triton twin that the spec carries; numbers are checked against torch on
the GPU (tests/gpu/test_mla_ws_gpu.py, tools/gpu_sweeps/mla.py).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                             warpgroup_mma, warpgroup_mma_wait)

from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import _softmax as prefill_softmax
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (warpgroup_acc_layout,
                                                                       warpgroup_p_layout)
from graphir.lowering.triton_gpu.kernels.mla import latent_block_row, tile_key_range
from graphir.lowering.triton_gpu.kernels.paged import MASK_CAUSAL as _CAUSAL

ROWS = gl.constexpr(64)        # query rows (token, head pairs) a program, one warpgroup's M
CHUNK = gl.constexpr(64)       # columns of one TMA box / one shared tile (128-byte swizzle)
CAUSAL = gl.constexpr(_CAUSAL)
# Registers a thread: the consumers 240 each (warpgroup 0 holds S, P and 4 x 32 of output),
# the loader warp 24.
CONSUMER_REGS = 240
LOADER_REGS = gl.constexpr(24)


@gluon.jit
def _loader(desc, ring, ready, empty, lut_ptr, b, lo, n_blocks, max_pages, layer_idx,
            num_layers, num_pages, KINDS: gl.constexpr, PAGE_SIZE: gl.constexpr,
            BLOCK_N: gl.constexpr, NCK: gl.constexpr, STAGES: gl.constexpr):
    for j in range(n_blocks):
        slot = j % STAGES
        # A fresh barrier counts as having completed the phase of parity 1: the first pass
        # through the ring does not wait.
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        row = latent_block_row(lut_ptr, b, lo + j * BLOCK_N, max_pages, layer_idx, num_layers,
                               num_pages, KINDS, PAGE_SIZE).to(gl.int32)
        bar = ready.index(slot)
        mbarrier.expect(bar, NCK * BLOCK_N * CHUNK * desc.dtype.primitive_bitwidth // 8)
        for c in gl.static_range(NCK):
            tma.async_copy_global_to_shared(desc, [row, c * CHUNK], bar,
                                            ring.index(slot * NCK + c))


@gluon.jit
def _release(bar):
    """All four warps of this warpgroup are past their reads or writes; one arrival."""
    gl.thread_barrier()
    mbarrier.arrive(bar)


@gluon.jit
def _zero_tail(ring, slot, n0, end, NCV: gl.constexpr, NCK: gl.constexpr,
               BLOCK_N: gl.constexpr):
    """Zero the value columns of the slot's rows at or past `end` (warpgroup 0, before P of
    this block is published or used)."""
    lay: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, lay))
    for c in gl.static_range(NCV):
        tile = ring.index(slot * NCK + c)
        v = tile.load(lay)
        tile.store(gl.where((r < end)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()


@gluon.jit
def _scores(q_smem, ring, slot, s0, NCK: gl.constexpr):
    """S = Q K^T of the block in ring slot `slot`, issued (async) as NCK chained products."""
    s = warpgroup_mma(q_smem.index(0), ring.index(slot * NCK).permute((1, 0)), s0,
                      use_acc=False, is_async=True)
    for c in gl.static_range(1, NCK):
        s = warpgroup_mma(q_smem.index(c), ring.index(slot * NCK + c).permute((1, 0)), s,
                          is_async=True)
    return s


@gluon.jit
def _pv4(p, ring, base, o0, o1, o2, o3):
    """O[:, 4 chunks] += P V for the four 64-column value tiles from ring tile `base` (async)."""
    o0 = warpgroup_mma(p, ring.index(base), o0, is_async=True)
    o1 = warpgroup_mma(p, ring.index(base + 1), o1, is_async=True)
    o2 = warpgroup_mma(p, ring.index(base + 2), o2, is_async=True)
    o3 = warpgroup_mma(p, ring.index(base + 3), o3, is_async=True)
    return o0, o1, o2, o3


@gluon.jit
def _tile_rows(tile, seq_start, n_new, part, num_parts, NH: gl.constexpr, layout: gl.constexpr):
    """The tile's (token, head) rows in `layout`: (their partial slots, which exist)."""
    rows = tile * ROWS + gl.arange(0, ROWS, layout=layout)
    slot = ((seq_start * NH + rows).to(gl.int64)) * num_parts + part
    return slot, rows < n_new * NH


@gluon.jit
def _store_half(o_part_ptr, tile, seq_start, n_new, part, num_parts, o0, o1, o2, o3,
                COL0: gl.constexpr, NH: gl.constexpr, RP: gl.constexpr):
    """Four 64-column output tiles at columns COL0.. of the rows' partial slots."""
    lay: gl.constexpr = o0.type.layout
    slot, keep = _tile_rows(tile, seq_start, n_new, part, num_parts, NH, gl.SliceLayout(1, lay))
    c = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, lay))
    base = o_part_ptr + slot[:, None] * RP + COL0 + c[None, :]
    k = keep[:, None]
    gl.store(base, o0, mask=k)
    gl.store(base + CHUNK, o1, mask=k)
    gl.store(base + 2 * CHUNK, o2, mask=k)
    gl.store(base + 3 * CHUNK, o3, mask=k)


@gluon.jit
def _softmax_start(cache_len, tile, scale, NH: gl.constexpr, s_layout: gl.constexpr,
                   o_layout: gl.constexpr):
    """(qk_scale, rows' positions, the first row's, m, l, four zero 64-column output tiles):
    the online softmax's starting state for the tile's rows."""
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    qk_scale = scale * 1.4426950408889634
    qrow = cache_len + (tile * ROWS + gl.arange(0, ROWS, layout=row_s)) // NH
    qmin = cache_len + (tile * ROWS) // NH
    o0 = gl.zeros([ROWS, CHUNK], gl.float32, layout=o_layout)
    return (qk_scale, qrow, qmin, gl.full([ROWS], -1.0e30, gl.float32, layout=row_s),
            gl.zeros([ROWS], gl.float32, layout=row_s), o0, gl.zeros_like(o0),
            gl.zeros_like(o0), gl.zeros_like(o0))


@gluon.jit
def _softmax(s, m_i, l_i, qrow, n0, hi, qmin, qk_scale, s_layout: gl.constexpr,
             BLOCK_N: gl.constexpr):
    """Block scores (raw q.k, fp32) -> (p, alpha, m_new, l_new): the prefill kernel's online
    softmax step with the causal mask over keys before the partition's end, applied only on a
    block some row does not see whole (qmin: the tile's first row's position)."""
    masked = n0 + BLOCK_N > gl.minimum(hi, qmin + 1)
    return prefill_softmax(s, m_i, l_i, qrow, n0, hi, 1, qk_scale, masked, s_layout,  # window:
                           CAUSAL, BLOCK_N)                                          # unused


@gluon.jit
def _publish(pf, alpha, j, ring, slot, n0, end, p_smem, a_smem, p_ready, p_free,
             NCV: gl.constexpr, NCK: gl.constexpr, BLOCK_N: gl.constexpr):
    """Block j's P (bf16/fp16) and factor for warpgroup 1, once it has read block j - 1's; the
    tail rows' values zeroed first. Returns P in the input dtype."""
    pb = pf.to(p_smem.dtype)
    if n0 + BLOCK_N > end:
        _zero_tail(ring, slot, n0, end, NCV, NCK, BLOCK_N)
    mbarrier.wait(p_free, (j & 1) ^ 1)
    p_smem.store(pb)
    a_smem.store(alpha)
    fence_async_shared()
    _release(p_ready)
    return pb


@gluon.jit
def _wg_scores(q_smem, ring, ready, empty, p_smem, a_smem, p_ready, p_free, o_part_ptr, ml_ptr,
               tile, seq_start, n_new, cache_len, part, num_parts, lo, hi, end, n_blocks, scale,
               NH: gl.constexpr, NCK: gl.constexpr, NCV: gl.constexpr, RP: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Warpgroup 0: scores, softmax, P and the factor for warpgroup 1, the left value half
    (block j - 1's values issued after block j's scores: FlashAttention-3's order)."""
    s_layout: gl.constexpr = warpgroup_acc_layout(BLOCK_N)
    o_layout: gl.constexpr = warpgroup_acc_layout(CHUNK)
    p_layout: gl.constexpr = warpgroup_p_layout(CHUNK)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    qk_scale, qrow, qmin, m_i, l_i, o0, o1, o2, o3 = _softmax_start(cache_len, tile, scale, NH,
                                                                    s_layout, o_layout)
    if n_blocks > 0:
        s0 = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma_wait(0, deps=[_scores(q_smem, ring, 0, s0, NCK)])
        pf, alpha, m_i, l_i = _softmax(s, m_i, l_i, qrow, lo, hi, qmin, qk_scale, s_layout,
                                       BLOCK_N)
        pb = _publish(pf, alpha, 0, ring, 0, lo, end, p_smem, a_smem, p_ready, p_free, NCV,
                      NCK, BLOCK_N)
        p = gl.convert_layout(pb, p_layout)
        for j in range(1, n_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            n0 = lo + j * BLOCK_N
            mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
            s = _scores(q_smem, ring, slot, s0, NCK)
            o0, o1, o2, o3 = _pv4(p, ring, prev * NCK, o0, o1, o2, o3)
            s = warpgroup_mma_wait(4, deps=[s])
            pf, alpha, m_i, l_i = _softmax(s, m_i, l_i, qrow, n0, hi, qmin, qk_scale, s_layout,
                                           BLOCK_N)
            pb = _publish(pf, alpha, j, ring, slot, n0, end, p_smem, a_smem, p_ready, p_free,
                          NCV, NCK, BLOCK_N)
            o0, o1, o2, o3, p = warpgroup_mma_wait(0, deps=[o0, o1, o2, o3, p])
            # This warpgroup is done with block j - 1 (scores and left values).
            _release(empty.index(prev))
            ar = gl.convert_layout(alpha, row_o)[:, None]
            o0 = o0 * ar
            o1 = o1 * ar
            o2 = o2 * ar
            o3 = o3 * ar
            p = gl.convert_layout(pb, p_layout)
        last = (n_blocks - 1) % STAGES
        o0, o1, o2, o3 = _pv4(p, ring, last * NCK, o0, o1, o2, o3)
        o0, o1, o2, o3, p = warpgroup_mma_wait(0, deps=[o0, o1, o2, o3, p])
        _release(empty.index(last))
    _store_half(o_part_ptr, tile, seq_start, n_new, part, num_parts, o0, o1, o2, o3, 0, NH, RP)
    # The rows' slots worked out after the loop (kept from before it they would spill).
    slot, keep = _tile_rows(tile, seq_start, n_new, part, num_parts, NH, row_s)
    gl.store(ml_ptr + slot * 2, m_i, mask=keep)
    gl.store(ml_ptr + slot * 2 + 1, l_i, mask=keep)


@gluon.jit
def _wg_values(ring, ready, empty, p_smem, a_smem, p_ready, p_free, o_part_ptr, tile,
               seq_start, n_new, part, num_parts, n_blocks, NH: gl.constexpr,
               NCK: gl.constexpr, NCV: gl.constexpr, RP: gl.constexpr, STAGES: gl.constexpr):
    """Warpgroup 1: the right value half, from P and the factor warpgroup 0 publishes."""
    o_layout: gl.constexpr = warpgroup_acc_layout(CHUNK)
    o0 = gl.zeros([ROWS, CHUNK], gl.float32, layout=o_layout)
    o1 = gl.zeros([ROWS, CHUNK], gl.float32, layout=o_layout)
    o2 = gl.zeros([ROWS, CHUNK], gl.float32, layout=o_layout)
    o3 = gl.zeros([ROWS, CHUNK], gl.float32, layout=o_layout)
    HALF: gl.constexpr = NCV // 2
    for j in range(n_blocks):
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        mbarrier.wait(p_ready, j & 1)
        ar = a_smem.load(gl.SliceLayout(1, o_layout))[:, None]
        o0 = o0 * ar
        o1 = o1 * ar
        o2 = o2 * ar
        o3 = o3 * ar
        o0, o1, o2, o3 = _pv4(p_smem, ring, slot * NCK + HALF, o0, o1, o2, o3)
        o0, o1, o2, o3 = warpgroup_mma_wait(0, deps=[o0, o1, o2, o3])
        _release(p_free)
        _release(empty.index(slot))
    _store_half(o_part_ptr, tile, seq_start, n_new, part, num_parts, o0, o1, o2, o3,
                HALF * CHUNK, NH, RP)


@gluon.jit
def _q_tiles(qlat_ptr, seq_start, n_new, tile, NH: gl.constexpr, W: gl.constexpr,
             NCK: gl.constexpr):
    """The tile's query rows in shared memory as NCK 64-column tiles laid out for wgmma (rows
    past the tile's tokens zero)."""
    dtype: gl.constexpr = qlat_ptr.dtype.element_ty
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = tile * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld))
    grow = seq_start.to(gl.int64) * NH + rows
    rmask = rows < n_new * NH
    c = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ld))
    q_smem = gl.allocate_shared_memory(
        dtype, [NCK, ROWS, CHUNK], gl.NVMMASharedLayout.get_default_for([ROWS, CHUNK], dtype))
    for k in gl.static_range(NCK):
        q = gl.load(qlat_ptr + grow[:, None] * W + k * CHUNK + c[None, :], mask=rmask[:, None],
                    other=0.0)
        q_smem.index(k).store(q)
    return q_smem


@gluon.jit
def _latent_descriptor(blocks_ptr, num_pages, num_layers, KINDS: gl.constexpr,
                       PAGE_SIZE: gl.constexpr, W: gl.constexpr, BLOCK_N: gl.constexpr,
                       layout: gl.constexpr):
    """A TMA descriptor over the latent cache seen as [rows, W], its bounds the cache's rows
    (capped at 2**31 - 1: TMA coordinates are 32-bit), boxes of BLOCK_N rows x 64 columns."""
    rows = gl.minimum(num_pages.to(gl.int64) * KINDS * num_layers * PAGE_SIZE,
                      2**31 - 1).to(gl.int32)
    return tma.make_tensor_descriptor(blocks_ptr, shape=[rows, W], strides=[W, 1],
                                      block_shape=[BLOCK_N, CHUNK], layout=layout)


@gluon.jit
def _program(offs_ptr, clen_ptr, max_pages, part_size, NH: gl.constexpr,
             PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr):
    """(tile, part, seq_start, n_new, cache_len, end, lo, hi, n_blocks) of this program: its
    row tile, partition and sequence, one past its last row's position, the keys [lo, hi) it
    reads in blocks (tile_key_range's, with the cached length clamped)."""
    tile = gl.program_id(0)
    part = gl.program_id(1)
    b = gl.program_id(2)
    seq_start = gl.load(offs_ptr + b)
    n_new = gl.load(offs_ptr + b + 1) - seq_start
    cache_len, end, lo, hi = tile_key_range(clen_ptr, b, tile, part, part_size, n_new, max_pages,
                                            NH, ROWS, PAGE_SIZE)
    n_blocks = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 0)
    return tile, part, seq_start, n_new, cache_len, end, lo, hi, n_blocks


@gluon.jit
def _latent_ring(blocks_ptr, num_pages, num_layers, KINDS: gl.constexpr,
                 PAGE_SIZE: gl.constexpr, W: gl.constexpr, NCK: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The loader's ring (STAGES slots of NCK [BLOCK_N, 64] tiles), its per-slot `ready` (TMA
    bytes) and `empty` (one arrival from each consumer warpgroup) barriers, initialised, and
    the TMA descriptor that fills it. The caller fences the barrier inits."""
    dtype: gl.constexpr = blocks_ptr.dtype.element_ty
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, CHUNK], dtype)
    ring = gl.allocate_shared_memory(dtype, [STAGES * NCK, BLOCK_N, CHUNK], tile_layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=2)
    desc = _latent_descriptor(blocks_ptr, num_pages, num_layers, KINDS, PAGE_SIZE, W, BLOCK_N,
                              tile_layout)
    return ring, ready, empty, desc


@gluon.jit
def _check_sizes(BLOCK_M: gl.constexpr, R: gl.constexpr, ROPE: gl.constexpr,
                 PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr):
    """The Gluon kernels' size contract (see mla_absorbed_ws_kernel)."""
    gl.static_assert(BLOCK_M == ROWS)
    gl.static_assert(R == 8 * CHUNK)
    gl.static_assert((R + ROPE) % CHUNK == 0)
    gl.static_assert(PAGE_SIZE % BLOCK_N == 0)


@gluon.jit
def mla_absorbed_ws_kernel(qlat_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr, o_part_ptr, ml_ptr,
                           max_pages, layer_idx, num_layers, num_pages, scale, part_size,
                           num_parts, NH: gl.constexpr, R: gl.constexpr, ROPE: gl.constexpr,
                           RP: gl.constexpr, EP: gl.constexpr, KINDS: gl.constexpr,
                           PAGE_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, VSPLIT: gl.constexpr, PRECISION: gl.constexpr,
                           STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """Launched with num_warps=4 (warpgroup 0) on mla_absorbed_kernel's grid; warp_specialize
    adds warpgroup 1 and the loader warp. BLOCK_M must be 64, R 512 (eight 64-column value
    tiles, four a warpgroup), (R + ROPE) a multiple of 64, PAGE_SIZE a multiple of BLOCK_N;
    VSPLIT and PRECISION are the twin's (1, unused)."""
    _check_sizes(BLOCK_M, R, ROPE, PAGE_SIZE, BLOCK_N)
    W: gl.constexpr = R + ROPE
    NCK: gl.constexpr = W // CHUNK
    NCV: gl.constexpr = R // CHUNK
    dtype: gl.constexpr = qlat_ptr.dtype.element_ty
    tile, part, seq_start, n_new, cache_len, end, lo, hi, n_blocks = _program(
        offs_ptr, clen_ptr, max_pages, part_size, NH, PAGE_SIZE, BLOCK_N)
    if tile * ROWS < n_new * NH:
        q_smem = _q_tiles(qlat_ptr, seq_start, n_new, tile, NH, W, NCK)
        ring, ready, empty, desc = _latent_ring(blocks_ptr, num_pages, num_layers, KINDS,
                                                PAGE_SIZE, W, NCK, BLOCK_N, STAGES)
        p_smem = gl.allocate_shared_memory(
            dtype, [ROWS, BLOCK_N], gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_N], dtype))
        a_smem = gl.allocate_shared_memory(gl.float32, [ROWS],
                                           gl.SwizzledSharedLayout(1, 1, 1, [0]))
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        p_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        p_free = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        mbarrier.init(p_ready, count=1)
        mbarrier.init(p_free, count=1)
        fence_async_shared()
        gl.thread_barrier()
        gl.warp_specialize(
            [(_wg_scores, (q_smem, ring, ready, empty, p_smem, a_smem, p_ready, p_free,
                           o_part_ptr, ml_ptr, tile, seq_start, n_new, cache_len, part,
                           num_parts, lo, hi, end, n_blocks, scale, NH, NCK, NCV, RP, BLOCK_N,
                           STAGES)),
             (_wg_values, (ring, ready, empty, p_smem, a_smem, p_ready, p_free, o_part_ptr,
                           tile, seq_start, n_new, part, num_parts, n_blocks, NH, NCK, NCV, RP,
                           STAGES)),
             (_loader, (desc, ring, ready, empty, lut_ptr, gl.program_id(2), lo, n_blocks,
                        max_pages, layer_idx, num_layers, num_pages, KINDS, PAGE_SIZE, BLOCK_N,
                        NCK, STAGES))],
            [4, 1], [CONSUMER_REGS, LOADER_REGS])
