"""The GPU's 4-bit weight layout ("nib"): codes and scales apart, four rows interleaved.

GGUF blocks (18 bytes for Q4_0, 144 for Q4_K) interleave scales with codes, so a GPU kernel
reading them directly loads 2 bytes at a time; GPTQ packs eight codes of one column down K,
so a row's codes are a strided gather. Repacked once at load time, a weight `[N, K]` becomes
row groups of four (N padded to a multiple of 4 with zero rows):

- `codes` int32 `[N / 4, K / 8, 4]`: group g, word column j, row r holds in bits 4i..4i+3 the
  code of value k = 8 j + i of row 4 g + r. A lane's 16-byte load is one word column of four
  rows: the eight X values it needs are one 16-byte load too, decoded once for four rows.
- per-block affine terms (32-value blocks, or GPTQ groups), value = s * code + m, in the
  narrowest exact form, each `[N / 4, blocks, 4]` (four rows' terms of a block adjacent):
  * "q4_0": `scales` float16 (s = d, m = -8 d);
  * "q4_1": `scales` uint32, float16 s in the low half, float16 m in the high;
  * "q4_k": `scales` uint16 (6-bit sc at bits 0-5, 6-bit min at bits 8-13) and `supers`
    uint32 `[N / 4, K / 256, 4]` (float16 d low, float16 dmin high): s = d sc, m = -dmin min,
    both exact in float32, as GGML's reference computes them. Row r's supers word of a
    super-block also rides in the spare bits 6-7, 14-15 of the scales of its blocks 2r, 2r + 1
    (16 bits a block: its four rows' spare bits; SPARE_FIELDS), so the one-row GEMV, a block a
    lane, gathers the words from its neighbours in four shuffles and never reads `supers`
    (kept for the kernels that take a block's terms row by row);
  * "gptq": `scales` float16 and `zeros` uint8 per group of G (s, m = -s z: exact, an 11-bit
    mantissa times a code below 2**8); "gptq_sym": scales only (z = 8).
Bytes per value: codes 0.5, plus 1/16 (q4_0), 1/8 (q4_1), 0.078 (q4_k; 1/16, the checkpoint's,
as the one-row GEMV reads it), 2/G or 3/G (gptq), 0.32 (q6_k): the checkpoint's within 3%.
"""
from __future__ import annotations

import numpy as np

from .gguf_blocks import legacy_codes, gguf_block_geometry
from .gguf_kquants import f16_bits, q4_k_codes, q6_k_codes, six_bit_pairs

NIB_FORMATS = ("q4_0", "q4_1", "q4_k", "gptq", "gptq_sym", "q6_k")
# q4_k: block k of a super-block carries half k % 2 of row k // 2's supers word, 16 bits spread
# over its four rows' scales: row r's spare bits 6-7 hold the half's bits 2r, 2r + 1 and bits
# 14-15 its bits 2r + 8, 2r + 9 (so (scale >> 6) & 0x0303, shifted by 2r, ORs into the half).
SPARE_FIELDS = 0x0303


def _spare_bits(supers: np.ndarray) -> np.ndarray:
    """uint16 `[G, K / 32, 4]`: each block's spare bits, from supers `[G, K / 256, 4]`."""
    halves = np.stack([supers & 0xFFFF, supers >> 16], axis=-1).reshape(*supers.shape[:2], 8)
    r = np.arange(4, dtype=np.uint32)
    spare = ((halves[..., None] >> (2 * r)) & SPARE_FIELDS) << 6       # [G, S, 8 blocks, 4 rows]
    return spare.reshape(supers.shape[0], -1, 4).astype(np.uint16)


def _groups_of_four(a: np.ndarray) -> np.ndarray:
    """`[N, X]` -> `[ceil(N / 4), X, 4]` (rows past N zero)."""
    n = a.shape[0]
    pad = -n % 4
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return np.ascontiguousarray(a.reshape(-1, 4, *a.shape[1:]).swapaxes(1, 2))


