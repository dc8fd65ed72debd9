"""The one-row 4-bit GEMV on integer dot products: X quantized to int8 per 32-value block (a
float32 scale each, as llama.cpp's Q8_1 activations for its mmvq kernels), the weight's 4-bit
codes multiplied with it four at a time by `dp4a` over the nib layout (ops/quant/nib_layout.py).

Why: the float GEMV (quant_nib_block.py) is bound by instruction issue (ncu, Q4_0 14336 x 4096,
one row: 69% of issue slots busy, DRAM at 49%): a mask-or, a subtraction and an FMA a weight
value. Here a code word (eight values of one row) costs a mask, a shift-and-mask and two dp4a:
its low nibbles are values 0, 2, 4, 6 of the word's octet and its high nibbles 1, 3, 5, 7, so X's
octet is stored as two int32 words in that order (`quantize_x_q8_kernel`). Per block and row the
int32 sum is scaled once: y += sx (s sum(c xq) + m sum(xq)), with (s, m) the block's affine
terms (quant_nib.block_affine: q4_0, q4_1, q4_k, GPTQ with or without zero points).

Numerics: not the float GEMV's. X is rounded to 8 bits per block (half away from zero at
scale max|x| / 127), which is what llama.cpp's GPU kernels do; the products and their sums
are exact integers, so the only new error is X's rounding (~0.2% of a block's largest value).
Under Triton's interpreter, which has no inline PTX, dp4a is integer arithmetic on the bytes.
"""
from __future__ import annotations

import triton
import triton.language as tl
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from .quant_nib import _ASM, block_affine


@triton.jit
def _dp4a(a, b, c):
    """c + the dot product of a's four unsigned bytes with b's four signed bytes."""
    if _ASM:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for k in tl.static_range(4):
            ua = (a >> (8 * k)) & 0xFF
            sb = ((b >> (8 * k)) & 0xFF) ^ 0x80
            r = r + ua * (sb - 0x80)      # the byte sign-extended: (v ^ 128) - 128
    return r


