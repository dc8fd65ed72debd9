"""Quantize float32 rows into GGUF blocks (numpy only), the inverse of `dequantize_gguf`.

Q4_0 and Q8_0 follow GGML's reference quantizers step for step (byte-identical output). Q4_K and
Q6_K use a plain min/max rule per sub-block, not llama.cpp's error-minimizing search: the blocks are
valid and decode with the usual error bound, but their bytes differ from llama.cpp's.
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


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=-1) / np.float32(127)
    q = _roundf(x * _safe_inverse(d)[..., None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=-1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    sub = x.reshape(*lead, 8, 32)
    mn = np.maximum(-sub.min(axis=-1), np.float32(0))
    span = (sub.max(axis=-1) + mn) / np.float32(15)
    d = (span.max(axis=-1) / np.float32(63)).astype(np.float16).astype(np.float32)
    dmin = (mn.max(axis=-1) / np.float32(63)).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(span * _safe_inverse(d)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(mn * _safe_inverse(dmin)[..., None]), 0, 63).astype(np.uint8)
    scale = d[..., None] * sc.astype(np.float32)
    offset = dmin[..., None] * m.astype(np.float32)
    q = np.rint((sub + offset[..., None]) * _safe_inverse(scale)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8)
    packed_scales = np.concatenate(
        [
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ],
        axis=-1,
    )
    pairs = q.reshape(*lead, 4, 2, 32)
    qs = (pairs[..., 0, :] | (pairs[..., 1, :] << np.uint8(4))).reshape(*lead, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed_scales, qs], axis=-1)


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


_QUANT = {"Q4_0": _q4_0, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def quantize_gguf(weights: np.ndarray, encoding: Any) -> np.ndarray:
    """Encode float rows as GGUF blocks.

    Args:
        weights: `[rows, cols]` float array (cast to float32); every value finite.
        encoding: "Q4_0", "Q8_0", "Q4_K", "Q6_K", "F32", "F16" or "BF16" (or an enum member
            with that name).

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
