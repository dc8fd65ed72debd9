"""MLA decode attention in latent space with the score work split between both warpgroups
(the `..ss` configs of mla_decode.py): the arguments, grid, loader and partial outputs of
mla_decode_ws.py's kernel, another division of the consumers' work.

Why: in the `..ws` kernel warpgroup 0 computes every block's scores (a 64 x 576 x 32 product,
half the block's tensor work) and its softmax, while warpgroup 1 only multiplies the right
value half and waits for P; ncu at 64 heads put warpgroup 1 at the p_ready wait, the loader at
the empty wait and warpgroup 0 never at a ready wait: the step is warpgroup 0's chain, the
tensor pipe 45% busy. Here (FlashMLA's "seesaw" division, our own schedule) the blocks go in
pairs: warpgroup w computes the scores of block 2i + w of pair i, the two exchange their row
maxima through shared memory so both use the pair's common running max, each publishes its P,
and each accumulates its half of the 512 value columns (w = 0 the left 256) for both blocks of
the pair, both P from shared memory. Each warpgroup's chain is half the score work of the old
one's, and both run it at once.

Per warpgroup and pair i (own block jo = 2i + w, other jt = 2i + 1 - w):
  scores of jo -> masked row max -> exchange -> m, alpha, P, l -> rescale O -> zero jo's tail
  value rows -> publish P -> O += P V_jo -> wait for the other's P -> O += P' V_jt
  -> wait for both products -> release both slots and the other's P.
(Gluon 3.6 carries no in-flight product across a loop iteration, so every product of the pair
is waited for in it; the two warpgroups' products still run together on the tensor pipe.)
With an odd block count the last pair's second block does not exist: its owner computes scores
over the slot's stale (or never written) rows, which the mask turns into -inf whatever they
hold, and zeroes the slot's value columns before publishing its all-zero P, so the other
warpgroup's product adds exactly 0; no wait or release is made for it (the loader is done).

Synchronisation, mbarriers only: ring `ready` (TMA bytes) and `empty` (count 2: one arrival
from each warpgroup per block), and per warpgroup `x_ready` (its row max, and at the end its row
sum, is in shared memory), `p_ready` (its P is), `p_free` (the other warpgroup's products that
read its P are done). A warpgroup overwrites its max only after it waited for the other's P of
the previous pair, which the other publishes after reading that max, so one buffer each holds.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                             warpgroup_mma_wait)

from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import warpgroup_acc_layout
from graphir.lowering.triton_gpu.kernels.mla_decode_ws import (CHUNK, LOADER_REGS, ROWS,
                                                               _check_sizes, _latent_ring,
                                                               _loader, _program, _pv4, _q_tiles,
                                                               _scores, _softmax_start,
                                                               _store_half, _tile_rows,
                                                               _zero_tail)
from graphir.lowering.triton_gpu.kernels.paged import mask_allows
from graphir.lowering.triton_gpu.kernels.paged import MASK_CAUSAL as _CAUSAL

CAUSAL = gl.constexpr(_CAUSAL)
# Both consumer warpgroups hold 4 x 32 registers of output, the scores, P and the softmax state.
CONSUMER_REGS = 240


@gluon.jit
def _release(bar, pred=True):
    """All four warps of this warpgroup are past their reads or writes; one arrival."""
    gl.thread_barrier()
    mbarrier.arrive(bar, pred=pred)


@gluon.jit
def _wait_ready(ready, j, n_blocks, STAGES: gl.constexpr):
    mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1, pred=j < n_blocks)


@gluon.jit
def _masked_scores(s, qrow, n0, hi, qmin, qk_scale, s_layout: gl.constexpr,
                   BLOCK_N: gl.constexpr):
    """Raw q.k scores -> log2-scaled ones, keys past the partition's end or a row's position
    -inf (the mask only on a block some row does not see whole, or one past the end)."""
    t = s * qk_scale
    if n0 + BLOCK_N > gl.minimum(hi, qmin + 1):
        kp = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = mask_allows(qrow, kp, 1, CAUSAL) & (kp < hi)[None, :]
        t = gl.where(ok, t, float("-inf"))
    return t


@gluon.jit
def _consumer(q_smem, ring, ready, empty, p_smem, x_smem, x_ready, p_ready, p_free, offs_ptr,
              clen_ptr, o_part_ptr, ml_ptr, max_pages, part_size, num_parts, scale,
              WG: gl.constexpr, NH: gl.constexpr, NCK: gl.constexpr, NCV: gl.constexpr,
              RP: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):
    """Warpgroup WG (0 or 1): the scores of every pair's block WG, value columns
    [WG * R / 2, (WG + 1) * R / 2) of every block; warpgroup 0 writes the rows' (max, sum)."""
    s_layout: gl.constexpr = warpgroup_acc_layout(BLOCK_N)
    o_layout: gl.constexpr = warpgroup_acc_layout(CHUNK)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    COL: gl.constexpr = WG * (NCV // 2)        # this warpgroup's first value tile of a slot
    OTHER: gl.constexpr = 1 - WG
    # The program's tile, sequence and key range worked out here again rather than passed in:
    # a worker partition receives its arguments in registers it then holds through the loop.
    tile, part, seq_start, n_new, cache_len, _, lo, hi, n_blocks = _program(
        offs_ptr, clen_ptr, max_pages, part_size, NH, PAGE_SIZE, BLOCK_N)
    qk_scale, qrow, qmin, m_i, l_i, o0, o1, o2, o3 = _softmax_start(cache_len, tile, scale, NH,
                                                                    s_layout, o_layout)
    s0 = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    n_pairs = gl.cdiv(n_blocks, 2)
    for i in range(n_pairs):
        jo = 2 * i + WG
        jt = 2 * i + OTHER
        so = jo % STAGES
        st = jt % STAGES
        n0 = lo + jo * BLOCK_N
        _wait_ready(ready, jo, n_blocks, STAGES)
        s = warpgroup_mma_wait(0, deps=[_scores(q_smem, ring, so, s0, NCK)])
        t = _masked_scores(s, qrow, n0, hi, qmin, qk_scale, s_layout, BLOCK_N)
        m_new = gl.maximum(m_i, gl.max(t, 1))
        x_smem.index(WG).store(m_new)
        _release(x_ready.index(WG))
        mbarrier.wait(x_ready.index(OTHER), i & 1)
        m_new = gl.maximum(m_new, x_smem.index(OTHER).load(row_s))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(t - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        ar = gl.convert_layout(alpha, row_o)[:, None]
        o0 = o0 * ar
        o1 = o1 * ar
        o2 = o2 * ar
        o3 = o3 * ar
        mbarrier.wait(p_free.index(WG), (i & 1) ^ 1)
        p_smem.index(WG).store(p.to(p_smem.dtype))
        fence_async_shared()
        # P stored first, so that its registers are free while the tail is zeroed.
        if n0 + BLOCK_N > hi:   # rows past the end (all of a block that does not exist)
            _zero_tail(ring, so, n0, hi, NCV, NCK, BLOCK_N)
        _release(p_ready.index(WG))
        # Own P from shared memory as well (as a register operand it would hold 16 more).
        o0, o1, o2, o3 = _pv4(p_smem.index(WG), ring, so * NCK + COL, o0, o1, o2, o3)
        _wait_ready(ready, jt, n_blocks, STAGES)
        mbarrier.wait(p_ready.index(OTHER), i & 1)
        o0, o1, o2, o3 = _pv4(p_smem.index(OTHER), ring, st * NCK + COL, o0, o1, o2, o3)
        o0, o1, o2, o3 = warpgroup_mma_wait(0, deps=[o0, o1, o2, o3])
        # The pair's products are done: its slots and the other's P are free.
        _release(p_free.index(OTHER))
        _release(empty.index(so), jo < n_blocks)
        _release(empty.index(st), jt < n_blocks)
    _store_half(o_part_ptr, tile, seq_start, n_new, part, num_parts, o0, o1, o2, o3,
                COL * CHUNK, NH, RP)
    # The row sums: each warpgroup summed its own blocks' P (under the common max).
    if WG == 1:
        x_smem.index(1).store(l_i)
        _release(x_ready.index(1))
    else:
        mbarrier.wait(x_ready.index(1), n_pairs & 1)
        l_i = l_i + x_smem.index(1).load(row_s)
        slot, keep = _tile_rows(tile, seq_start, n_new, part, num_parts, NH, row_s)
        gl.store(ml_ptr + slot * 2, m_i, mask=keep)
        gl.store(ml_ptr + slot * 2 + 1, l_i, mask=keep)


@gluon.jit
def mla_absorbed_seesaw_kernel(qlat_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr, o_part_ptr,
                               ml_ptr, max_pages, layer_idx, num_layers, num_pages, scale,
                               part_size, num_parts, NH: gl.constexpr, R: gl.constexpr,
                               ROPE: gl.constexpr, RP: gl.constexpr, EP: gl.constexpr,
                               KINDS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               VSPLIT: gl.constexpr, PRECISION: gl.constexpr,
                               STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """mla_absorbed_ws_kernel's launch and constraints (num_warps=4 launched; warp_specialize
    adds warpgroup 1 and the loader warp)."""
    _check_sizes(BLOCK_M, R, ROPE, PAGE_SIZE, BLOCK_N)
    W: gl.constexpr = R + ROPE
    NCK: gl.constexpr = W // CHUNK
    NCV: gl.constexpr = R // CHUNK
    dtype: gl.constexpr = qlat_ptr.dtype.element_ty
    tile, part, seq_start, n_new, cache_len, _, lo, hi, n_blocks = _program(
        offs_ptr, clen_ptr, max_pages, part_size, NH, PAGE_SIZE, BLOCK_N)
    if tile * ROWS < n_new * NH:
        q_smem = _q_tiles(qlat_ptr, seq_start, n_new, tile, NH, W, NCK)
        ring, ready, empty, desc = _latent_ring(blocks_ptr, num_pages, num_layers, KINDS,
                                                PAGE_SIZE, W, NCK, BLOCK_N, STAGES)
        p_smem = gl.allocate_shared_memory(
            dtype, [2, ROWS, BLOCK_N], gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_N],
                                                                            dtype))
        x_smem = gl.allocate_shared_memory(gl.float32, [2, ROWS],
                                           gl.SwizzledSharedLayout(1, 1, 1, [0]))
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        x_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        p_free = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        for w in gl.static_range(2):
            mbarrier.init(x_ready.index(w), count=1)
            mbarrier.init(p_ready.index(w), count=1)
            mbarrier.init(p_free.index(w), count=1)
        fence_async_shared()
        gl.thread_barrier()
        LEFT: gl.constexpr = 0     # the warpgroups' roles
        RIGHT: gl.constexpr = 1
        gl.warp_specialize(
            [(_consumer, (q_smem, ring, ready, empty, p_smem, x_smem, x_ready, p_ready, p_free,
                          offs_ptr, clen_ptr, o_part_ptr, ml_ptr, max_pages, part_size, num_parts,
                          scale, LEFT, NH, NCK, NCV, RP, PAGE_SIZE, BLOCK_N, STAGES)),
             (_consumer, (q_smem, ring, ready, empty, p_smem, x_smem, x_ready, p_ready, p_free,
                          offs_ptr, clen_ptr, o_part_ptr, ml_ptr, max_pages, part_size, num_parts,
                          scale, RIGHT, NH, NCK, NCV, RP, PAGE_SIZE, BLOCK_N, STAGES)),
             (_loader, (desc, ring, ready, empty, lut_ptr, gl.program_id(2), lo, n_blocks,
                        max_pages, layer_idx, num_layers, num_pages, KINDS, PAGE_SIZE, BLOCK_N,
                        NCK, STAGES))],
            [4, 1], [CONSUMER_REGS, LOADER_REGS])
