"""GGUF block formats: geometry and vectorized dequantization (numpy only).

Each row of a GGUF weight is stored as `n_cols / block_elems` consecutive blocks of `block_bytes`
bytes. Layouts follow the GGML block definitions (all multi-byte fields little-endian). The 32-value
"legacy" blocks: code j (0..31) is the low nibble of qs byte j for j < 16, the high nibble of qs
byte j - 16 otherwise; Q5_x adds bit j of the uint32 qh as bit 4.

- Q4_0 (32 elems, 18 bytes): f16 d, qs[16]. y = (q - 8) * d.
- Q4_1 (32 elems, 20 bytes): f16 d, f16 m, qs[16]. y = q * d + m.
- Q5_0 (32 elems, 22 bytes): f16 d, qh[4], qs[16]. y = (q - 16) * d.
- Q5_1 (32 elems, 24 bytes): f16 d, f16 m, qh[4], qs[16]. y = q * d + m.
- Q8_0 (32 elems, 34 bytes): f16 d; 32 int8 q. y = q * d.
- Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256 elems): see ops.quant.gguf_kquants.
- F32, F16, BF16: plain little-endian element arrays.

The arithmetic is float32 in the same order as GGML's reference, so results are bit-identical to it
(and to the `gguf` package's numpy dequantizer). A block whose float16 scale is NaN or infinite is
corrupt data and raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .gguf_kquants import KQUANT_DECODERS, f16_field, kquant_scale_fields

__all__ = [
    "BlockGeometry",
    "GGUF_BLOCK_GEOMETRY",
    "gguf_block_geometry",
    "gguf_row_nbytes",
    "gguf_scale_fields",
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
        BlockGeometry("Q4_1", 32, 20),
        BlockGeometry("Q5_0", 32, 22),
        BlockGeometry("Q5_1", 32, 24),
        BlockGeometry("Q8_0", 32, 34),
        BlockGeometry("Q2_K", 256, 84),
        BlockGeometry("Q3_K", 256, 110),
        BlockGeometry("Q4_K", 256, 144),
        BlockGeometry("Q5_K", 256, 176),
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


def _check_finite(name: str, field: str, values: np.ndarray) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, block = (int(i) for i in bad[0])
        raise ValueError(
            f"corrupt {name} data: {len(bad)} block(s) have a non-finite scale {field!r}; "
            f"first at row {row}, block {block} ({field}={values[row, block]})"
        )


def legacy_codes(blocks: np.ndarray, qs_at: int, qh_at: int | None) -> np.ndarray:
    """The 32 codes of a Q4_x / Q5_x block as float32: nibble j of byte j % 16 (low for j < 16),
    plus bit j of the little-endian uint32 at `qh_at` as bit 4 for Q5_x."""
    qs = blocks[..., qs_at:qs_at + 16]
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)
    if qh_at is not None:
        qh = blocks[..., qh_at:qh_at + 4].reshape(*blocks.shape[:-1], 4, 1)
        high = ((qh >> np.arange(8, dtype=np.uint8)) & np.uint8(1)).reshape(*blocks.shape[:-1], 32)
        q = q | (high << np.uint8(4))
    return q.astype(np.float32)


def _deq_q4_0(blocks: np.ndarray) -> np.ndarray:
    return (legacy_codes(blocks, 2, None) - np.float32(8)) * f16_field(blocks, 0)[..., None]


def _deq_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    return legacy_codes(blocks, 4, None) * d[..., None] + m[..., None]


def _deq_q5_0(blocks: np.ndarray) -> np.ndarray:
    return (legacy_codes(blocks, 6, 2) - np.float32(16)) * f16_field(blocks, 0)[..., None]


def _deq_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    return legacy_codes(blocks, 8, 4) * d[..., None] + m[..., None]


def _deq_q8_0(blocks: np.ndarray) -> np.ndarray:
    q = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
    return q.astype(np.float32) * f16_field(blocks, 0)[..., None]


def _deq_float(name: str, raw: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(raw)
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


_DEQUANT = {"Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1,
            "Q8_0": _deq_q8_0, **KQUANT_DECODERS}


def gguf_scale_fields(encoding: Any) -> dict[str, int]:
    """Byte offsets of the float16 scale fields in one block of a quantized encoding.

    Example:
        >>> gguf_scale_fields("Q4_1")
        {'d': 0, 'm': 2}
    """
    geo = gguf_block_geometry(encoding)
    if geo.is_float:
        raise ValueError(f"{geo.name} is a float type; it has no blocks")
    if geo.block_elems == 256:
        return kquant_scale_fields(geo.name)
    return {"d": 0, "m": 2} if geo.name in ("Q4_1", "Q5_1") else {"d": 0}


def dequantize_gguf(raw: np.ndarray, encoding: Any, n_cols: int) -> np.ndarray:
    """Decode GGUF rows to float32.

    Args:
        raw: uint8 `[rows, n_cols / block_elems * block_bytes]`, the blocks as stored. For F32 and
            F16 a float32 / float16 `[rows, n_cols]` array is accepted too (returned as float32).
        encoding: a GGUF type name (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
            F32, F16, BF16; any case) or an enum member with that name.
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
    for field, offset in gguf_scale_fields(geo.name).items():
        _check_finite(geo.name, field, f16_field(blocks, offset))
    out = _DEQUANT[geo.name](blocks)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(rows, n_cols)
