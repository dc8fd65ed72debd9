"""4-bit (and Q6_K) matmul on the tensor cores for few rows of X (up to 16), over the nib layout.

The GEMV (quant_nib.py) spends three instructions a weight value per row of X (mask-or, subtract,
FMA), so at one row it is bound by the decode and at 16 rows by the FMAs. Here each weight tile
is decoded once into X's 16-bit type, two values per instruction, straight into the registers of
the MMA's left operand, and the tensor cores multiply it by up to 16 rows of X at once: the
decode is about two instructions per pair of values (a mask-or that makes (magic + code) of two
values, a packed subtraction, a packed FMA with the block's scale and offset, or a multiply for
the symmetric formats), the same whatever the row count. Q6_K masks its two high bits (crumbs)
into the same float.

The weight is the left operand, X^T the right one (16 columns: rows of X past M re-read the
last). Every element of the left operand comes from one word of the tile: plane i (nibble i,
value 8 j + i of K) of word column j is a `[BN, NW]` tensor decoded elementwise from the words,
so Triton keeps the decode in the operand's register layout; the dot of plane i takes the X
values 8 j + i, contiguous once nib_x_planes_kernel has reordered X (XP). Eight dots a step, one
per plane, add into one accumulator. Below a warpgroup (2 warps) Triton issues mma.sync, which
beat wgmma's wait per dot on the H200 (BENCHMARKS.md, nib round 4).

Numerics: value = s c + m rounded once to X's type (s, m rounded to it first), as the dot tiles
and the decode-into-scratch path of quant_nib.py give. The inline PTX is checked bit for bit on
the CPU by tests/lowering/triton_gpu/test_quant_nib_tc_ptx.py.
"""
from __future__ import annotations

import triton
import triton.language as tl
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from .quant_nib import _ASM, affine_at, store_out