def _rows(a: np.ndarray, n: int) -> np.ndarray:
    """The inverse of _groups_of_four: `[G, X, 4]` -> `[n, X]`."""
    return a.swapaxes(1, 2).reshape(-1, a.shape[1])[:n]


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes `[N, K]` (0..15, K a multiple of 32) -> int32 words `[ceil(N / 4), K / 8, 4]`."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"nib layout: K={k} must be a multiple of 32")
    c = codes.astype(np.uint32).reshape(n, k // 8, 8)
    words = np.zeros((n, k // 8), np.uint32)
    for i in range(8):
        words |= c[..., i] << np.uint32(4 * i)
    return _groups_of_four(words.view(np.int32))


def pack_crumbs(hi: np.ndarray) -> np.ndarray:
    """uint8 2-bit values `[N, K]` -> int32 `[ceil(N / 4), K / 16, 4]` (value 16 h + i at bits 2i)."""
    n, k = hi.shape
    c = hi.astype(np.uint32).reshape(n, k // 16, 16)
    words = np.zeros((n, k // 16), np.uint32)
    for i in range(16):
        words |= c[..., i] << np.uint32(2 * i)
    return _groups_of_four(words.view(np.int32))


def unpack_codes(words: np.ndarray, n: int) -> np.ndarray:
    """The inverse of pack_codes: int32 `[G, K / 8, 4]` -> uint8 `[n, K]`."""
    w = _rows(words, n).view(np.uint32)
    c = np.stack([(w >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1)
    return c.reshape(n, -1).astype(np.uint8)


def _blocks(raw: np.ndarray, encoding: str, k: int) -> np.ndarray:
    geo = gguf_block_geometry(encoding)
    n = raw.shape[0]
    if raw.shape[1] != k // geo.block_elems * geo.block_bytes:
        raise ValueError(f"nib layout: {encoding} rows of K={k} are "
                         f"{k // geo.block_elems * geo.block_bytes} bytes, got {raw.shape[1]}")
    return np.ascontiguousarray(raw).reshape(n, k // geo.block_elems, geo.block_bytes)


def repack_gguf(raw: np.ndarray, encoding: str, k: int) -> tuple[np.ndarray, ...]:
    """GGUF rows `[N, row_bytes]` of Q4_0, Q4_1, Q4_K or Q6_K -> (codes, scales[, supers[,
    crumbs]])."""
    b = _blocks(raw, encoding, k)
    n = b.shape[0]
    if encoding == "Q4_0":
        codes = legacy_codes(b, 2, None).astype(np.uint8).reshape(n, k)
        return pack_codes(codes), _groups_of_four(f16_bits(b, 0).view(np.float16))
    if encoding == "Q4_1":
        codes = legacy_codes(b, 4, None).astype(np.uint8).reshape(n, k)
        sm = f16_bits(b, 0).astype(np.uint32) | (f16_bits(b, 2).astype(np.uint32) << 16)
        return pack_codes(codes), _groups_of_four(sm)
    if encoding == "Q4_K":
        sc, mn = six_bit_pairs(b[..., 4:16])
        scm = (sc.astype(np.uint16) | (mn.astype(np.uint16) << 8)).reshape(n, k // 32)
        supers = _groups_of_four(f16_bits(b, 0).astype(np.uint32)
                                 | (f16_bits(b, 2).astype(np.uint32) << 16))
        return (pack_codes(q4_k_codes(b).reshape(n, k)),
                _groups_of_four(scm) | _spare_bits(supers), supers)
    if encoding == "Q6_K":
        low4, high2 = q6_k_codes(b)
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(n, k // 16)
        d = f16_bits(b, 208).view(np.float16)
        return (pack_codes(low4.reshape(n, k)), _groups_of_four(sc), _groups_of_four(d),
                pack_crumbs(high2.reshape(n, k)))
    raise ValueError(f"nib layout: no repack for GGUF {encoding}; have Q4_0, Q4_1, Q4_K, Q6_K")


def repack_gptq(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                zero_plus_one: bool) -> tuple[np.ndarray, ...]:
    """4-bit GPTQ (qweight int32 `[K / 8, N]`, scales float16 `[K / G, N]`, unpacked zero
    points uint8 `[K / G, N]` or None for symmetric 8) -> (codes, scales, zeros) in nib layout,
    the checkpoint's "+1" on stored zeros applied."""
    from .gptq import unpack_rows

    codes = unpack_rows(qweight, 4).T  # [N, K]
    groups = scales.shape[0]
    if zeros is None:
        z = np.full((groups, codes.shape[0]), 8, np.uint8)
    else:
        z = zeros.astype(np.uint16) + (1 if zero_plus_one else 0)
        if z.max(initial=0) > 255:
            raise ValueError("nib layout: GPTQ zero point above 255")
        z = z.astype(np.uint8)
    return (pack_codes(np.ascontiguousarray(codes).astype(np.uint8)),
            _groups_of_four(np.ascontiguousarray(scales.astype(np.float16).T)),
            _groups_of_four(np.ascontiguousarray(z.T)))


def dequantize_nib(fmt: str, n: int, codes: np.ndarray, scales: np.ndarray,
                   extra: np.ndarray | None = None, group: int = 32,
                   crumbs: np.ndarray | None = None) -> np.ndarray:
    """float32 `[n, K]` of a nib-layout weight: s * code + m per block (the kernels' math)."""
    c = unpack_codes(codes, n).astype(np.float32)
    k = c.shape[1]
    if fmt == "q6_k":
        w = _rows(crumbs, n).view(np.uint32)
        hi = np.stack([(w >> np.uint32(2 * i)) & np.uint32(3) for i in range(16)], axis=-1)
        q = (c + 16 * hi.reshape(n, k).astype(np.float32) - 32).reshape(n, k // 16, 16)
        scale = np.repeat(_rows(extra, n).astype(np.float32), 16, axis=1) \
            * _rows(scales, n).astype(np.float32)
        return (scale[..., None] * q).reshape(n, k)
    sc = _rows(scales, n)
    ex = None if extra is None else _rows(extra, n)
    if fmt == "q4_0":
        s = sc.astype(np.float32)
        m = -8.0 * s
    elif fmt == "q4_1":
        s, m = f16_halves(sc)
    elif fmt == "q4_k":
        d, dmin = f16_halves(ex)
        s = np.repeat(d, 8, axis=1) * (sc & 0x3F).astype(np.float32)
        m = -(np.repeat(dmin, 8, axis=1) * ((sc >> 8) & 0x3F).astype(np.float32))
    elif fmt in ("gptq", "gptq_sym"):
        s = np.repeat(sc.astype(np.float32), group // 32, axis=1)
        z = np.full_like(s, 8.0) if ex is None else np.repeat(ex.astype(np.float32), group // 32, axis=1)
        m = -(s * z)
    else:
        raise ValueError(f"nib layout: unknown format {fmt!r}; have {NIB_FORMATS}")
    return (c.reshape(n, k // 32, 32) * s[..., None] + m[..., None]).reshape(n, k)


def q4_k_spare_supers(scales: np.ndarray) -> np.ndarray:
    """q4_k's supers words `[G, K / 256, 4]` gathered from the scales' spare bits (uint16 `[G, K /
    32, 4]`), as the one-row GEMV does."""
    g, blocks, _ = scales.shape
    r = np.arange(4, dtype=np.uint32)
    parts = ((scales.astype(np.uint32) >> 6) & SPARE_FIELDS) << (2 * r)
    half = np.bitwise_or.reduce(parts, axis=-1).reshape(g, blocks // 8, 4, 2)
    return half[..., 0] | (half[..., 1] << 16)


def f16_halves(u32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float16 halves of uint32 words, as float32."""
    lo = (u32 & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    hi = (u32 >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
    return lo, hi


__all__ = ["NIB_FORMATS", "SPARE_FIELDS", "pack_codes", "pack_crumbs", "unpack_codes",
           "repack_gguf", "repack_gptq", "dequantize_nib", "q4_k_spare_supers", "f16_halves"]
