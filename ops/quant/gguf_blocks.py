"""GGUF block formats: geometry and vectorized dequantization (numpy only).

Each row of a GGUF weight is stored as `n_cols / block_elems` consecutive blocks of `block_bytes`
bytes. Layouts follow the GGML block definitions (all multi-byte fields little-endian):

- Q4_0 (32 elems, 18 bytes): f16 d; 16 bytes of nibbles, low nibble of byte j is element j, high
  nibble is element j + 16. y = (q - 8) * d.
- Q8_0 (32 elems, 34 bytes): f16 d; 32 int8 q. y = q * d.
- Q4_K (256 elems, 144 bytes): f16 d, f16 dmin; 12 bytes packing eight 6-bit (scale, min) pairs;
  128 bytes of nibbles: 64-element chunk c uses bytes 32c..32c+31, low nibbles are sub-block 2c,
  high nibbles sub-block 2c + 1. y = (d * sc) * q - dmin * m per 32-element sub-block.
- Q6_K (256 elems, 210 bytes): 128 bytes low nibbles, 64 bytes of 2-bit high parts, 16 int8
  scales, f16 d. y = (d * sc) * (q - 32) per 16-element sub-block.
- F32, F16, BF16: plain little-endian element arrays.

The arithmetic is float32 in the same order as GGML's reference, so results are bit-identical to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BlockGeometry",
    "GGUF_BLOCK_GEOMETRY",
    "gguf_block_geometry",
    "gguf_row_nbytes",
    "dequantize_gguf",
]


@dataclass(frozen=True)
class BlockGeometry:
    """Size of one GGUF block: `block_elems` logical values stored in `block_bytes` bytes."""

    name: str
    block_elems: int
    block_bytes: int

    @property
    def is_float(self) -> bool:
        return self.name in ("F32", "F16", "BF16")


GGUF_BLOCK_GEOMETRY: dict[str, BlockGeometry] = {
    g.name: g
    for g in (
        BlockGeometry("F32", 1, 4),
        BlockGeometry("F16", 1, 2),
        BlockGeometry("BF16", 1, 2),
        BlockGeometry("Q4_0", 32, 18),
        BlockGeometry("Q8_0", 32, 34),
        BlockGeometry("Q4_K", 256, 144),
        BlockGeometry("Q6_K", 256, 210),
    )
}


def gguf_block_geometry(encoding: Any) -> BlockGeometry:
    """Geometry of `encoding`: a name such as "Q4_K" (any case) or an enum member with that `.name`.

    Example:
        >>> gguf_block_geometry("q6_k").block_bytes
        210
    """
    name = encoding if isinstance(encoding, str) else getattr(encoding, "name", None)
    if not isinstance(name, str) or name.upper() not in GGUF_BLOCK_GEOMETRY:
        raise ValueError(
            f"unsupported GGUF encoding {encoding!r}; supported: {sorted(GGUF_BLOCK_GEOMETRY)}"
        )
    return GGUF_BLOCK_GEOMETRY[name.upper()]


def gguf_row_nbytes(encoding: Any, n_cols: int) -> int:
    """Bytes one row of `n_cols` logical values occupies in `encoding`.

    Example:
        >>> gguf_row_nbytes("Q4_0", 64)
        36
    """
    geo = gguf_block_geometry(encoding)
    if not isinstance(n_cols, (int, np.integer)) or n_cols <= 0:
        raise ValueError(f"{geo.name}: n_cols must be a positive int, got {n_cols!r}")
    if n_cols % geo.block_elems:
        raise ValueError(
            f"{geo.name}: n_cols={n_cols} is not a multiple of the block size "
            f"({geo.block_elems} elements per block)"
        )
    return int(n_cols) // geo.block_elems * geo.block_bytes


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian float16 at byte `offset` of every block, as float32."""
    bits = blocks[..., offset].astype(np.uint16) | (blocks[..., offset + 1].astype(np.uint16) << 8)
    return bits.view(np.float16).astype(np.float32)


def _check_finite(name: str, field: str, values: np.ndarray) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, block = (int(i) for i in bad[0])
        raise ValueError(
            f"corrupt {name} data: {len(bad)} block(s) have a non-finite scale {field!r}; "
            f"first at row {row}, block {block} ({field}={values[row, block]})"
        )


