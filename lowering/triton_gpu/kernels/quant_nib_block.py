"""The one-row GEMV over the nib layout (ops/quant/nib_layout.py) with a lane's four words of a
step in one 32-value block, so each block's affine terms are loaded, decoded and applied once to
its chained products rather than once a word, as quant_nib.nib_gemv_kernel does (Q4_K's loop: 6.4
-> 4.6 SASS instructions a weight value; BENCHMARKS.md nib round 6). Q6_K's two 16-value halves
of a block take their scales in one 8-byte load and share one d load (14 -> 12 loads a step:
2% on the H100, the thirty-first session). Q4_K's blocks take no supers load: each super-block's
float16 d / dmin come from the spare bits of its 8 blocks' scales, gathered across their lanes
(6%, the thirty-second). The decode (nibble planes, Q6_K's crumbs, the X-octet chain) is
quant_nib's; launch specs and buckets: quant_nib_config.py.
"""
from __future__ import annotations

import triton
import triton.language as tl
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from .quant_nib import (_octet_dot, _planes, _q6_planes, _row_out, _small, _walk, block_affine,
                        q4_k_terms)


@triton.jit
def _word_dot(t, xs, words, h, xp, DT: tl.constexpr, FMT: tl.constexpr, OFF: tl.constexpr):
    """t + one code word's products with its X octet (at xp), decoded here (the block GEMV's
    lane has the word alone), and xs + the octet's sum where the format's offset needs it; h:
    q6_k's crumbs of the word (shifted to bit 0), unread otherwise."""
    if FMT == 5:
        q0, q1, q2, q3, q4, q5, q6, q7 = _q6_planes(words, h)
        t, _ = _octet_dot(t, xp, q0, q1, q2, q3, q4, q5, q6, q7, DT, FMT, OFF)
    else:
        q0, q1, q2, q3, q4, q5, q6, q7 = _planes(words, OFF)
        t, xo = _octet_dot(t, xp, q0, q1, q2, q3, q4, q5, q6, q7, DT, FMT, OFF)
        if OFF == 0:
            xs = xs + xo
    return t, xs