def _planes_asm(ty: str, magic: int, sym: bool = False) -> str:
    """PTX for the eight planes of two words ($8, $9: word columns j, j + 1) as packed pairs
    ($0..$7, plane i = nibble i of both words), each s c + m with s in $10 and m in $11, or
    for a symmetric format (sym) s (c - 8) with no m. A nibble masked into the low mantissa
    bits of `magic` (the 16-bit float whose last mantissa bit is 1: 128 in bfloat16, 1024 in
    float16) is the float magic + code exactly."""
    m2 = f"0x{magic:04X}{magic:04X}"
    k2 = f"0x{magic + 8:04X}{magic + 8:04X}" if sym else m2
    lines = [".reg .b32 lo, hi, t, u, k, k2;", f"mov.b32 k, {m2};", f"mov.b32 k2, {k2};",
             # lo: nibbles 0-3 of both words (word j in the low half), hi: nibbles 4-7.
             "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for i in range(8):
        src = "lo" if i < 4 else "hi"
        if i % 4:
            lines.append(f"shr.b32 t, {src}, {4 * (i % 4)};")
            src = "t"
        lines += [f"lop3.b32 t, {src}, 0x000F000F, k, 0xEA;",     # (a & b) | c
                  f"sub.rn.{ty} u, t, k2;",
                  f"mul.rn.{ty} ${i}, u, $10;" if sym else f"fma.rn.{ty} ${i}, u, $10, $11;"]
    return "{\n" + "\n".join(lines) + "\n}"


def _q6_planes_asm(ty: str, magic: int) -> str:
    """PTX for q6_k's eight planes of two words ($8, $9) with their crumb word ($10: word
    column j's crumbs in the low half, j + 1's in the high half, as the layout stores an even
    j's pair) as packed pairs ($0..$7) of s (code - 32), s in $12: the low nibble and the two
    crumb bits (moved to bits 4-5) masked into `magic` make magic + code (< 64) exactly."""
    m2 = f"0x{magic:04X}{magic:04X}"
    off = f"0x{magic + 32:04X}{magic + 32:04X}"
    lines = [".reg .b32 lo, hi, t, u, k, k2;", f"mov.b32 k, {m2};", f"mov.b32 k2, {off};",
             "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for i in range(8):
        src = "lo" if i < 4 else "hi"
        if i % 4:
            lines.append(f"shr.b32 t, {src}, {4 * (i % 4)};")
            src = "t"
        shift = 4 - 2 * i     # crumb i sits at bits 2i (and 16 + 2i): to bits 4-5 (20-21)
        lines += [f"lop3.b32 t, {src}, 0x000F000F, k, 0xEA;",
                  (f"shl.b32 u, $10, {shift};" if shift > 0 else
                   f"shr.b32 u, $10, {-shift};" if shift < 0 else "mov.b32 u, $10;"),
                  "lop3.b32 t, u, 0x00300030, t, 0xEA;",
                  f"sub.rn.{ty} t, t, k2;", f"mul.rn.{ty} ${i}, t, $12;"]
    return "{\n" + "\n".join(lines) + "\n}"


_BF16_ASM = tl.constexpr(_planes_asm("bf16x2", 0x4300))
_F16_ASM = tl.constexpr(_planes_asm("f16x2", 0x6400))
_SYM_BF16_ASM = tl.constexpr(_planes_asm("bf16x2", 0x4300, sym=True))
_SYM_F16_ASM = tl.constexpr(_planes_asm("f16x2", 0x6400, sym=True))
_Q6_BF16_ASM = tl.constexpr(_q6_planes_asm("bf16x2", 0x4300))
_Q6_F16_ASM = tl.constexpr(_q6_planes_asm("f16x2", 0x6400))


@triton.jit
def _plane_plain(words, crumbs, hsh, i: tl.constexpr, s, m, KIND: tl.constexpr):
    """Plane i without inline PTX (Triton's interpreter), the value the PTX gives, rounded once:
    KIND 0 s c + m, 1 (symmetric) s (c - 8), 2 (q6_k) s (c + 16 crumb - 32), hsh being each
    word column's half of its crumb word."""
    c = (words >> (4 * i)) & 0xF
    if KIND == 0:
        v = tl.fma(c.to(tl.float32), s.to(tl.float32), m.to(tl.float32))
    elif KIND == 1:
        v = (c.to(tl.float32) - 8.0) * s.to(tl.float32)
    else:
        c = c | (((crumbs >> (hsh + 2 * i)) & 3) << 4)
        v = (c.to(tl.float32) - 32.0) * s.to(tl.float32)
    return v.to(s.dtype)


@triton.jit
def _planes(words, crumbs, hsh, s, m, DT: tl.constexpr, KIND: tl.constexpr):
    """The eight planes `[BN, NW]` of the code words in s's dtype (DT 1: bfloat16, 2: float16):
    KIND 0 affine (s, m), 1 symmetric (no offset tensor, whose trip through shared memory
    costs as much as the scales'), 2 q6_k (crumbs); crumbs / hsh / m are unread where the
    kind has none."""
    if _ASM:
        C3: tl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r"
        if KIND == 0:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                _BF16_ASM if DT == 1 else _F16_ASM, C3 + ",r", [words, s, m],
                dtype=(s.dtype,) * 8, is_pure=True, pack=2)
        elif KIND == 1:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                _SYM_BF16_ASM if DT == 1 else _SYM_F16_ASM, C3, [words, s],
                dtype=(s.dtype,) * 8, is_pure=True, pack=2)
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                _Q6_BF16_ASM if DT == 1 else _Q6_F16_ASM, C3 + ",r,r", [words, crumbs, s],
                dtype=(s.dtype,) * 8, is_pure=True, pack=2)
    else:
        p0 = _plane_plain(words, crumbs, hsh, 0, s, m, KIND)
        p1 = _plane_plain(words, crumbs, hsh, 1, s, m, KIND)
        p2 = _plane_plain(words, crumbs, hsh, 2, s, m, KIND)
        p3 = _plane_plain(words, crumbs, hsh, 3, s, m, KIND)
        p4 = _plane_plain(words, crumbs, hsh, 4, s, m, KIND)
        p5 = _plane_plain(words, crumbs, hsh, 5, s, m, KIND)
        p6 = _plane_plain(words, crumbs, hsh, 6, s, m, KIND)
        p7 = _plane_plain(words, crumbs, hsh, 7, s, m, KIND)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _affine(s_ptr, z_ptr, g, b, r, step, nblk, FMT: tl.constexpr, GROUP: tl.constexpr,
            NB: tl.constexpr):
    """Step `step`'s affine terms (s, m) float32 `[BG, NB, 4]`: row group, block (q6_k: 16-value
    sub-block), row; NB blocks a step."""
    return affine_at(s_ptr, z_ptr, g, b + step * NB, r, nblk, FMT, GROUP)


