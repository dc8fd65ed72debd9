"""A deeper software pipeline for the warp-specialized prefill consumers (DEEP configs).

The consumer loop of flash_attention_wgmma._ws_attend issues S_j = Q K_j^T and waits for it
before block j's softmax: the softmax overlaps only the P V product of block j - 1, and each
block pays S_j's latency. Here S_{j+1} is issued before block j's softmax, so the softmax runs
while both tensor-core products are in flight (FlashAttention-3's intra-warpgroup overlap one
step further). Per block:

    issue O += P_{j-1} V_{j-1}      (in flight: S_j, PV_{j-1})
    wait until one group is left    (S_j done: groups complete in issue order)
    issue S_{j+1} = Q K_{j+1}^T     (in flight: PV_{j-1}, S_{j+1})
    softmax of S_j
    wait until one group is left    (PV_{j-1} done, S_{j+1} still in flight)
    release K_j and V_{j-1}; rescale O

The price is a second score tile in registers (64 a thread at 128-key blocks): it fits at
head dim 64 (the other live tiles are O, 32 registers, and two P operands of 32), not at 128.
(Head dim 128 with 64-key blocks fits too and ran correctly, but slower than 128-key blocks
without it: BENCHMARKS.md, 2026-12-05.)
K_j's slot is released after block j's softmax rather than before, so the ring wants a third
stage for the loader to stay a block ahead. A tile of a single key block takes the plain loop.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, warpgroup_mma,
                                                             warpgroup_mma_wait)

from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
    _softmax, _ws_attend, _ws_last_pv, _ws_release, _ws_start, warpgroup_acc_layout,
    warpgroup_p_layout)


@gluon.jit
def _issue_s(q, k_ring, k_ready, g, s0, STAGES: gl.constexpr):
    """S = Q K^T of the block at global ring index g, once its K has landed (async)."""
    slot = g % STAGES
    mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
    return warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s0, use_acc=False,
                         is_async=True)


@gluon.jit
def _deep_step(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, p, o, s_next, m_i, l_i,
               qp, g, n0, end, full_lo, full_hi, window, qk_scale, s0,
               MASK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               NEXT: gl.constexpr):
    """Block j (global index g, first key n0) with S_j in flight: returns (p_j as the P V
    operand, o, s_next, m, l). NEXT issues S_{j+1}; without it the step drains."""
    s_layout: gl.constexpr = s0.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o.type.layout)
    slot = g % STAGES
    prev = (g - 1) % STAGES
    mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
    o = warpgroup_mma(p, v_ring.index(prev), o, is_async=True)
    s = warpgroup_mma_wait(1, deps=[s_next])
    if NEXT:
        s_next = _issue_s(q, k_ring, k_ready, g + 1, s0, STAGES)
    masked = (n0 < full_lo) | (n0 + BLOCK_N > full_hi)
    p_next, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, n0, end, window, qk_scale, masked,
                                       s_layout, MASK, BLOCK_N)
    # The next P passes through the wait (flash_attention_wgmma._ws_blocks says why).
    p_next = gl.convert_layout(p_next.to(p.dtype), p.type.layout)
    if NEXT:
        o, _, p_next = warpgroup_mma_wait(1, deps=[o, p, p_next])
    else:
        o, _, p_next = warpgroup_mma_wait(0, deps=[o, p, p_next])
    _ws_release(k_empty, slot)
    mbarrier.arrive(v_empty.index(prev))
    o = o * gl.convert_layout(alpha, row_o)[:, None]
    return p_next, o, s_next, m_i, l_i


@gluon.jit
def _ws_attend_deep(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed, it,
                    fix_phase, q_lo, kv_len, start, end, full_lo, full_hi, n_blocks, window,
                    scale, WG: gl.constexpr, D: gl.constexpr, MASK: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """_ws_attend's contract (the persistent kernel's form: the last V slot is released)."""
    if n_blocks < 2:
        o, l_i = _ws_attend(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
                            fixed, it, fix_phase, q_lo, kv_len, start, end, full_lo, full_hi,
                            n_blocks, window, scale, WG, D, MASK, BLOCK_N, STAGES, 0, 1)
    else:
        s_layout: gl.constexpr = warpgroup_acc_layout(BLOCK_N)
        p_layout: gl.constexpr = warpgroup_p_layout(D)
        qk_scale, qp, m_i, l_i, o, s0 = _ws_start(q_lo, scale, WG, D, BLOCK_N)

        s = warpgroup_mma_wait(0, deps=[_issue_s(q, k_ring, k_ready, it, s0, STAGES)])
        s_a = _issue_s(q, k_ring, k_ready, it + 1, s0, STAGES)
        _ws_release(k_empty, it % STAGES)
        masked = (start < full_lo) | (start + BLOCK_N > full_hi)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, start, end, window, qk_scale, masked,
                                      s_layout, MASK, BLOCK_N)
        p = gl.convert_layout(p.to(q.dtype), p_layout)
        # Two steps an iteration, the in-flight score tile alternating between s_a and s_b:
        # with one name, the loop's back edge would copy the tile in flight (both tiles are
        # live across the step), and ptxas serializes every wgmma of a kernel that reads an
        # accumulator in flight.
        for jj in range(0, (n_blocks - 2) // 2):
            j = 1 + 2 * jj
            p, o, s_b, m_i, l_i = _deep_step(
                q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, p, o, s_a, m_i, l_i, qp,
                it + j, start + j * BLOCK_N, end, full_lo, full_hi, window, qk_scale, s0, MASK,
                BLOCK_N, STAGES, 1)
            p, o, s_a, m_i, l_i = _deep_step(
                q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, p, o, s_b, m_i, l_i, qp,
                it + j + 1, start + (j + 1) * BLOCK_N, end, full_lo, full_hi, window, qk_scale,
                s0, MASK, BLOCK_N, STAGES, 1)
        j = n_blocks - 1
        if n_blocks % 2 == 1:
            # One more step with a block after it, then the last from s_b.
            p, o, s_odd, m_i, l_i = _deep_step(
                q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, p, o, s_a, m_i, l_i, qp,
                it + j - 1, start + (j - 1) * BLOCK_N, end, full_lo, full_hi, window, qk_scale,
                s0, MASK, BLOCK_N, STAGES, 1)
            p, o, s_end1, m_i, l_i = _deep_step(
                q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, p, o, s_odd, m_i, l_i, qp,
                it + j, start + j * BLOCK_N, end, full_lo, full_hi, window, qk_scale, s0, MASK,
                BLOCK_N, STAGES, 0)
        else:
            p, o, s_end2, m_i, l_i = _deep_step(
                q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, p, o, s_a, m_i, l_i, qp,
                it + j, start + j * BLOCK_N, end, full_lo, full_hi, window, qk_scale, s0, MASK,
                BLOCK_N, STAGES, 0)
        o = _ws_last_pv(p, o, v_ring, v_ready, v_empty, fixed, it + j, fix_phase,
                        start + j * BLOCK_N, kv_len, WG, D, BLOCK_N, STAGES, 1)
    return o, l_i