@triton.jit
def _q6_pair_scales(s_ptr, z_ptr, g, b, nblk):
    """q6_k's scales `[BG, NQ, 4]` of 16-value halves 2 b and 2 b + 1 (nblk counts halves): the
    eight int8 sub-block scales of a row group's two halves are adjacent, so one 8-byte load
    (two words, row r at byte r) brings both, and both halves share one float16 d (16 halves
    a d), loaded once (block_affine, once a half, loads each twice)."""
    g64 = g.to(tl.int64)[:, None, None]
    # int32 word g nblk + h holds the four rows' scales of half h; nblk = K / 16 is even (K a
    # multiple of 256 for q6_k), so the pair starts 8-byte aligned and loads as one
    at = tl.multiple_of(g64 * nblk + (2 * b)[None, :, None], [1, 1, 2])
    w2 = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + at + tl.arange(0, 2)[None, None, :])
    w0, w1 = tl.split(w2)
    r4 = tl.arange(0, 4)[None, None, :]
    d = tl.load(z_ptr.to(tl.pointer_type(tl.float16)) + g64 * (nblk // 16 * 4)
                + (2 * b // 16 * 4)[None, :, None] + r4).to(tl.float32)
    return d * _sbyte(w0[:, :, None], r4), d * _sbyte(w1[:, :, None], r4)


@triton.jit
def _sbyte(w, r):
    """Byte r of words w as the float of its signed (int8) value: flipping the sign bit makes
    it the unsigned value + 128."""
    u = ((w ^ -0x7F7F7F80) >> (8 * r)) & 0xFF    # -0x7F7F7F80: the int32 0x80808080
    return _small(u, 128)


@triton.jit
def _partner(x, M: tl.constexpr):
    """x `[BG, NQ]` of block i ^ M for each block i (a butterfly between the lanes holding
    them: tl.flip of a size-2 axis, one shuffle)."""
    BG: tl.constexpr = x.shape[0]
    NQ: tl.constexpr = x.shape[1]
    return tl.reshape(tl.flip(tl.reshape(x, (BG, NQ // (2 * M), 2, M)), 2), (BG, NQ))


@triton.jit
def _q4k_spare_terms(s_ptr, g, b, nblk, k1, k2, k4):
    """q4_k's (s, m) of blocks b `[NQ]` (NQ a multiple of 8, b[0] too) with no supers load:
    block k of a super-block carries 16 bits of row k // 2's (d, dmin) word in its four rows'
    spare bits (ops/quant/nib_layout.py), so the four words are an all-gather over the
    super-block's 8 lanes: 4 shuffles (a butterfly, the data doubling each stage) where a
    sum of each row's parts over the 8 lanes took 12. k1, k2, k4 `[1, NQ]`: bits 0, 1, 2 of
    each block's place in its super-block. Saves 1/37 of the bytes read (the layout's 4.625
    bits a value fall to the checkpoint's 4.5) and one load of the step's ten: 16.10 -> 15.15
    us at 14336 x 4096, 7.02 -> 6.60 at 4096 x 4096 (H100; BENCHMARKS.md, thirty-second
    session), where summing each row over the 8 lanes gained 3.7% / 4.6%."""
    g64 = g.to(tl.int64)[:, None, None]
    r4 = tl.arange(0, 4)[None, None, :]
    v = tl.load(s_ptr.to(tl.pointer_type(tl.uint16)) + g64 * (nblk * 4) + (b * 4)[None, :, None]
                + r4).to(tl.uint32)
    half = tl.sum(((v >> 6) & 0x0303) << (2 * r4), axis=2)      # disjoint bits: the sum is an OR
    w = half << (16 * k1)
    w = w | _partner(w, 1)                # row k // 2's word, whole
    o = _partner(w, 2)
    w0 = tl.where(k2 == 1, o, w)          # the quad's rows 2 (k // 4) and 2 (k // 4) + 1
    w1 = tl.where(k2 == 1, w, o)
    o0 = _partner(w0, 4)
    o1 = _partner(w1, 4)
    d0 = tl.where(k4 == 1, o0, w0)
    d1 = tl.where(k4 == 1, o1, w1)
    d2 = tl.where(k4 == 1, w0, o0)
    d3 = tl.where(k4 == 1, w1, o1)
    BG: tl.constexpr = v.shape[0]
    NQ: tl.constexpr = v.shape[1]
    dd = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BG, NQ, 4))
    return q4_k_terms(v, dd)


@triton.jit
def _block_fetch(wp, hp, s_ptr, z_ptr, g, jb, step, nblk, kb, FMT: tl.constexpr,
                 GROUP: tl.constexpr, NQ: tl.constexpr, WEV: tl.constexpr, SPARE: tl.constexpr):
    """Step `step`'s four code words of each of NQ blocks `[BG, NQ, 4]` (word columns 4 b + 0..3),
    q6_k's two crumb words (columns 2 b, 2 b + 1: the code words again otherwise) and the
    affine terms: (s, m) of the block, or q6_k's scales of its two 16-value halves. WEV: the
    weight's words loaded evict-first, so that X, which every program reads, keeps its cache
    lines (2-6% faster on the H200 at every format and weight: BENCHMARKS.md nib round 8).
    SPARE: q4_k's d / dmin gathered from the scales' spare bits (operands made by nib_repack
    only; others may not carry them) when a step spans whole super-blocks."""
    o = step * (NQ * 16)
    EV: tl.constexpr = "evict_first" if WEV else ""
    w0 = tl.load(wp + o, eviction_policy=EV)
    w1 = tl.load(wp + o + 4, eviction_policy=EV)
    w2 = tl.load(wp + o + 8, eviction_policy=EV)
    w3 = tl.load(wp + o + 12, eviction_policy=EV)
    b = jb + step * NQ
    if FMT == 5:
        c0 = tl.load(hp + step * (NQ * 8), eviction_policy=EV)
        c1 = tl.load(hp + step * (NQ * 8) + 4, eviction_policy=EV)
        s, m = _q6_pair_scales(s_ptr, z_ptr, g, b, nblk)
    elif FMT == 2 and SPARE and NQ % 8 == 0:
        c0 = w0
        c1 = w0
        s, m = _q4k_spare_terms(s_ptr, g, b, nblk, kb & 1, (kb >> 1) & 1, kb >> 2)
    else:
        c0 = w0
        c1 = w0
        s, m = block_affine(s_ptr, z_ptr, g, b, nblk, FMT, GROUP)
    return w0, w1, w2, w3, c0, c1, s, m


@triton.jit
def nib_gemv_block_kernel(x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, c_ptr, M, N, K, cols_per_split,
                          FMT: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr,
                          BG: tl.constexpr, NJ: tl.constexpr, SPLIT_K: tl.constexpr,
                          WEV: tl.constexpr, SPARE: tl.constexpr):
    pdl_wait()
    # The one-row GEMV with a lane's four words of a step in one 32-value block (NJ / 4 blocks
    # a step, a block's word q in the q-th of four tiles), so its affine terms are loaded and
    # decoded once a block, not once a word, and applied once to the block's chained products
    # (q6_k: once a 16-value half); nib_gemv_kernel spends that per word. One row of X a
    # program; the next step's words and terms are loaded before this one is decoded.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    NQ: tl.constexpr = NJ // 4
    g, _, steps, nblk, _, _, _ = _walk(q_ptr, h_ptr, pid_n, pid_k, N, K, cols_per_split, FMT,
                                       BG, NJ)
    kw = K // 8
    jb = pid_k * cols_per_split // 4 + tl.arange(0, NQ)
    r4 = tl.arange(0, 4)[None, None, :]
    g64 = g.to(tl.int64)[:, None, None]
    wp = q_ptr + g64 * (kw * 4) + (jb * 16)[None, :, None] + r4
    hp = h_ptr.to(tl.pointer_type(tl.int32)) + g64 * (kw // 2 * 4) + (jb * 8)[None, :, None] + r4
    XW: tl.constexpr = 8 if DT == 0 else 4
    xrow = x_ptr + pid_m.to(tl.int64) * K
    if DT != 0:
        xrow = xrow.to(tl.pointer_type(tl.uint32))
    xp = tl.broadcast_to(xrow + (jb * (4 * XW))[None, :, None] + tl.arange(0, 4)[None, None, :],
                         (BG, NQ, 4))
    OFF: tl.constexpr = 8 if FMT == 0 or FMT == 4 else 0
    acc = tl.zeros((BG, NQ, 4), tl.float32)
    zx = tl.zeros((BG, NQ), tl.float32)
    # q4_k: each block's place in its super-block (a step moves NQ blocks: the same every step
    # when NQ % 8 == 0, as the gather of its terms asks).
    kb = (jb % 8)[None, :]
    nxt = _block_fetch(wp, hp, s_ptr, z_ptr, g, jb, 0, nblk, kb, FMT, GROUP, NQ, WEV, SPARE)
    for it in range(steps):
        w0, w1, w2, w3, c0, c1, s, m = nxt
        # Past the last step: the last again (in bounds, unused).
        nxt = _block_fetch(wp, hp, s_ptr, z_ptr, g, jb, tl.minimum(it + 1, steps - 1), nblk,
                           kb, FMT, GROUP, NQ, WEV, SPARE)
        xs = xp + it * (NQ * 4 * XW)
        t = tl.zeros((BG, NQ, 4), tl.float32)
        t, xsum = _word_dot(t, zx, w0, c0, xs, DT, FMT, OFF)
        if FMT == 5:
            t, xsum = _word_dot(t, xsum, w1, c0 >> 16, xs + XW, DT, FMT, OFF)
            acc = tl.fma(s, t, acc)
            t = tl.zeros((BG, NQ, 4), tl.float32)
            t, xsum = _word_dot(t, xsum, w2, c1, xs + 2 * XW, DT, FMT, OFF)
            t, xsum = _word_dot(t, xsum, w3, c1 >> 16, xs + 3 * XW, DT, FMT, OFF)
            acc = tl.fma(m, t, acc)     # m: the second half's scale
        else:
            t, xsum = _word_dot(t, xsum, w1, c0, xs + XW, DT, FMT, OFF)
            t, xsum = _word_dot(t, xsum, w2, c0, xs + 2 * XW, DT, FMT, OFF)
            t, xsum = _word_dot(t, xsum, w3, c0, xs + 3 * XW, DT, FMT, OFF)
            acc = tl.fma(s, t, acc)
            if OFF == 0:
                acc = tl.fma(m, xsum[:, :, None], acc)
    rn = pid_n * (BG * 4) + tl.arange(0, BG * 4)
    _row_out(acc, c_ptr, pid_m, pid_k, M, N, rn, SPLIT_K)
