"""Quantize float32 rows into GGUF blocks (numpy only), the inverse of `dequantize_gguf`.

The 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) follow GGML's reference quantizers step for step
(byte-identical output). The K types use a plain min/max rule per sub-block, not llama.cpp's
error-minimizing search: the blocks are valid and decode with the usual error bound, but their
bytes differ from llama.cpp's. Tests use this to build weights; the decoders are the product.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphir.ops.quant.gguf_blocks import gguf_block_geometry

__all__ = ["quantize_gguf"]


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 `[...]` -> uint8 `[..., 2]`, the little-endian float16 encoding."""
    bits = values.astype(np.float16).view(np.uint16)
    return np.stack([bits & 0xFF, bits >> 8], axis=-1).astype(np.uint8)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero); float64 keeps `|v| + 0.5` exact for float32 inputs."""
    v64 = v.astype(np.float64)
    return np.sign(v64) * np.floor(np.abs(v64) + 0.5)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _q4_0(x: np.ndarray) -> np.ndarray:
    # The signed value of largest magnitude maps to -8, as in GGML.
    idx = np.abs(x).argmax(axis=-1)[..., None]
    d = np.take_along_axis(x, idx, axis=-1)[..., 0] / np.float32(-8)
    v = x * _safe_inverse(d)[..., None] + np.float32(8.5)
    q = np.minimum(np.floor(v), 15).astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return np.concatenate([_f16_bytes(d), packed], axis=-1)


def _pack_legacy(q: np.ndarray, five_bit: bool) -> list[np.ndarray]:
    """Codes uint8 [..., 32] -> [qh (Q5_x only), qs]: nibble j of byte j % 16, bit 4 in qh bit j."""
    low = q & np.uint8(15)
    qs = low[..., :16] | (low[..., 16:] << np.uint8(4))
    if not five_bit:
        return [qs]
    high = ((q >> np.uint8(4)) & np.uint8(1)).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(high, axis=-1).astype("<u4")
    return [qh[..., None].view(np.uint8), qs]


def _q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / np.float32(15)
    v = (x - lo[..., None]) * _safe_inverse(d)[..., None] + np.float32(0.5)
    q = np.minimum(np.trunc(v), 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), *_pack_legacy(q, False)], axis=-1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    idx = np.abs(x).argmax(axis=-1)[..., None]
    d = np.take_along_axis(x, idx, axis=-1)[..., 0] / np.float32(-16)
    v = x * _safe_inverse(d)[..., None] + np.float32(16.5)
    q = np.minimum(np.trunc(v), 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), *_pack_legacy(q, True)], axis=-1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / np.float32(31)
    v = (x - lo[..., None]) * _safe_inverse(d)[..., None] + np.float32(0.5)
    q = np.trunc(v).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), *_pack_legacy(q, True)], axis=-1)


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=-1) / np.float32(127)
    q = _roundf(x * _safe_inverse(d)[..., None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=-1)


def _min_max_codes(sub: np.ndarray, levels: int, scale_levels: int):
    """Asymmetric codes per sub-block (last axis): (d, dmin, sc, m, q) with
    y = d * sc * q - dmin * m, q in 0..levels, sc and m in 0..scale_levels."""
    mn = np.maximum(-sub.min(axis=-1), np.float32(0))
    span = (sub.max(axis=-1) + mn) / np.float32(levels)
    d = (span.max(axis=-1) / np.float32(scale_levels)).astype(np.float16).astype(np.float32)
    dmin = (mn.max(axis=-1) / np.float32(scale_levels)).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(span * _safe_inverse(d)[..., None]), 0, scale_levels).astype(np.uint8)
    m = np.clip(np.rint(mn * _safe_inverse(dmin)[..., None]), 0, scale_levels).astype(np.uint8)
    scale = d[..., None] * sc.astype(np.float32)
    offset = dmin[..., None] * m.astype(np.float32)
    q = np.rint((sub + offset[..., None]) * _safe_inverse(scale)[..., None])
    return d, dmin, sc, m, np.clip(q, 0, levels).astype(np.uint8)


def _six_bit_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ],
        axis=-1,
    )


def _two_bit_planes(q: np.ndarray) -> np.ndarray:
    """2-bit codes [..., 256] -> qs [..., 64]: bits 2j of byte 32n + l hold element 128n+32j+l."""
    planes = q.reshape(*q.shape[:-1], 2, 4, 32).astype(np.uint8)
    out = np.zeros((*q.shape[:-1], 2, 32), dtype=np.uint8)
    for j in range(4):
        out |= (planes[..., j, :] & np.uint8(3)) << np.uint8(2 * j)
    return out.reshape(*q.shape[:-1], 64)


def _q2_k(x: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    d, dmin, sc, m, q = _min_max_codes(x.reshape(*lead, 16, 16), 3, 15)
    return np.concatenate([sc | (m << np.uint8(4)), _two_bit_planes(q.reshape(*lead, 256)),
                           _f16_bytes(d), _f16_bytes(dmin)], axis=-1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    sub = x.reshape(*lead, 16, 16)
    idx = np.abs(sub).argmax(axis=-1)[..., None]
    step = np.take_along_axis(sub, idx, axis=-1)[..., 0] / np.float32(-4)  # extreme -> code -4
    d = (np.abs(step).max(axis=-1) / np.float32(31)).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step * _safe_inverse(d)[..., None]), -32, 31).astype(np.int8)
    scale = d[..., None] * sc.astype(np.float32)
    q = np.clip(np.rint(sub * _safe_inverse(scale)[..., None]), -4, 3).astype(np.int8)
    q = q.reshape(*lead, 256)
    kept = (q >= 0).astype(np.uint8).reshape(*lead, 8, 32)  # bit 4n + j of hmask[l]
    hmask = np.bitwise_or.reduce(kept << np.arange(8, dtype=np.uint8)[:, None], axis=-2)
    low2 = (q + np.int8(4) * (q < 0)).astype(np.uint8)
    u = (sc.astype(np.int16) + 32).astype(np.uint8)  # 6-bit unsigned scale, sub-block s
    lo = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)
    hi = (u >> 4).reshape(*lead, 4, 4)  # [s // 4, s % 4]
    hi_bytes = np.zeros((*lead, 4), dtype=np.uint8)
    for k in range(4):
        hi_bytes |= hi[..., k, :] << np.uint8(2 * k)
    return np.concatenate([hmask, _two_bit_planes(low2), lo, hi_bytes, _f16_bytes(d)], axis=-1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    d, dmin, sc, m, q = _min_max_codes(x.reshape(*lead, 8, 32), 15, 63)
    packed_scales = _six_bit_scales(sc, m)
    pairs = q.reshape(*lead, 4, 2, 32)
    qs = (pairs[..., 0, :] | (pairs[..., 1, :] << np.uint8(4))).reshape(*lead, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed_scales, qs], axis=-1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    d, dmin, sc, m, q = _min_max_codes(x.reshape(*lead, 8, 32), 31, 63)
    pairs = (q & np.uint8(15)).reshape(*lead, 4, 2, 32)
    qs = (pairs[..., 0, :] | (pairs[..., 1, :] << np.uint8(4))).reshape(*lead, 128)
    high = (q >> np.uint8(4)) << np.arange(8, dtype=np.uint8)[:, None]  # bit s of qh[l]
    qh = np.bitwise_or.reduce(high, axis=-2)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _six_bit_scales(sc, m), qh, qs],
                          axis=-1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    sub = x.reshape(*lead, 16, 16)
    step = np.abs(sub).max(axis=-1) / np.float32(31)
    d = (step.max(axis=-1) / np.float32(127)).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step * _safe_inverse(d)[..., None]), -128, 127).astype(np.int8)
    scale = d[..., None] * sc.astype(np.float32)
    q = np.clip(np.rint(sub * _safe_inverse(scale)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(*lead, 2, 4, 32)  # [half, k, l]: element 128n + 32k + l
    low = q & np.uint8(15)
    ql = np.concatenate(
        [low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], axis=-1
    ).reshape(*lead, 128)
    qh = np.zeros((*lead, 2, 32), dtype=np.uint8)
    for k in range(4):
        qh |= ((q[..., k, :] >> 4) & 3) << (2 * k)
    return np.concatenate(
        [ql, qh.reshape(*lead, 64), sc.view(np.uint8), _f16_bytes(d)], axis=-1
    ).astype(np.uint8)


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = ((bits & 0xFFFF0000) | (64 << 16)) >> 16
    out = np.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).astype("<u2")
    return out.view(np.uint8)


_QUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
          "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_gguf(weights: np.ndarray, encoding: Any) -> np.ndarray:
    """Encode float rows as GGUF blocks.

    Args:
        weights: `[rows, cols]` float array (cast to float32); every value finite.
        encoding: any GGUF type `dequantize_gguf` decodes (or an enum member with that name).

    Returns:
        uint8 `[rows, cols / block_elems * block_bytes]`, the layout `dequantize_gguf` reads.

    Example:
        >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
        >>> quantize_gguf(w, "Q8_0").shape
        (2, 34)
    """
    geo = gguf_block_geometry(encoding)
    w = np.asarray(weights)
    if w.ndim != 2:
        raise ValueError(f"{geo.name}: weights must be 2-D [rows, cols], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{geo.name}: weights must be a float array, got dtype {w.dtype}")
    rows, cols = w.shape
    if cols % geo.block_elems:
        raise ValueError(
            f"{geo.name}: cols={cols} is not a multiple of the block size "
            f"({geo.block_elems} elements per block)"
        )
    w = np.ascontiguousarray(w, dtype=np.float32)
    if geo.name == "F32":
        return w.astype("<f4").view(np.uint8)
    if geo.name == "F16":
        return w.astype("<f2").view(np.uint8)
    if geo.name == "BF16":
        return _bf16(w)
    if not np.isfinite(w).all():
        raise ValueError(f"{geo.name}: weights contain NaN or infinite values; cannot quantize")
    blocks = w.reshape(rows, cols // geo.block_elems, geo.block_elems)
    out = _QUANT[geo.name](blocks)
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(rows, -1)
