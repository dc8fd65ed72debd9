"""4-bit (and Q6_K) matmul for up to 8 rows of 16-bit X on the tensor cores, one warp-wide MMA per
16 weight rows and 16 values of K, over the nib layout as it is stored (ops/quant/nib_layout.py).

The GEMV (quant_nib.py) spends a mask-or, a subtraction and an FMA per weight value and row of
X. Here the per-value work is the decode alone, two values an instruction into bfloat16 /
float16 (a mask-or and a packed subtraction; a packed FMA with the block's scale and offset
where the codes are not symmetric), and mma.sync m16n8k16 multiplies a 16 x 16 weight tile by
the 8 columns of X^T (rows of X: up to 8 a program; past M they re-read the last, dropped on
store), whatever the row count.

No shared memory: each lane loads exactly the words its MMA fragment needs, because the MMA's
K order and row order are free (a permutation applied to both operands, or undone at the store,
leaves the product unchanged). Lane (r, q) (r = lane // 4, q = lane % 4) loads, for a 32-value
block b, word column 4 b + q of row group r (four rows, 16 bytes: nibble i of a row's word is
value 32 b + 8 q + i of K): rows 0 and 1 of the group are the MMA rows r and r + 8 of tile 0,
rows 2 and 3 those of tile 1. The first MMA of a block takes nibbles (0, 4) as its columns
(2q, 2q + 1) and (1, 5) as (2q + 8, 2q + 9); the second (2, 6) and (3, 7): a pair (i, i + 4)
sits at bits 4 i and 16 + 4 i of the word, so one mask-or makes both halves of the packed
register. The lane's column of X^T (row r of X) gives the right operand at the same K values.

Triton has no warp-level MMA on values a kernel places itself, so the MMA is inline PTX over
1-D "lane" tensors: a tensor of 32 W elements (W warps) in Triton's default layout puts element
p in lane p % 32 of warp p // 32, and `[32 W, 4]` loads of 16 bytes a lane split into four of
them for free. Every value the asm reads is made per lane, so nothing asks Triton for another
layout; tests/lowering/triton_gpu/test_quant_nib_aot.py checks the compiled kernel for that
layout and for no layout conversion inside its loop. Under Triton's interpreter (no PTX)
`_mma_plain` computes the same sums across the lanes with reshapes; the PTX itself is checked
by a numpy emulator (tests/lowering/triton_gpu/test_quant_nib_mma_ptx.py).

Numerics: symmetric codes (q4_0, GPTQ without zero points) are exact in X's type: the MMA sums
them against X exactly in float32 and each block's sums are scaled in float32 (SA), as the GEMV
computes; other formats round each weight value s c + m once to X's type (s, m rounded first),
as the tensor-core kernel and the decode-into-scratch path do.
"""
from __future__ import annotations

import triton
import triton.language as tl
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from _nib_old.quant_nib import _ASM, affine_at, store_out
from graphir.lowering.triton_gpu.kernels.quant_nib_tc import _plane_plain


def _decode_pair(ty: str, dst: str, word: str, shift: int, s: str, m: str, kind: int,
                 crumbs: str, i: int) -> list[str]:
    """PTX decoding nibbles (i, i + 4) of `word` (at bits 4 i, 16 + 4 i) into the packed pair
    dst: kind 0 s c + m, 1 s (c - 8), 2 (q6_k) s (c + 16 crumb - 32), the crumbs of the pair
    at bits 2 i, 16 + 2 i of `crumbs`; 3 c - 8 (exact: the scale comes after the MMA)."""
    out = [f"shr.b32 t, {word}, {shift};" if shift else f"mov.b32 t, {word};",
           "lop3.b32 t, t, 0x000F000F, k, 0xEA;"]                   # (a & b) | c
    if kind == 2:
        sh = 4 - 2 * i      # the crumbs to bits 4-5 and 20-21
        out += [f"shl.b32 u, {crumbs}, {sh};" if sh > 0 else
                f"shr.b32 u, {crumbs}, {-sh};" if sh < 0 else f"mov.b32 u, {crumbs};",
                "lop3.b32 t, u, 0x00300030, t, 0xEA;"]
    if kind == 3:
        return out + [f"sub.rn.{ty} {dst}, t, k2;"]
    out.append(f"sub.rn.{ty} u, t, k2;")
    out.append(f"fma.rn.{ty} {dst}, u, {s}, {m};" if kind == 0 else f"mul.rn.{ty} {dst}, u, {s};")
    return out


