"""4-bit matmuls over the load-time "nib" layout (ops/quant/nib_layout.py): GEMV and tiled dot.

Both read a weight `[N, K]` as int32 code words `[N, K / 8]` (16-byte loads: 4 words = one
32-value block of one row) and per-block affine terms (value = s * code + m), whose storage
FMT selects: 0 q4_0 (float16 s, m = -8 s), 1 q4_1 (float16 s and m in one word), 2 q4_k
(6-bit sc / min bytes per block, float16 d / dmin per 256 values), 3 gptq (float16 s and a
uint8 zero point per group of GROUP values, m = -s z), 4 gptq_sym (zero point 8), 5 q6_k
(int8 scale per 16 values times float16 d, and the high 2 bits of each 6-bit code in crumb
words at h_ptr: value = s (lo + 16 hi - 32), each crumb masked in above its nibble and the 32
taken with the float conversion).

Codes become floats with no int -> float conversion: code c at bit 4q of a word, masked in
place and OR-ed into the bits of the float 2**(23 - 4q) (whose mantissa's last bit is then worth
2**-4q, so the nibble's is worth 1), is the float 2**(23 - 4q) + c; one subtraction leaves c
exactly, with no scale left over for X (the magic differs per nibble, the instruction count
does not). Nibble i of word column j is value k = 8 j + i, so a word's eight values meet eight
consecutive values of X.

GEMV (1, 2 or 4 rows of X a program): a program owns BN weight rows and a run of K (SPLIT_K
programs per row block, fp32 partials summed by the split-K reduce); per block and X row it
forms sum(x c) and sum(x) in fp32 and adds s sum(x c) + m sum(x), so the per-value work is a
mask-or and a subtraction, shared by the rows, and an FMA a row. The next tile's words and
scales are loaded before the current one is decoded (PREFETCH), so each warp keeps two tiles of
weight in flight.

Dot: the decoded tile, s c + m rounded to X's dtype, feeds tl.dot as the dot path of quant.py
does for GGUF blocks. Dequant: the decoded tiles stored whole, for the plain matmul.
The one-row GEMV a block a lane: quant_nib_block.py. Launch specs, formats (FMT_IDS) and row
buckets: quant_nib_config.py.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

# Triton's interpreter (the CPU tests) has no inline PTX: there the mask-or is two plain ops.
_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"))


@triton.jit
def _f16_lo(v):
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_hi(v):
    return (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _small(v, OFF: tl.constexpr = 0):
    """An integer below 2**23, minus OFF, as float32 by the 2**23 trick (I2F runs at a quarter
    of the FMA rate on Hopper and would be a per-word cost here); one subtraction, exact."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)


@triton.jit
def block_affine(s_ptr, z_ptr, g, bi, nblk, FMT: tl.constexpr, GROUP: tl.constexpr):
    """(s, m) float32 `[BG, NJ, 4]` for row groups g `[BG]` and blocks bi `[NJ]` (in range)."""
    return affine_at(s_ptr, z_ptr, g.to(tl.int64)[:, None, None], bi[None, :, None],
                     tl.arange(0, 4)[None, None, :], nblk, FMT, GROUP)


