"""Vectorized decoders of GGUF's 256-value "K" super-blocks (numpy only).

Every function takes uint8 blocks `[rows, n_blocks, block_bytes]` and returns float32
`[rows, n_blocks, 256]`. Byte layouts (multi-byte fields little-endian; "element e" is the e-th
value of the super-block):

- Q2_K (84 bytes): scales[16] (low nibble: scale, high nibble: min, of 16-element sub-block
  e // 16), qs[64], f16 d, f16 dmin. Element e = 128 n + 32 j + l takes bits 2j..2j+1 of
  qs[32 n + l]. y = (d * sc) * q - (dmin * m).
- Q3_K (110 bytes): hmask[32], qs[64], scales[12], f16 d. The 2 low bits of q as in Q2_K; bit
  4 n + j of hmask[l] set means q is kept, clear means q - 4. Sixteen 6-bit scales: low nibble of
  scales[s % 8] (bits 4 (s // 8)..), high 2 bits from scales[8 + s % 4] (bits 2 (s // 4)..);
  y = (d * (sc - 32)) * q.
- Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, qs[128]: element
  e = 64 c + 32 h + l is nibble h of qs[32 c + l], sub-block 2 c + h. y = (d * sc) * q - dmin * m.
- Q5_K (176 bytes): f16 d, f16 dmin, scales[12] as Q4_K, qh[32], qs[128] as Q4_K; bit (e // 32)
  of qh[e % 32] is bit 4 of q. y = (d * sc) * q - dmin * m.
- Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], f16 d. Element e = 128 n + 32 k + l: low
  nibble (k < 2) or high nibble (k >= 2) of ql[64 n + 32 (k % 2) + l], bits 2k..2k+1 of
  qh[32 n + l] as bits 4-5; y = (d * sc) * (q - 32) per 16-element sub-block.

The arithmetic is float32, each product and difference rounded in the order written above (the
order of GGML's reference), so results are bit-identical to it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["KQUANT_DECODERS", "kquant_scale_fields"]

_F = np.float32


def f16_bits(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian float16 at byte `offset` of every block, as its uint16 bits."""
    return blocks[..., offset].astype(np.uint16) | (blocks[..., offset + 1].astype(np.uint16) << 8)


def f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian float16 at byte `offset` of every block, as float32."""
    return f16_bits(blocks, offset).view(np.float16).astype(_F)


def _nibbles(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return b & np.uint8(0x0F), b >> np.uint8(4)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """qs `[..., 64]` -> the 256 2-bit codes in element order (128 n + 32 j + l)."""
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    return ((q >> shifts) & np.uint8(3)).reshape(*qs.shape[:-1], 256)


def six_bit_pairs(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs of Q4_K / Q5_K's 12 scale bytes, as float32 [..., 8]."""
    # Bytes 0-3 / 4-7 carry the low 6 bits of scale / min of sub-blocks 0-3 and, in their top two
    # bits, bits 4-5 of sub-blocks 4-7; bytes 8-11 carry the low nibbles of sub-blocks 4-7.
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1).astype(_F)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1).astype(_F)
    return sc, mn


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    lead = blocks.shape[:-1]
    d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)
    sc, mn = _nibbles(blocks[..., 0:16])
    scale = (d[..., None] * sc.astype(_F))[..., None]
    offset = (dmin[..., None] * mn.astype(_F))[..., None]
    q = _two_bit_planes(blocks[..., 16:80]).reshape(*lead, 16, 16).astype(_F)
    return (scale * q - offset).reshape(*lead, 256)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    lead = blocks.shape[:-1]
    d = f16_field(blocks, 108)
    low2 = _two_bit_planes(blocks[..., 32:96]).astype(np.int8)
    hm = blocks[..., 0:32].reshape(*lead, 1, 32)
    bit = np.arange(8, dtype=np.uint8).reshape(8, 1)
    kept = ((hm >> bit) & np.uint8(1)).reshape(*lead, 256)  # bit 4n + j <-> element 32 (4n+j) + l
    q = low2 - np.int8(4) * (np.int8(1) - kept.astype(np.int8))
    s = blocks[..., 96:108]
    lo_nib = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], axis=-1)
    hi = s[..., 8:12].reshape(*lead, 1, 4)
    hi2 = ((hi >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & 3).reshape(*lead, 16)
    sc = (lo_nib | (hi2 << 4)).astype(np.int8) - np.int8(32)
    scale = (d[..., None] * sc.astype(_F))[..., None]
    return (scale * q.reshape(*lead, 16, 16).astype(_F)).reshape(*lead, 256)


def q4_k_codes(blocks: np.ndarray) -> np.ndarray:
    """Q4_K's 256 4-bit codes of each block in element order, uint8 `[..., 256]`."""
    lo, hi = _nibbles(blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32))
    return np.stack([lo, hi], axis=-2).reshape(*blocks.shape[:-1], 256)


def q6_k_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K's 256 codes of each block in element order as (low nibbles, high 2 bits), uint8
    `[..., 256]` each."""
    lead = blocks.shape[:-1]
    lo, hi = _nibbles(blocks[..., 0:128].reshape(*lead, 2, 64))
    low4 = np.concatenate([lo, hi], axis=-1).reshape(*lead, 256)
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    return low4, ((qh >> shifts) & np.uint8(3)).reshape(*lead, 256)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    lead = blocks.shape[:-1]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    sc, mn = six_bit_pairs(blocks[..., 4:16])
    q = q4_k_codes(blocks).reshape(*lead, 8, 32).astype(_F)
    scale = (d[..., None] * sc)[..., None]
    offset = (dmin[..., None] * mn)[..., None]
    return (scale * q - offset).reshape(*lead, 256)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    lead = blocks.shape[:-1]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    sc, mn = six_bit_pairs(blocks[..., 4:16])
    lo, hi = _nibbles(blocks[..., 48:176].reshape(*lead, 4, 32))
    low4 = np.stack([lo, hi], axis=-2).reshape(*lead, 8, 32)
    qh = blocks[..., 16:48].reshape(*lead, 1, 32)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & np.uint8(1)
    q = (low4 | (high << np.uint8(4))).astype(_F)
    scale = (d[..., None] * sc)[..., None]
    offset = (dmin[..., None] * mn)[..., None]
    return (scale * q - offset).reshape(*lead, 256)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    lead = blocks.shape[:-1]
    d = f16_field(blocks, 208)
    low4, high2 = q6_k_codes(blocks)
    q = (low4 | (high2 << np.uint8(4))).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(_F)
    scale = (d[..., None] * sc)[..., None]
    return (scale * q.reshape(*lead, 16, 16).astype(_F)).reshape(*lead, 256)


KQUANT_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def kquant_scale_fields(name: str) -> dict[str, int]:
    """Byte offsets of the float16 fields of a K block, by field name."""
    return {"Q2_K": {"d": 80, "dmin": 82}, "Q3_K": {"d": 108}, "Q4_K": {"d": 0, "dmin": 2},
            "Q5_K": {"d": 0, "dmin": 2}, "Q6_K": {"d": 208}}[name]