def mma_block_asm(ty: str, magic: int, kind: int, xn: int = 1) -> str:
    """PTX for one 32-value block of one 16-row tile against xn sets of 8 rows of X: $0..$3 (and
    $4..$7 for the second set) the new accumulator fragments (float32), then from B = 4 xn:
    $B / $B+1 the code words of rows r / r + 8, $B+2 / $B+3 their float32 scales, $B+4 / $B+5
    their offsets (kind 0), $B+6 / $B+7 their crumb halves (q6_k), four of X's packed pairs
    (nibbles (0, 4) .. (3, 7)) a set from $B+8, and the accumulators after them. Kinds 0-2
    round each weight value to X's type (s and m first); kind 3 (symmetric codes) multiplies
    the exact codes and scales the block's float32 sums after the MMAs (four FMAs a tile and
    set, none a value). Each decoded pair feeds the MMAs of every set. The outputs are written
    last, so they may share registers with any input."""
    low = "bf16" if ty == "bf16x2" else "f16"
    off = magic + (8 if kind in (1, 3) else 32 if kind == 2 else 0)
    o = 4 * xn
    w0, w1, s0, s1, m0, m1, c0, c1 = (f"${o + i}" for i in range(8))
    xs = [[f"${o + 8 + 4 * j + i}" for i in range(4)] for j in range(xn)]
    acc = [[f"${o + 8 + 4 * xn + 4 * j + i}" for i in range(4)] for j in range(xn)]
    d = [[f"d{j}{i}" for i in range(4)] for j in range(xn)]
    lines = [".reg .b32 t, u, k, k2, z, sl, sh, ml, mh, cl, ch, a0, a1, a2, a3, "
             + ", ".join(r for dj in d for r in dj) + ";",
             f"mov.b32 k, 0x{magic:04X}{magic:04X};", f"mov.b32 k2, 0x{off:04X}{off:04X};"]
    if kind != 3:
        lines += [f"cvt.rn.{ty}.f32 sl, {s0}, {s0};", f"cvt.rn.{ty}.f32 sh, {s1}, {s1};"]
    if kind == 0:
        lines += [f"cvt.rn.{ty}.f32 ml, {m0}, {m0};", f"cvt.rn.{ty}.f32 mh, {m1}, {m1};"]
    if kind == 2:
        # Crumb i of the lane's half at bit 2 i, i + 4 at bit 8 + 2 i: bytes 0 and 1 to 0 and 2.
        lines += ["mov.b32 z, 0;", f"prmt.b32 cl, {c0}, z, 0x4140;",
                  f"prmt.b32 ch, {c1}, z, 0x4140;"]
    if kind == 3:
        lines.append("mov.b32 z, 0;")
    for h in range(2):
        for dst, word, scale, offset, crumbs, i in (
                ("a0", w0, "sl", "ml", "cl", 2 * h), ("a1", w1, "sh", "mh", "ch", 2 * h),
                ("a2", w0, "sl", "ml", "cl", 2 * h + 1), ("a3", w1, "sh", "mh", "ch", 2 * h + 1)):
            lines += _decode_pair(ty, dst, word, 4 * i, scale, offset, kind, crumbs, i)
        for j in range(xn):
            acc_in = ("z, z, z, z" if kind == 3 else ", ".join(acc[j])) if h == 0 else ", ".join(d[j])
            acc_out = ", ".join(f"${4 * j + i}" for i in range(4)) if h == 1 and kind != 3 \
                else ", ".join(d[j])
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{low}.{low}.f32 {{{acc_out}}}, "
                         f"{{a0, a1, a2, a3}}, {{{xs[j][2 * h]}, {xs[j][2 * h + 1]}}}, {{{acc_in}}};")
    if kind == 3:
        for j in range(xn):
            lines += [f"fma.rn.f32 ${4 * j + i}, {d[j][i]}, {s0 if i < 2 else s1}, {acc[j][i]};"
                      for i in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


_CONSTRAINTS = {xn: tl.constexpr(",".join(["=f"] * (4 * xn) + ["r", "r", "f", "f", "f", "f", "r", "r"]
                                         + ["r"] * (4 * xn) + ["f"] * (4 * xn)))
                for xn in (1, 2)}
_C1, _C2 = _CONSTRAINTS[1], _CONSTRAINTS[2]
_ASMS = {(dt, kind, xn): tl.constexpr(mma_block_asm("bf16x2" if dt == 1 else "f16x2",
                                                    0x4300 if dt == 1 else 0x6400, kind, xn))
         for dt in (1, 2) for kind in (0, 1, 2, 3) for xn in (1, 2)}
_BF16_AFFINE, _BF16_SYM, _BF16_Q6, _BF16_EXACT = (_ASMS[1, k, 1] for k in range(4))
_F16_AFFINE, _F16_SYM, _F16_Q6, _F16_EXACT = (_ASMS[2, k, 1] for k in range(4))
_BF16_AFFINE2, _BF16_SYM2, _BF16_Q62, _BF16_EXACT2 = (_ASMS[1, k, 2] for k in range(4))
_F16_AFFINE2, _F16_SYM2, _F16_Q62, _F16_EXACT2 = (_ASMS[2, k, 2] for k in range(4))


@triton.jit
def _rows(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight per-lane values `[32 W]` as each lane group's row `[W, 8, 32]`: lane (r, q) holds
    entries 8 q .. 8 q + 7 of row r (in one order, the same for the weight and for X)."""
    L: tl.constexpr = v0.shape[0]
    v = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)),
                tl.join(tl.join(v4, v5), tl.join(v6, v7)))
    return tl.reshape(v.to(tl.float32), (L // 32, 8, 32))


@triton.jit
def _lane_sums(a, x):
    """The MMA's sums for one weight row a lane group holds (a `[W, 8, 32]`) against X's rows
    (x `[W, 8, 32]`), back in the lanes: lane (r, q) gets a[r] . x[2 q] and a[r] . x[2 q + 1]."""
    W: tl.constexpr = a.shape[0]
    d = tl.sum(a[:, :, None, :] * x[:, None, :, :], axis=3)          # [W, 8 rows, 8 X rows]
    e0, e1 = tl.split(tl.reshape(d, (W, 8, 4, 2)))
    return tl.reshape(e0, (W * 32,)), tl.reshape(e1, (W * 32,))


@triton.jit
def _value(w, c, i: tl.constexpr, s, m, DTYPE: tl.constexpr, KIND: tl.constexpr):
    """Nibble i of the words w as the MMA's operand: the exact code minus 8 (KIND 3) or the
    weight value rounded as the PTX rounds it."""
    if KIND == 3:
        v = ((w >> (4 * i)) & 0xF).to(tl.float32) - 8.0
    else:
        v = _plane_plain(w, c, 0, i, s.to(DTYPE), m.to(DTYPE), KIND)
    return v


@triton.jit
def _mma_plain(wlo, whi, slo, shi, mlo, mhi, clo, chi, xs, c0, c1, c2, c3,
               DTYPE: tl.constexpr, KIND: tl.constexpr):
    """mma_block_asm without PTX (Triton's interpreter): X as its 8 values a lane (nibble order),
    the lanes' values gathered into the tile's rows and multiplied at once."""
    lo = _rows(_value(wlo, clo, 0, slo, mlo, DTYPE, KIND), _value(wlo, clo, 1, slo, mlo, DTYPE, KIND),
               _value(wlo, clo, 2, slo, mlo, DTYPE, KIND), _value(wlo, clo, 3, slo, mlo, DTYPE, KIND),
               _value(wlo, clo, 4, slo, mlo, DTYPE, KIND), _value(wlo, clo, 5, slo, mlo, DTYPE, KIND),
               _value(wlo, clo, 6, slo, mlo, DTYPE, KIND), _value(wlo, clo, 7, slo, mlo, DTYPE, KIND))
    hi = _rows(_value(whi, chi, 0, shi, mhi, DTYPE, KIND), _value(whi, chi, 1, shi, mhi, DTYPE, KIND),
               _value(whi, chi, 2, shi, mhi, DTYPE, KIND), _value(whi, chi, 3, shi, mhi, DTYPE, KIND),
               _value(whi, chi, 4, shi, mhi, DTYPE, KIND), _value(whi, chi, 5, shi, mhi, DTYPE, KIND),
               _value(whi, chi, 6, shi, mhi, DTYPE, KIND), _value(whi, chi, 7, shi, mhi, DTYPE, KIND))
    x = _rows(xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7])
    d0, d1 = _lane_sums(lo, x)
    d2, d3 = _lane_sums(hi, x)
    if KIND == 3:
        d0 = d0 * slo
        d1 = d1 * slo
        d2 = d2 * shi
        d3 = d3 * shi
    return c0 + d0, c1 + d1, c2 + d2, c3 + d3


@triton.jit
def _four(v):
    """The four entries of the last axis of v `[32 W, 4]` (one lane's 16-byte load), each
    `[32 W]`: a split along an axis a lane holds whole moves no data."""
    L: tl.constexpr = v.shape[0]
    a, b = tl.split(tl.reshape(v, (L, 2, 2)))
    e0, e2 = tl.split(a)
    e1, e3 = tl.split(b)
    return e0, e1, e2, e3


@triton.jit
def _tile(wlo, whi, slo, shi, mlo, mhi, clo, chi, xs, acc, DT: tl.constexpr,
          DTYPE: tl.constexpr, KIND: tl.constexpr, XN: tl.constexpr):
    """One block of one 16-row tile against XN sets of 8 rows of X: the fragments acc (4 XN)
    plus its products; xs: per set, X's packed pairs (PTX) and eight values (interpreter)."""
    if _ASM:
        if XN == 2:
            if DT == 1:
                asm: tl.constexpr = _BF16_AFFINE2 if KIND == 0 else _BF16_SYM2 if KIND == 1 \
                    else _BF16_Q62 if KIND == 2 else _BF16_EXACT2
            else:
                asm: tl.constexpr = _F16_AFFINE2 if KIND == 0 else _F16_SYM2 if KIND == 1 \
                    else _F16_Q62 if KIND == 2 else _F16_EXACT2
            p0 = xs[0][0]
            p1 = xs[1][0]
            acc = tl.inline_asm_elementwise(
                asm, _C2, [wlo, whi, slo, shi, mlo, mhi, clo, chi, p0[0], p0[1], p0[2], p0[3],
                           p1[0], p1[1], p1[2], p1[3], acc[0], acc[1], acc[2], acc[3], acc[4],
                           acc[5], acc[6], acc[7]],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            if DT == 1:
                asm: tl.constexpr = _BF16_AFFINE if KIND == 0 else _BF16_SYM if KIND == 1 else \
                    _BF16_Q6 if KIND == 2 else _BF16_EXACT
            else:
                asm: tl.constexpr = _F16_AFFINE if KIND == 0 else _F16_SYM if KIND == 1 else \
                    _F16_Q6 if KIND == 2 else _F16_EXACT
            p0 = xs[0][0]
            acc = tl.inline_asm_elementwise(
                asm, _C1, [wlo, whi, slo, shi, mlo, mhi, clo, chi, p0[0], p0[1], p0[2], p0[3],
                           acc[0], acc[1], acc[2], acc[3]],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        c0, c1, c2, c3 = _mma_plain(wlo, whi, slo, shi, mlo, mhi, clo, chi, xs[0][1], acc[0],
                                    acc[1], acc[2], acc[3], DTYPE, KIND)
        if XN == 2:
            c4, c5, c6, c7 = _mma_plain(wlo, whi, slo, shi, mlo, mhi, clo, chi, xs[1][1],
                                        acc[4], acc[5], acc[6], acc[7], DTYPE, KIND)
            acc = (c0, c1, c2, c3, c4, c5, c6, c7)
        else:
            acc = (c0, c1, c2, c3)
    return acc


@triton.jit
def _x(xp, b, DTYPE: tl.constexpr):
    """Block b's X for a lane: four packed pairs of values (i, i + 4), the MMA's right operand
    (PTX), or the eight values (interpreter); from one 16-byte load of values (0, 1) .. (6, 7)
    split along the axis the lane holds whole (four 32-bit loads cost three more load issues a
    block, as many as the weight's own)."""
    u01, u23, u45, u67 = _four(tl.load((xp + b * 16)[:, None] + tl.arange(0, 4)[None, :]))
    pairs = ((u01 & 0xFFFF) | (u45 << 16), (u01 >> 16) | (u45 & 0xFFFF0000),
             (u23 & 0xFFFF) | (u67 << 16), (u23 >> 16) | (u67 & 0xFFFF0000))
    if _ASM:
        vals = pairs     # unread
    else:
        vals = (_half(u01, 0, DTYPE), _half(u01, 1, DTYPE), _half(u23, 0, DTYPE),
                _half(u23, 1, DTYPE), _half(u45, 0, DTYPE), _half(u45, 1, DTYPE),
                _half(u67, 0, DTYPE), _half(u67, 1, DTYPE))
    return pairs, vals


@triton.jit
def _half(u, h: tl.constexpr, DTYPE: tl.constexpr):
    return ((u >> (16 * h)) & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)


@triton.jit
def _fetch(wp, xp, cp, s_ptr, z_ptr, g, b, sub, nblk, FMT: tl.constexpr, GROUP: tl.constexpr,
           DTYPE: tl.constexpr, XN: tl.constexpr, WEV: tl.constexpr):
    """Block b's loads for a lane: its group's four code words (one 16-byte load), their affine
    terms (float32; q6_k: of sub-block 2 b + sub), q6_k's crumb words and X's XN sets (from
    pointers xp[0], xp[1]: rows 8 apart); WEV: the weight's words loaded evict-first."""
    r4 = tl.arange(0, 4)[None, :]
    EV: tl.constexpr = "evict_first" if WEV else ""
    w = _four(tl.load(wp + (b * 16)[:, None], eviction_policy=EV))
    if FMT == 5:
        s4, m4 = affine_at(s_ptr, z_ptr, g, (2 * b + sub)[:, None], r4, nblk, FMT, GROUP)
        c = _four(tl.load(cp + (b * 8)[:, None], eviction_policy=EV))
    else:
        s4, m4 = affine_at(s_ptr, z_ptr, g, b[:, None], r4, nblk, FMT, GROUP)
        c = w   # unread
    if XN == 2:
        xs = (_x(xp[0], b, DTYPE), _x(xp[1], b, DTYPE))
    else:
        xs = (_x(xp[0], b, DTYPE),)
    return w, _four(s4), _four(m4), c, xs


@triton.jit
def _fetch_step(wp, xp, cp, s_ptr, z_ptr, g, b, sub, nblk, FMT: tl.constexpr,
                GROUP: tl.constexpr, DTYPE: tl.constexpr, NB: tl.constexpr, XN: tl.constexpr,
                WEV: tl.constexpr):
    """The loads of blocks b .. b + NB - 1 (NB 1, 2 or 4)."""
    f0 = _fetch(wp, xp, cp, s_ptr, z_ptr, g, b, sub, nblk, FMT, GROUP, DTYPE, XN, WEV)
    if NB >= 2:
        f1 = _fetch(wp, xp, cp, s_ptr, z_ptr, g, b + 1, sub, nblk, FMT, GROUP, DTYPE, XN, WEV)
    if NB == 4:
        out = (f0, f1,
               _fetch(wp, xp, cp, s_ptr, z_ptr, g, b + 2, sub, nblk, FMT, GROUP, DTYPE, XN, WEV),
               _fetch(wp, xp, cp, s_ptr, z_ptr, g, b + 3, sub, nblk, FMT, GROUP, DTYPE, XN, WEV))
    elif NB == 2:
        out = (f0, f1)
    else:
        out = (f0,)
    return out


@triton.jit
def nib_mma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, c_ptr, M, N, K, blocks_per_split,
                   FMT: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr,
                   WARPS: tl.constexpr, NB: tl.constexpr, SPLIT_K: tl.constexpr,
                   PREFETCH: tl.constexpr, SA: tl.constexpr, XN: tl.constexpr,
                   WEV: tl.constexpr):
    pdl_wait()
    # A program owns 32 weight rows (8 row groups of the layout), up to 8 rows of X and a run
    # of 32-value blocks of K, split evenly among its WARPS warps (the launcher makes
    # blocks_per_split a multiple of WARPS NB, NB blocks a step); each warp adds its blocks into its lanes'
    # fragments, summed across warps at the end. Lane (r, q) loads group r's four rows at word
    # column 4 b + q in one 16-byte load: rows 0, 1 of the group are tile 0's MMA rows r and
    # r + 8, rows 2, 3 tile 1's (the MMA's row order is free: the store undoes it).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    L: tl.constexpr = 32 * WARPS
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # Symmetric codes (q4_0, GPTQ without zero points) are exact in X's type: scaled after
    # the MMA (SA) or rounded with their scale into it.
    KIND: tl.constexpr = 2 if FMT == 5 else (3 if SA else 1) if (FMT == 0 or FMT == 4) else 0
    kw = K // 8
    nblk = K // 16 if FMT == 5 else K // 32
    p = tl.arange(0, L)
    warp = p // 32
    r = (p % 32) // 4
    q = p % 4
    # Groups past N's read the layout's last (in bounds; their rows are not stored).
    g = tl.minimum(pid_n * 8 + r, (N + 3) // 4 - 1).to(tl.int64)[:, None]
    b_lo = pid_k * blocks_per_split
    per_warp = (tl.minimum(b_lo + blocks_per_split, K // 32) - b_lo) // WARPS
    steps = per_warp // NB
    b0 = b_lo + warp * per_warp                       # the warp's first block
    r4 = tl.arange(0, 4)[None, :]
    # Words (g, 4 b + q, 0..3) of the layout at + 16 b.
    wp = q_ptr + (g * kw + q[:, None]) * 4 + r4
    # q6_k's crumb words (g, (4 b + q) // 2, 0..3) at + 8 b, the lane's half at 16 (q % 2);
    # word columns 0, 1 of a block are its first 16-value sub-block, 2, 3 the second.
    cp = h_ptr.to(tl.pointer_type(tl.int32)) + (g * (kw // 2) + (q // 2)[:, None]) * 4 + r4
    hsh = 16 * (q % 2)
    sub = q // 2
    # X row r of the program (rows past M re-read the last): values 32 b + 8 q + 0..7 as
    # four 32-bit pairs at + 16 b.
    # XN sets of 8 rows (16 rows of X a program for XN 2: each decoded pair feeds both MMAs).
    x32 = x_ptr.to(tl.pointer_type(tl.uint32))
    xp0 = x32 + tl.minimum(pid_m * (8 * XN) + r, M - 1).to(tl.int64) * (K // 2) + 4 * q
    zero = tl.zeros((L,), tl.float32)
    if XN == 2:
        xp = (xp0, x32 + tl.minimum(pid_m * 16 + 8 + r, M - 1).to(tl.int64) * (K // 2) + 4 * q)
        t0 = (zero, zero, zero, zero, zero, zero, zero, zero)
    else:
        xp = (xp0,)
        t0 = (zero, zero, zero, zero)
    t1 = t0
    # NB blocks a step; PREFETCH (1 or 2) steps ahead are loaded before this one's MMAs (past
    # the last step: the last again, in bounds and unused).
    if PREFETCH >= 1:
        nxt = _fetch_step(wp, xp, cp, s_ptr, z_ptr, g, b0, sub, nblk, FMT, GROUP, DTYPE, NB, XN,
                          WEV)
    if PREFETCH == 2:
        nxt2 = _fetch_step(wp, xp, cp, s_ptr, z_ptr, g, b0 + tl.minimum(1, steps - 1) * NB, sub,
                           nblk, FMT, GROUP, DTYPE, NB, XN, WEV)
    for it in range(steps):
        if PREFETCH == 2:
            cur = nxt
            nxt = nxt2
            nxt2 = _fetch_step(wp, xp, cp, s_ptr, z_ptr, g,
                               b0 + tl.minimum(it + 2, steps - 1) * NB, sub, nblk, FMT, GROUP,
                               DTYPE, NB, XN, WEV)
        elif PREFETCH == 1:
            cur = nxt
            nxt = _fetch_step(wp, xp, cp, s_ptr, z_ptr, g, b0 + tl.minimum(it + 1, steps - 1) * NB,
                              sub, nblk, FMT, GROUP, DTYPE, NB, XN, WEV)
        else:
            cur = _fetch_step(wp, xp, cp, s_ptr, z_ptr, g, b0 + it * NB, sub, nblk, FMT, GROUP,
                              DTYPE, NB, XN, WEV)
        for u in tl.static_range(NB):
            w, s4, m4, c, xs = cur[u]
            if KIND != 0:
                m4 = s4     # no offset: the asm leaves it unread (so its computation goes)
            if FMT == 5:
                c = (c[0] >> hsh, c[1] >> hsh, c[2] >> hsh, c[3] >> hsh)
            t0 = _tile(w[0], w[1], s4[0], s4[1], m4[0], m4[1], c[0], c[1], xs, t0, DT, DTYPE,
                       KIND, XN)
            t1 = _tile(w[2], w[3], s4[2], s4[3], m4[2], m4[3], c[2], c[3], xs, t1, DT, DTYPE,
                       KIND, XN)
    # Fragment (tile t, c0..c3) of lane (r, q): weight row 4 (8 pid_n + r) + 2 t (+ 1 for
    # c2, c3), X row 2 q (+ 1 for c1, c3).
    row0 = pid_n * 32
    for j in tl.static_range(XN):
        x0 = pid_m * (8 * XN) + 8 * j
        _store(t0[4 * j], c_ptr, row0, 0, x0, 0, pid_k, M, N, WARPS, SPLIT_K)
        _store(t0[4 * j + 1], c_ptr, row0, 0, x0, 1, pid_k, M, N, WARPS, SPLIT_K)
        _store(t0[4 * j + 2], c_ptr, row0, 1, x0, 0, pid_k, M, N, WARPS, SPLIT_K)
        _store(t0[4 * j + 3], c_ptr, row0, 1, x0, 1, pid_k, M, N, WARPS, SPLIT_K)
        _store(t1[4 * j], c_ptr, row0, 2, x0, 0, pid_k, M, N, WARPS, SPLIT_K)
        _store(t1[4 * j + 1], c_ptr, row0, 2, x0, 1, pid_k, M, N, WARPS, SPLIT_K)
        _store(t1[4 * j + 2], c_ptr, row0, 3, x0, 0, pid_k, M, N, WARPS, SPLIT_K)
        _store(t1[4 * j + 3], c_ptr, row0, 3, x0, 1, pid_k, M, N, WARPS, SPLIT_K)


@triton.jit
def _store(c, c_ptr, row0, dr: tl.constexpr, xrow0, e: tl.constexpr, pid_k, M, N,
           WARPS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Lane fragments `[32 W]` summed over the warps and stored: lane (r, q) holds weight row
    row0 + 4 r + dr and X row xrow0 + 2 q + e (out[xrow, row], or split K's float32 partial)."""
    if WARPS > 1:
        c = tl.sum(tl.reshape(c, (WARPS, 32)), axis=0)
    lane = tl.arange(0, 32)
    row = row0 + 4 * (lane // 4) + dr
    xrow = xrow0 + 2 * (lane % 4) + e
    store_out(c_ptr, xrow.to(tl.int64) * N + row, c, (row < N) & (xrow < M), pid_k, M, N,
              SPLIT_K)