@triton.jit
def quantize_x_q8_kernel(x_ptr, xq_ptr, xs_ptr, xsum_ptr, K, BLOCKS: tl.constexpr):
    """X [M, K] (16- or 32-bit floats) -> xq int32 [M, K / 4] (octet j of a row as the words
    (values 8 j + 0, 2, 4, 6) and (8 j + 1, 3, 5, 7), one signed byte each, lowest first),
    xs float32 [M, K / 32] (a block's scale max|x| / 127) and xsum int32 [M, K / 32] (the sum of
    its quantized values). A program takes BLOCKS 32-value blocks of one row."""
    pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    nblk = K // 32
    ok = b < nblk
    v = tl.load(x_ptr + row * K + (b * 32)[:, None] + tl.arange(0, 32)[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)
    scale = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    t = v * inv[:, None]
    qi = (tl.where(t < 0, -tl.floor(-t + 0.5), tl.floor(t + 0.5))).to(tl.int32)
    qi = tl.minimum(tl.maximum(qi, -127), 127)
    # [BLOCKS, 4 octets, 4 pairs, 2]: value 8 o + 2 p + e; word e of octet o packs its 4 p.
    even, odd = tl.split(tl.reshape(qi, (BLOCKS, 4, 4, 2)))
    sh = (8 * tl.arange(0, 4))[None, None, :]
    lo = tl.sum((even & 0xFF) << sh, axis=2)          # disjoint bytes: the sum is an OR
    hi = tl.sum((odd & 0xFF) << sh, axis=2)
    words = tl.reshape(tl.join(lo, hi), (BLOCKS, 8))   # octet o's words at 2 o, 2 o + 1
    tl.store(xq_ptr + row * (K // 4) + (b * 8)[:, None] + tl.arange(0, 8)[None, :], words,
             mask=ok[:, None])
    tl.store(xs_ptr + row * nblk + b, scale, mask=ok)
    tl.store(xsum_ptr + row * nblk + b, tl.sum(qi, axis=1), mask=ok)


@triton.jit
def _fetch(wp, xp, step, NQ: tl.constexpr):
    """Step `step`'s code words `[BG, NQ, 4]` (word columns 4 b + 0..3 of each block b, four
    rows along the last axis) and X's eight words of each block `[1, NQ, 1]`."""
    o = step * (NQ * 16)
    xo = step * (NQ * 8)
    return (tl.load(wp + o), tl.load(wp + o + 4), tl.load(wp + o + 8), tl.load(wp + o + 12),
            tl.load(xp + xo), tl.load(xp + xo + 1), tl.load(xp + xo + 2), tl.load(xp + xo + 3),
            tl.load(xp + xo + 4), tl.load(xp + xo + 5), tl.load(xp + xo + 6),
            tl.load(xp + xo + 7))


@triton.jit
def _word(d, w, xlo, xhi):
    d = _dp4a(w & 0x0F0F0F0F, xlo, d)
    return _dp4a((w >> 4) & 0x0F0F0F0F, xhi, d)


@triton.jit
def nib_gemv_q8_kernel(xq_ptr, xs_ptr, xsum_ptr, q_ptr, s_ptr, z_ptr, c_ptr, M, N, K,
                       FMT: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr,
                       NQ: tl.constexpr):
    pdl_wait()
    # One row of X a program (pid 0), BG row groups of four weight rows (pid 1), all of K in
    # steps of NQ blocks, a lane's four words of a step in one block; the next step's words
    # are loaded before this one's are multiplied. The launcher guarantees K % (32 NQ) == 0.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    kw = K // 8
    nblk = K // 32
    steps = nblk // NQ
    g = tl.minimum(pid_n * BG + tl.arange(0, BG), (N + 3) // 4 - 1)
    jb = tl.arange(0, NQ)
    r4 = tl.arange(0, 4)[None, None, :]
    wp = q_ptr + g.to(tl.int64)[:, None, None] * (kw * 4) + (jb * 16)[None, :, None] + r4
    xp = xq_ptr + pid_m * (K // 4) + (jb * 8)[None, :, None]
    acc = tl.zeros((BG, NQ, 4), tl.float32)
    nxt = _fetch(wp, xp, 0, NQ)
    for it in range(steps):
        w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7 = nxt
        nxt = _fetch(wp, xp, tl.minimum(it + 1, steps - 1), NQ)   # past the last: in bounds
        d = tl.zeros((BG, NQ, 4), tl.int32)
        d = _word(d, w0, x0, x1)
        d = _word(d, w1, x2, x3)
        d = _word(d, w2, x4, x5)
        d = _word(d, w3, x6, x7)
        b = it * NQ + jb
        s, m = block_affine(s_ptr, z_ptr, g, b, nblk, FMT, GROUP)
        sx = tl.load(xs_ptr + pid_m * nblk + b)[None, :, None]
        xsum = tl.load(xsum_ptr + pid_m * nblk + b).to(tl.float32)[None, :, None]
        acc += sx * (s * d.to(tl.float32) + m * xsum)
    y = tl.reshape(tl.sum(acc, axis=1), (BG * 4,))
    rn = pid_n * (BG * 4) + tl.arange(0, BG * 4)
    tl.store(c_ptr + pid_m * N + rn, y.to(c_ptr.dtype.element_ty), mask=rn < N)


def q8_specs(fmt: str, dtype: str, bg: int = 1, nq: int = 32, warps: int = 1,
             group: int = 32) -> list:
    """[quantize X, GEMV] launch specs for a nib weight of format `fmt` (4-bit formats) and X of
    `dtype`; the GEMV's grid (M, N / (4 bg)), the quantizer's (M, K / (32 QB))."""
    from .quant_nib_config import _fmt_id
    from .spec import KernelSpec, cdiv, triton_dtype

    if fmt == "q6_k":
        raise ValueError("nib q8 GEMV: 4-bit formats only (q6_k's codes are 6 bits)")
    t = triton_dtype(dtype)
    qb = 8
    quant = KernelSpec(
        name=f"nib_q8_quantize_x_{t}", fn=quantize_x_q8_kernel,
        signature={"x_ptr": f"*{t}", "xq_ptr": "*i32", "xs_ptr": "*fp32", "xsum_ptr": "*i32",
                   "K": "i32", "BLOCKS": "constexpr"},
        constexprs=dict(BLOCKS=qb), num_warps=1, num_stages=1,
        grid=lambda M, K: (M, cdiv(K // 32, qb), 1), grid_args=("M", "K"),
        divisible_by_16=("x_ptr", "xq_ptr", "xs_ptr", "xsum_ptr", "K"))
    consts = dict(FMT=_fmt_id(fmt), GROUP=group, BG=bg, NQ=nq)
    gemv = KernelSpec(
        name=f"nib_{fmt}_gemvq8_g{bg}q{nq}_{t}_w{warps}", fn=nib_gemv_q8_kernel,
        signature={"xq_ptr": "*i32", "xs_ptr": "*fp32", "xsum_ptr": "*i32", "q_ptr": "*i32",
                   "s_ptr": "*u8", "z_ptr": "*u8", "c_ptr": f"*{t}", "M": "i32", "N": "i32",
                   "K": "i32", **{k: "constexpr" for k in consts}},
        constexprs=consts, num_warps=warps, num_stages=1,
        grid=lambda M, N: (M, cdiv(N, 4 * bg), 1), grid_args=("M", "N"),
        divisible_by_16=("xq_ptr", "xs_ptr", "xsum_ptr", "q_ptr", "s_ptr", "z_ptr", "c_ptr", "K"))
    return [quant, gemv]