def _nibbles(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return b & np.uint8(0x0F), b >> np.uint8(4)


def _deq_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    _check_finite("Q4_0", "d", d)
    lo, hi = _nibbles(blocks[..., 2:18])
    q = np.concatenate([lo, hi], axis=-1).astype(np.int8) - np.int8(8)
    return d[..., None] * q.astype(np.float32)


def _deq_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    _check_finite("Q8_0", "d", d)
    q = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
    return q.astype(np.float32) * d[..., None]


def _deq_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    _check_finite("Q4_K", "d", d)
    _check_finite("Q4_K", "dmin", dmin)
    # Scales bytes 0-3 / 4-7 carry the low 6 bits of scale / min of sub-blocks 0-3 and, in their top
    # two bits, bits 4-5 of sub-blocks 4-7; bytes 8-11 carry the low nibbles of sub-blocks 4-7.
    s = blocks[..., 4:16]
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1).astype(np.float32)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1).astype(np.float32)
    lo, hi = _nibbles(blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32))
    q = np.stack([lo, hi], axis=-2).reshape(*blocks.shape[:-1], 8, 32).astype(np.float32)
    scale = (d[..., None] * sc)[..., None]
    offset = (dmin[..., None] * mn)[..., None]
    return (scale * q - offset).reshape(*blocks.shape[:-1], 256)


def _deq_q6_k(blocks: np.ndarray) -> np.ndarray:
    lead = blocks.shape[:-1]
    d = _f16(blocks, 208)
    _check_finite("Q6_K", "d", d)
    # Per 128-element half: elements 0-63 take the low nibbles of its 64 ql bytes, 64-127 the high
    # ones; element 32k + l takes bits 2k..2k+1 of qh byte l as bits 4-5.
    lo, hi = _nibbles(blocks[..., 0:128].reshape(*lead, 2, 64))
    low4 = np.concatenate([lo, hi], axis=-1)
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    high2 = ((qh >> shifts) & np.uint8(3)).reshape(*lead, 2, 128)
    q = (low4 | (high2 << np.uint8(4))).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    scale = (d[..., None] * sc)[..., None]
    return (scale * q.reshape(*lead, 16, 16).astype(np.float32)).reshape(*lead, 256)


def _deq_float(name: str, raw: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(raw)
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


_DEQUANT = {"Q4_0": _deq_q4_0, "Q8_0": _deq_q8_0, "Q4_K": _deq_q4_k, "Q6_K": _deq_q6_k}


def dequantize_gguf(raw: np.ndarray, encoding: Any, n_cols: int) -> np.ndarray:
    """Decode GGUF rows to float32.

    Args:
        raw: uint8 `[rows, n_cols / block_elems * block_bytes]`, the blocks as stored. For F32 and
            F16 a float32 / float16 `[rows, n_cols]` array is accepted too (returned as float32).
        encoding: "Q4_0", "Q8_0", "Q4_K", "Q6_K", "F32", "F16" or "BF16" (or an enum member
            with that name).
        n_cols: logical values per row; a multiple of the block's element count.

    Returns:
        float32 `[rows, n_cols]`, bit-identical to GGML's reference dequantization.

    Raises:
        ValueError: bad dtype or rank, a row size that does not match `n_cols`, or a block whose
            scale is NaN or infinite.

    Example:
        >>> raw = np.array([[0x00, 0x3C] + [0x98] * 16], dtype=np.uint8)  # d = 1.0
        >>> dequantize_gguf(raw, "Q4_0", 32)[0, 14:18].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    geo = gguf_block_geometry(encoding)
    expected = gguf_row_nbytes(geo.name, n_cols)
    if not isinstance(raw, np.ndarray):
        raise ValueError(f"{geo.name}: raw must be a numpy array, got {type(raw).__name__}")
    native = {"F32": np.float32, "F16": np.float16}.get(geo.name)
    if native is not None and raw.dtype == native:
        if raw.ndim != 2 or raw.shape[1] != n_cols:
            raise ValueError(
                f"{geo.name}: expected a [rows, {n_cols}] {raw.dtype} array, got shape {raw.shape}"
            )
        return raw.astype(np.float32)
    if raw.dtype != np.uint8:
        allowed = "uint8" + (f" or {np.dtype(native).name}" if native is not None else "")
        raise ValueError(f"{geo.name}: raw must have dtype {allowed}, got {raw.dtype}")
    if raw.ndim != 2:
        raise ValueError(
            f"{geo.name}: raw must be 2-D [rows, bytes_per_row], got shape {raw.shape}"
        )
    rows, nbytes = raw.shape
    if nbytes % geo.block_bytes:
        raise ValueError(
            f"{geo.name}: row byte count {nbytes} is not a multiple of the block size "
            f"({geo.block_bytes} bytes per block)"
        )
    if nbytes < expected:
        raise ValueError(
            f"{geo.name}: truncated data: {n_cols} columns need {expected} bytes per row "
            f"({expected // geo.block_bytes} blocks), got {nbytes}"
        )
    if nbytes > expected:
        raise ValueError(
            f"{geo.name}: {n_cols} columns need {expected} bytes per row "
            f"({expected // geo.block_bytes} blocks), got {nbytes} (n_cols too small?)"
        )
    if geo.is_float:
        return _deq_float(geo.name, raw)
    blocks = raw.reshape(rows, nbytes // geo.block_bytes, geo.block_bytes)
    out = _DEQUANT[geo.name](blocks)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(rows, n_cols)