@triton.jit
def affine_at(s_ptr, z_ptr, g, bi, r4, nblk, FMT: tl.constexpr, GROUP: tl.constexpr):
    """(s, m) float32 of row 4 g + r4 in block bi (g int64; the three broadcast together)."""
    at = g * (nblk * 4) + bi * 4 + r4
    if FMT == 0:
        s = tl.load(s_ptr.to(tl.pointer_type(tl.float16)) + at).to(tl.float32)
        m = -8.0 * s
    elif FMT == 1:
        v = tl.load(s_ptr.to(tl.pointer_type(tl.uint32)) + at)
        s = _f16_lo(v)
        m = _f16_hi(v)
    elif FMT == 2:
        v = tl.load(s_ptr.to(tl.pointer_type(tl.uint16)) + at).to(tl.uint32)
        dd = tl.load(z_ptr.to(tl.pointer_type(tl.uint32)) + g * (nblk // 8 * 4) + bi // 8 * 4 + r4)
        s, m = q4_k_terms(v, dd)
    elif FMT == 5:
        # q6_k: nblk counts 16-value sub-blocks; int8 scale per sub-block, d per 16 of them.
        sc = tl.load(s_ptr.to(tl.pointer_type(tl.int8)) + at).to(tl.int32) + 128
        d = tl.load(z_ptr.to(tl.pointer_type(tl.float16)) + g * (nblk // 16 * 4) + bi // 16 * 4
                    + r4).to(tl.float32)
        s = d * (_small(sc.to(tl.uint32)) - 128.0)
        m = s    # unread: q6_k's offset -32 goes with its codes' float conversion
    else:
        ng = nblk * 32 // GROUP
        ga = g * (ng * 4) + bi * 32 // GROUP * 4 + r4
        s = tl.load(s_ptr.to(tl.pointer_type(tl.float16)) + ga).to(tl.float32)
        if FMT == 3:
            z = _small(tl.load(z_ptr.to(tl.pointer_type(tl.uint8)) + ga).to(tl.uint32))
        else:
            z = tl.full(s.shape, 8.0, tl.float32)
        m = -(s * z)
    return s, m


@triton.jit
def q4_k_terms(v, dd):
    """q4_k's (s, m) from a block's scales v (uint32 of the uint16: sc bits 0-5, min 8-13, the
    rest the layout's spare bits) and its super-block's word dd (float16 d low, dmin high)."""
    s = _f16_lo(dd) * _small(v & 0x3F)
    # The min in place: OR-ed into 2**15 its last bit is worth 1 (no shift).
    mn = _or_magic(v.to(tl.int32), 0x3F00, 15).to(tl.float32, bitcast=True) - 32768.0
    return s, -(_f16_hi(dd) * mn)


def _magic_bits(exp: int) -> int:
    """The bits of the float 2**exp."""
    return (127 + exp) << 23


# (v & mask) | magic as one LOP3 for each magic a decode ORs in, 2**(23 - 4q) for a code at
# bit 4q; the asm takes the magic as its immediate.
_LOP3 = {e: tl.constexpr(f"lop3.b32 $0, $1, $2, {_magic_bits(e)}, 0xEA;") for e in (23, 19, 15, 11)}
_LOP3_23, _LOP3_19, _LOP3_15, _LOP3_11 = _LOP3[23], _LOP3[19], _LOP3[15], _LOP3[11]


@triton.jit
def _or_magic(v, MASK: tl.constexpr, EXP: tl.constexpr):
    """(v & MASK) | bits of 2**EXP in one LOP3: ptxas otherwise spends two, since LOP3 takes a
    single immediate; here the mask comes in a register (set once, outside the loop)."""
    # The asm is picked from _LOP3's magics: another one would silently take the last.
    tl.static_assert(EXP == 23 or EXP == 19 or EXP == 15 or EXP == 11)
    if _ASM:
        asm: tl.constexpr = _LOP3_23 if EXP == 23 else _LOP3_19 if EXP == 19 else \
            _LOP3_15 if EXP == 15 else _LOP3_11
        r = tl.inline_asm_elementwise(asm, "=r,r,r", [v, tl.full(v.shape, MASK, tl.int32)],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = (v & MASK) | ((127 + EXP) << 23)
    return r


@triton.jit
def _plane(words, q: tl.constexpr, OFF: tl.constexpr):
    """Codes at nibble q (0..3) of `words` as exact floats c - OFF."""
    EXP: tl.constexpr = 23 - 4 * q
    return _or_magic(words, 0xF << (4 * q), EXP).to(tl.float32, bitcast=True) \
        - ((1 << EXP) + OFF)


@triton.jit
def _planes(words, OFF: tl.constexpr):
    """The eight nibble planes of code words (value 8 j + i at plane i), as _plane makes them."""
    hi = words >> 16
    return (_plane(words, 0, OFF), _plane(words, 1, OFF), _plane(words, 2, OFF),
            _plane(words, 3, OFF), _plane(hi, 0, OFF), _plane(hi, 1, OFF), _plane(hi, 2, OFF),
            _plane(hi, 3, OFF))


@triton.jit
def _q6_planes(words, h):
    """q6_k's eight values of code words (low nibbles, as _planes reads them) with their crumbs
    (the high 2 bits of value i at bits 2i of h), each as the exact float code - 32."""
    hi = words >> 16
    # Crumb i shifted to just above its nibble (bit 4q + 4, q = i % 4).
    return (_q6_code(words, h << 4, 0), _q6_code(words, h << 6, 1),
            _q6_code(words, h << 8, 2), _q6_code(words, h << 10, 3),
            _q6_code(hi, h >> 4, 0), _q6_code(hi, h >> 2, 1), _q6_code(hi, h, 2),
            _q6_code(hi, h << 2, 3))


@triton.jit
def _q6_code(w, hs, q: tl.constexpr):
    """The 6-bit code at bits 4q..4q + 5 of (w's nibble at 4q) | (hs's crumb at 4q + 4), minus
    32: both OR-ed into the magic 2**(23 - 4q) make the float 2**(23 - 4q) + code, so one
    subtraction gives it (a mask-or, a shift, a second mask-or and a subtraction a value, where
    the crumb as a float of its own took a mask-or, a subtraction and an FMA more)."""
    EXP: tl.constexpr = 23 - 4 * q
    f = _or_magic(w, 0xF << (4 * q), EXP) | (hs & (0x30 << (4 * q)))
    return f.to(tl.float32, bitcast=True) - ((1 << EXP) + 32)


@triton.jit
def _pair(v, DT: tl.constexpr):
    """The two 16-bit X values in 32-bit words v, as float32 (DT 1: bfloat16, 2: float16)."""
    if DT == 1:
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        lo = _f16_lo(v)
        hi = _f16_hi(v)
    return lo, hi


@triton.jit
def _quarters(v):
    """The four entries of the last axis of v `[BG, NJ, 4]`, each `[BG, NJ]`: a split along an
    axis a lane holds whole is free (no layout conversion, unlike slicing a separate X tile)."""
    BG: tl.constexpr = v.shape[0]
    NJ: tl.constexpr = v.shape[1]
    a, b = tl.split(tl.reshape(v, (BG, NJ, 2, 2)))
    e0, e2 = tl.split(a)
    e1, e3 = tl.split(b)
    return e0, e1, e2, e3


@triton.jit
def _x_octet(xp, DT: tl.constexpr):
    """X values 8 j + 0..7 as eight float32 `[BG, NJ]` from pointers xp `[BG, NJ, 4]` (the same
    for every g: one 16-byte load a lane for 16-bit X, two for float32)."""
    if DT == 0:
        x0, x1, x2, x3 = _quarters(tl.load(xp))
        x4, x5, x6, x7 = _quarters(tl.load(xp + 4))
    else:
        p0, p1, p2, p3 = _quarters(tl.load(xp))
        x0, x1 = _pair(p0, DT)
        x2, x3 = _pair(p1, DT)
        x4, x5 = _pair(p2, DT)
        x6, x7 = _pair(p3, DT)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _fetch(wp, hp, s_ptr, z_ptr, g, jj, step, nblk, FMT: tl.constexpr, GROUP: tl.constexpr,
           NJ: tl.constexpr):
    """Step `step`'s code words `[BG, NJ, 4]`, q6_k's crumb words (the code words again for
    other formats) and the affine terms of their blocks."""
    words = tl.load(wp + step * (NJ * 4))
    if FMT == 5:
        hw = tl.load(hp + step * (NJ // 2 * 4))
        s, m = block_affine(s_ptr, z_ptr, g, (jj + step * NJ) // 2, nblk, FMT, GROUP)
    else:
        hw = words
        s, m = block_affine(s_ptr, z_ptr, g, (jj + step * NJ) // 4, nblk, FMT, GROUP)
    return words, hw, s, m


@triton.jit
def _walk(q_ptr, h_ptr, pid_n, pid_k, N, K, cols_per_split, FMT: tl.constexpr,
          BG: tl.constexpr, NJ: tl.constexpr):
    """A program's row groups g `[BG]` (clamped), first word columns jj `[NJ]`, step count,
    affine entries per row, and the first step's code / crumb word pointers `[BG, NJ, 4]`
    with each column's crumb half (shift); the launcher guarantees K % (8 NJ) == 0 and
    cols_per_split % NJ == 0, so every step is a whole tile."""
    kw = K // 8
    nblk = K // 16 if FMT == 5 else K // 32
    g = tl.minimum(pid_n * BG + tl.arange(0, BG), (N + 3) // 4 - 1)
    j_lo = pid_k * cols_per_split
    steps = (tl.minimum(j_lo + cols_per_split, kw) - j_lo) // NJ
    jj = j_lo + tl.arange(0, NJ)
    r4 = tl.arange(0, 4)[None, None, :]
    wp = q_ptr + g.to(tl.int64)[:, None, None] * (kw * 4) + (jj * 4)[None, :, None] + r4
    # q6_k's crumb word of column j holds columns 2 (j // 2) and + 1: its half j % 2.
    hp = h_ptr.to(tl.pointer_type(tl.int32)) + g.to(tl.int64)[:, None, None] * (kw // 2 * 4) \
        + (jj // 2 * 4)[None, :, None] + r4
    hsh = ((jj % 2) * 16)[None, :, None]
    return g, jj, steps, nblk, wp, hp, hsh


@triton.jit
def _octet_dot(t, xp, q0, q1, q2, q3, q4, q5, q6, q7, DT: tl.constexpr, FMT: tl.constexpr,
               OFF: tl.constexpr):
    """t + the products of one word's decoded values q (_planes, or q6_k's _q6_planes) with the
    X octet at xp: one FMA chain (each X value broadcast over four weight rows); and the
    octet's sum where the format's offset needs it (the octet's first value otherwise,
    unread)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_octet(xp, DT)
    t = tl.fma(q0, x0[:, :, None], t)
    t = tl.fma(q1, x1[:, :, None], t)
    t = tl.fma(q2, x2[:, :, None], t)
    t = tl.fma(q3, x3[:, :, None], t)
    t = tl.fma(q4, x4[:, :, None], t)
    t = tl.fma(q5, x5[:, :, None], t)
    t = tl.fma(q6, x6[:, :, None], t)
    t = tl.fma(q7, x7[:, :, None], t)
    if OFF == 0 and FMT != 5:
        xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    else:
        xs = x0
    return t, xs


@triton.jit
def _row_step(acc, xp, q0, q1, q2, q3, q4, q5, q6, q7, s, m, DT: tl.constexpr,
              FMT: tl.constexpr, OFF: tl.constexpr):
    """acc + this step's products for one row of X (its octets at xp) with the decoded values
    q, scaled by the block's terms."""
    t, xs = _octet_dot(tl.zeros_like(q0), xp, q0, q1, q2, q3, q4, q5, q6, q7, DT, FMT, OFF)
    acc = tl.fma(s, t, acc)
    if OFF == 0 and FMT != 5:
        acc = tl.fma(m, xs[:, :, None], acc)
    return acc


@triton.jit
def store_out(c_ptr, dst, val, ok, pid_k, M, N, SPLIT_K: tl.constexpr):
    """Store a result tile at offsets `dst` of the [M, N] output: with split K, the float32
    partial sums into split pid_k's slice of the [SPLIT_K, M, N] scratch (the reduce kernel
    adds them), else the values cast to the output's dtype. Every nib kernel ends here."""
    if SPLIT_K > 1:
        tl.store(c_ptr + pid_k.to(tl.int64) * M * N + dst, val, mask=ok)
    else:
        tl.store(c_ptr + dst, val.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_out(acc, c_ptr, row, pid_k, M, N, rn, SPLIT_K: tl.constexpr):
    BG: tl.constexpr = acc.shape[0]
    out = tl.reshape(tl.sum(acc, axis=1), (BG * 4,))
    store_out(c_ptr, row.to(tl.int64) * N + rn, out, (rn < N) & (row < M), pid_k, M, N,
              SPLIT_K)


@triton.jit
def nib_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, c_ptr, M, N, K, cols_per_split,
                    FMT: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, BG: tl.constexpr,
                    NJ: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
                    ROWS: tl.constexpr):
    pdl_wait()
    # A program owns ROWS (1, 2 or 4) rows of X, BG groups of four weight rows and a run of
    # word columns (8 values of K each); each word is decoded once for its ROWS rows. Every
    # step is a whole tile, so pointers advance by constants (no masks or clamps).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    g, jj, steps, nblk, wp, hp, hsh = _walk(q_ptr, h_ptr, pid_n, pid_k, N, K, cols_per_split,
                                            FMT, BG, NJ)
    XW: tl.constexpr = 8 if DT == 0 else 4
    RS = K // 8 * XW        # one row of X in X-pointer units
    row0 = pid_m * ROWS
    xrow = x_ptr + tl.minimum(row0, M - 1).to(tl.int64) * K
    if DT != 0:
        xrow = xrow.to(tl.pointer_type(tl.uint32))
    # X pointers in the words' own shape (equal for every g): the octets split out of them
    # broadcast over the weight rows with no layout conversion. Rows past M re-read the last.
    xp = tl.broadcast_to(xrow + (jj * XW)[None, :, None] + tl.arange(0, 4)[None, None, :],
                         (BG, NJ, 4))
    d1 = tl.minimum(1, M - 1 - row0).to(tl.int64) * RS
    d2 = tl.minimum(2, M - 1 - row0).to(tl.int64) * RS
    d3 = tl.minimum(3, M - 1 - row0).to(tl.int64) * RS
    # Symmetric formats (q4_0, GPTQ without zero points) subtract their offset 8 with the
    # float conversion, so no sum of X is needed; q6_k's 32 goes with its high crumbs.
    OFF: tl.constexpr = 8 if FMT == 0 or FMT == 4 else 0
    acc0 = tl.zeros((BG, NJ, 4), tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    # PREFETCH tiles ahead are loaded before the current one is decoded; steps past the last
    # re-read the last tile (in bounds, unused).
    if PREFETCH >= 1:
        nw, nh, ns, nm = _fetch(wp, hp, s_ptr, z_ptr, g, jj, 0, nblk, FMT, GROUP, NJ)
    if PREFETCH == 2:
        nw2, nh2, ns2, nm2 = _fetch(wp, hp, s_ptr, z_ptr, g, jj, tl.minimum(1, steps - 1),
                                    nblk, FMT, GROUP, NJ)
    for it in range(steps):
        if PREFETCH == 2:
            words, hw, s, m = nw, nh, ns, nm
            nw, nh, ns, nm = nw2, nh2, ns2, nm2
            nw2, nh2, ns2, nm2 = _fetch(wp, hp, s_ptr, z_ptr, g, jj, tl.minimum(it + 2, steps - 1),
                                        nblk, FMT, GROUP, NJ)
        elif PREFETCH == 1:
            words, hw, s, m = nw, nh, ns, nm
            nw, nh, ns, nm = _fetch(wp, hp, s_ptr, z_ptr, g, jj, tl.minimum(it + 1, steps - 1),
                                    nblk, FMT, GROUP, NJ)
        else:
            words, hw, s, m = _fetch(wp, hp, s_ptr, z_ptr, g, jj, it, nblk, FMT, GROUP, NJ)
        if FMT == 5:
            q0, q1, q2, q3, q4, q5, q6, q7 = _q6_planes(words, hw >> hsh)
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = _planes(words, OFF)
        xs = xp + it * (NJ * XW)
        acc0 = _row_step(acc0, xs, q0, q1, q2, q3, q4, q5, q6, q7, s, m, DT, FMT, OFF)
        if ROWS >= 2:
            acc1 = _row_step(acc1, xs + d1, q0, q1, q2, q3, q4, q5, q6, q7, s, m, DT, FMT, OFF)
        if ROWS >= 4:
            acc2 = _row_step(acc2, xs + d2, q0, q1, q2, q3, q4, q5, q6, q7, s, m, DT, FMT, OFF)
            acc3 = _row_step(acc3, xs + d3, q0, q1, q2, q3, q4, q5, q6, q7, s, m, DT, FMT, OFF)
    rn = pid_n * (BG * 4) + tl.arange(0, BG * 4)
    _row_out(acc0, c_ptr, row0, pid_k, M, N, rn, SPLIT_K)
    if ROWS >= 2:
        _row_out(acc1, c_ptr, row0 + 1, pid_k, M, N, rn, SPLIT_K)
    if ROWS >= 4:
        _row_out(acc2, c_ptr, row0 + 2, pid_k, M, N, rn, SPLIT_K)
        _row_out(acc3, c_ptr, row0 + 3, pid_k, M, N, rn, SPLIT_K)


@triton.jit
def _decode_tile(words, hw, hsh, s, m, FMT: tl.constexpr, DTYPE: tl.constexpr):
    """Code words `[BG, NJ, 4]` (and q6_k's crumb words, their halves hsh) with their blocks'
    affine terms as the weight tile `[4 BG rows, 8 NJ values of K]` in DTYPE."""
    BG: tl.constexpr = words.shape[0]
    NJ: tl.constexpr = words.shape[1]
    hi = words >> 16
    if FMT == 5:
        # q6_k: s (code - 32) per value; m is unused.
        c0, c1, c2, c3, c4, c5, c6, c7 = _q6_planes(words, hw >> hsh)
        p0 = c0 * s
        p1 = c1 * s
        p2 = c2 * s
        p3 = c3 * s
        p4 = c4 * s
        p5 = c5 * s
        p6 = c6 * s
        p7 = c7 * s
    else:
        p0 = _plane(words, 0, 0) * s + m
        p1 = _plane(words, 1, 0) * s + m
        p2 = _plane(words, 2, 0) * s + m
        p3 = _plane(words, 3, 0) * s + m
        p4 = _plane(hi, 0, 0) * s + m
        p5 = _plane(hi, 1, 0) * s + m
        p6 = _plane(hi, 2, 0) * s + m
        p7 = _plane(hi, 3, 0) * s + m
    # Joins append an axis; flattening [.., a, b, c] gives 4 a + 2 b + c, so the first
    # join pairs nibbles i, i + 4 and the last i, i + 1: nibble order 0..7.
    v = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)),
                tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    v = tl.reshape(v.to(DTYPE), (BG, NJ, 4, 8))
    # [BG, NJ, 4 rows, 8 nibbles] -> rows (4 g + r) by k (8 j + i).
    return tl.reshape(tl.permute(v, (0, 2, 1, 3)), (BG * 4, NJ * 8))


@triton.jit
def nib_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, c_ptr, M, N, K, cols_per_split,
                      FMT: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr,
                      BG: tl.constexpr, NJ: tl.constexpr, SPLIT_K: tl.constexpr,
                      PREFETCH: tl.constexpr):
    pdl_wait()
    # Tiles of BM rows of X by BG groups of four weight rows, NJ word columns (8 NJ values of
    # K) a step. With PREFETCH the next step's words, scales and X are loaded before this
    # step is decoded: the loop's loads feed arithmetic, not the dot, so Triton's pipeliner
    # would leave each step waiting on its own loads.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    g, jj, steps, nblk, wp, hp, hsh = _walk(q_ptr, h_ptr, pid_n, pid_k, N, K, cols_per_split,
                                            FMT, BG, NJ)
    rm = pid_m * BM + tl.arange(0, BM)
    xp = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * K + pid_k * cols_per_split * 8 \
        + tl.arange(0, NJ * 8)[None, :]
    acc = tl.zeros((BG * 4, BM), tl.float32)
    if PREFETCH:
        nw, nh, ns, nm = _fetch(wp, hp, s_ptr, z_ptr, g, jj, 0, nblk, FMT, GROUP, NJ)
        nx = tl.load(xp)
    for it in range(steps):
        if PREFETCH:
            words, hw, s, m, xt = nw, nh, ns, nm, nx
            nxt = tl.minimum(it + 1, steps - 1)   # past the last: the last again (unused)
            nw, nh, ns, nm = _fetch(wp, hp, s_ptr, z_ptr, g, jj, nxt, nblk, FMT, GROUP, NJ)
            nx = tl.load(xp + nxt * (NJ * 8))
        else:
            words, hw, s, m = _fetch(wp, hp, s_ptr, z_ptr, g, jj, it, nblk, FMT, GROUP, NJ)
            xt = tl.load(xp + it * (NJ * 8))
        w = _decode_tile(words, hw, hsh, s, m, FMT, x_ptr.dtype.element_ty)
        # W as the left operand (its rows fill the MMA's M), X^T as the right one.
        acc = tl.dot(w, tl.trans(xt), acc)
    rn = pid_n * (BG * 4) + tl.arange(0, BG * 4)
    ok = (rn < N)[:, None] & (rm < M)[None, :]
    store_out(c_ptr, rm.to(tl.int64)[None, :] * N + rn[:, None], acc, ok, pid_k, M, N, SPLIT_K)


@triton.jit
def nib_dequant_kernel(q_ptr, s_ptr, z_ptr, h_ptr, w_ptr, N, K, FMT: tl.constexpr,
                       GROUP: tl.constexpr, BG: tl.constexpr, NJ: tl.constexpr):
    """The weight `[N, K]` decoded into w_ptr's dtype, one tile of 4 BG rows by 8 NJ values of
    K a program: many-row X multiplies the decoded copy with the plain matmul, whose tiles
    the decode would otherwise repeat once per row tile of X."""
    pdl_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g, jj, steps, nblk, wp, hp, hsh = _walk(q_ptr, h_ptr, pid_n, pid_k, N, K, NJ, FMT, BG, NJ)
    words, hw, s, m = _fetch(wp, hp, s_ptr, z_ptr, g, jj, 0, nblk, FMT, GROUP, NJ)
    w = _decode_tile(words, hw, hsh, s, m, FMT, w_ptr.dtype.element_ty)
    rn = pid_n * (BG * 4) + tl.arange(0, BG * 4)
    rk = pid_k * (NJ * 8) + tl.arange(0, NJ * 8)
    tl.store(w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w, mask=(rn < N)[:, None])