@triton.jit
def _per_word(t3, NW: tl.constexpr):
    """Per-block values `[BG, NB, 4]` (g, b, r) as one per word `[4 BG, NW]` (4 g + r, j): NW / NB
    words a block, reordered in the round trip through shared memory that brings them to the
    MMA's layout anyway."""
    BG: tl.constexpr = t3.shape[0]
    NB: tl.constexpr = t3.shape[1]
    t4 = tl.broadcast_to(tl.permute(t3, (0, 2, 1))[:, :, :, None], (BG, 4, NB, NW // NB))
    return tl.reshape(t4, (BG * 4, NW))


@triton.jit
def _words(wp, step, NW: tl.constexpr):
    """Step `step`'s code words `[BN, NW]` (rows 4 g + r), loaded in the layout's order (16
    bytes: one word column of four rows)."""
    BG: tl.constexpr = wp.shape[0]
    w3 = tl.load(wp + step * (NW * 4))                       # [BG, NW, 4] (g, j, r)
    return tl.reshape(tl.permute(w3, (0, 2, 1)), (BG * 4, NW))


@triton.jit
def _x(xp, step, NW: tl.constexpr, XP: tl.constexpr):
    """Step `step`'s eight planes of X `[NW, BM]`: 2-byte gathers (too narrow for the
    pipeliner's asynchronous copies), or with XP (X reordered by nib_x_planes_kernel) plane i
    is NW consecutive values."""
    xs = xp + step * (NW * 8)
    PL: tl.constexpr = NW if XP else 1
    return (tl.load(xs), tl.load(xs + PL), tl.load(xs + 2 * PL), tl.load(xs + 3 * PL),
            tl.load(xs + 4 * PL), tl.load(xs + 5 * PL), tl.load(xs + 6 * PL),
            tl.load(xs + 7 * PL))


@triton.jit
def nib_x_planes_kernel(x_ptr, y_ptr, K, NW: tl.constexpr):
    """Y = X with each run of 8 NW values of a row reordered plane by plane (value 8 j + i of
    the run to i NW + j), so the tensor-core kernel's X planes are contiguous loads. Grid
    (rows of X, K / (8 NW))."""
    pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * (NW * 8)
    j = tl.arange(0, NW)[:, None]
    i = tl.arange(0, 8)[None, :]
    v = tl.load(x_ptr + row * K + k0 + j * 8 + i)
    tl.store(y_ptr + row * K + k0 + i * NW + j, v)


@triton.jit
def nib_tc_kernel(x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, c_ptr, M, N, K, cols_per_split,
                  FMT: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, BN: tl.constexpr,
                  NW: tl.constexpr, BM: tl.constexpr, SPLIT_K: tl.constexpr,
                  PREFETCH: tl.constexpr, XP: tl.constexpr):
    pdl_wait()
    # A program owns BN weight rows, BM rows of X and a run of word columns (8 values of K
    # each), NW a step; the launcher guarantees K % (8 NW) == 0 and cols_per_split % NW == 0.
    # h_ptr holds q6_k's crumbs (unread for other formats). The words feed the
    # dots through shared memory, so Triton's pipeliner (num_stages) loads them ahead; the
    # affine terms feed arithmetic and X's planes are 2-byte gathers, which it leaves in the
    # step that uses them: PREFETCH loads them a step ahead into registers. XP: X comes
    # reordered by nib_x_planes_kernel (contiguous planes, which the pipeliner copies ahead).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    kw = K // 8
    # Blocks of 32 values (4 word columns); q6_k's scales are per 16 (2 word columns).
    NB: tl.constexpr = NW // 2 if FMT == 5 else NW // 4
    nblk = K // 16 if FMT == 5 else K // 32
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # Row groups past N read the zero rows the layout pads to a multiple of four, then the last.
    BG: tl.constexpr = BN // 4
    gi = tl.minimum(pid_n * BG + tl.arange(0, BG), (N + 3) // 4 - 1).to(tl.int64)
    j_lo = pid_k * cols_per_split
    steps = (tl.minimum(j_lo + cols_per_split, kw) - j_lo) // NW
    jj = j_lo + tl.arange(0, NW)
    wp = q_ptr + gi[:, None, None] * (kw * 4) + (jj * 4)[None, :, None] \
        + tl.arange(0, 4)[None, None, :]
    g = gi[:, None, None]
    b = (j_lo // (NW // NB) + tl.arange(0, NB))[None, :, None]
    # q6_k's crumb words, one per two word columns `[BG, NW / 2, 4]`, and each column's half.
    hp = h_ptr.to(tl.pointer_type(tl.int32)) + gi[:, None, None] * (kw // 2 * 4) \
        + ((j_lo // 2 + tl.arange(0, NW // 2)) * 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
    hsh = ((jj % 2) * 16)[None, :]
    r = tl.arange(0, 4)[None, None, :]
    rm = pid_m * BM + tl.arange(0, BM)
    # X's plane i of word columns j: the values 8 j + i, `[NW, BM]`.
    if XP:
        xp = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[None, :] * K + j_lo * 8 \
            + tl.arange(0, NW)[:, None]
    else:
        xp = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[None, :] * K + (jj * 8)[:, None]
    acc = tl.zeros((BN, BM), tl.float32)
    # PREFETCH bit 1: the affine terms a step ahead; bit 2: X's planes a step ahead.
    if PREFETCH & 1:
        ns, nm = _affine(s_ptr, z_ptr, g, b, r, 0, nblk, FMT, GROUP, NB)
    if PREFETCH & 2:
        n0, n1, n2, n3, n4, n5, n6, n7 = _x(xp, 0, NW, XP)
    for it in range(steps):
        nxt = tl.minimum(it + 1, steps - 1)   # past the last: the last again (unused)
        if PREFETCH & 1:
            s3, m3 = ns, nm
            ns, nm = _affine(s_ptr, z_ptr, g, b, r, nxt, nblk, FMT, GROUP, NB)
        else:
            s3, m3 = _affine(s_ptr, z_ptr, g, b, r, it, nblk, FMT, GROUP, NB)
        if PREFETCH & 2:
            x0, x1, x2, x3, x4, x5, x6, x7 = n0, n1, n2, n3, n4, n5, n6, n7
            n0, n1, n2, n3, n4, n5, n6, n7 = _x(xp, nxt, NW, XP)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = _x(xp, it, NW, XP)
        words = _words(wp, it, NW)
        sw = _per_word(s3.to(DTYPE), NW)
        if FMT == 5:
            crumbs = _per_word(tl.load(hp + it * (NW // 2 * 4)), NW)
            p0, p1, p2, p3, p4, p5, p6, p7 = _planes(words, crumbs, hsh, sw, sw, DT, 2)
        elif FMT == 0 or FMT == 4:
            p0, p1, p2, p3, p4, p5, p6, p7 = _planes(words, words, hsh, sw, sw, DT, 1)
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = _planes(words, words, hsh, sw,
                                                     _per_word(m3.to(DTYPE), NW), DT, 0)
        acc = tl.dot(p0, x0, acc)
        acc = tl.dot(p1, x1, acc)
        acc = tl.dot(p2, x2, acc)
        acc = tl.dot(p3, x3, acc)
        acc = tl.dot(p4, x4, acc)
        acc = tl.dot(p5, x5, acc)
        acc = tl.dot(p6, x6, acc)
        acc = tl.dot(p7, x7, acc)
    rn = pid_n * BN + tl.arange(0, BN)
    ok = (rn < N)[:, None] & (rm < M)[None, :]
    store_out(c_ptr, rm.to(tl.int64)[None, :] * N + rn[:, None], acc, ok, pid_k, M, N, SPLIT_K)
