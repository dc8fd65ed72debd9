"""GPTQ weights in MAX's in-graph layout: one uint8 tensor holding packed codes then scales.

A GPTQ linear's graph weight is uint8 `[in / 2 + 2 * groups, out]`: the little-endian bytes of
`qweight` (int32 `[in / 8, out]`) followed by those of `scales` (float16 `[groups, out]`), the
whole buffer read with `out` columns. Groups are contiguous runs of `group_size` input rows; a
desc_act checkpoint is brought to that order by `reorder_gptq_rows` (its rows sorted by group),
and the matmul gathers its input by the same permutation.
"""

from __future__ import annotations

import numpy as np

from graphir.ops.quant.gptq import resolve_group_size, unpack_int4_rows

__all__ = ["pack_int4_rows", "gptq_weight_rows", "gptq_weight_bytes", "split_gptq_weight_bytes",
           "reorder_gptq_rows"]

_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


def pack_int4_rows(codes: np.ndarray) -> np.ndarray:
    """Pack uint8 codes `[n, m]` (values 0..15, n a multiple of 8) into int32 `[n / 8, m]`.

    Example:
        >>> w = pack_int4_rows(np.arange(8, dtype=np.uint8).reshape(8, 1))
        >>> hex(int(w.view(np.uint32)[0, 0]))
        '0x76543210'
    """
    c = np.asarray(codes)
    if c.ndim != 2 or c.shape[0] % 8 or c.dtype.kind not in "iu" or c.size and c.max() > 15:
        raise ValueError(f"codes must be integer [n, m] with n % 8 == 0 and values 0..15, got "
                         f"{c.dtype} {c.shape}")
    nib = c.astype(np.uint32).reshape(c.shape[0] // 8, 8, c.shape[1]) << _SHIFTS[None, :, None]
    return np.bitwise_or.reduce(nib, axis=1).view(np.int32)


def gptq_weight_rows(in_features: int, group_size: int) -> int:
    """Rows of the uint8 weight: `in / 2` of packed codes plus `2 * groups` of scales.

    Example:
        >>> gptq_weight_rows(256, 128)
        132
    """
    if in_features % 8:
        raise ValueError(f"GPTQ: in_features={in_features} must be a multiple of 8 "
                         f"(8 codes per int32)")
    size = resolve_group_size(group_size, in_features)
    return in_features // 2 + 2 * (in_features // size)


def gptq_weight_bytes(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """qweight int32 `[in / 8, out]` and scales `[groups, out]` -> uint8 `[in/2 + 2 groups, out]`."""
    out = qweight.shape[1]
    packed = np.ascontiguousarray(qweight, dtype="<i4").view(np.uint8).reshape(-1, out)
    sc = np.ascontiguousarray(scales, dtype="<f2").view(np.uint8).reshape(-1, out)
    return np.concatenate([packed, sc], axis=0)


def split_gptq_weight_bytes(weight: np.ndarray, in_features: int,
                            group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `gptq_weight_bytes`: (qweight int32 `[in/8, out]`, scales f16 `[groups, out]`)."""
    rows = gptq_weight_rows(in_features, group_size)
    if weight.dtype != np.uint8 or weight.ndim != 2 or weight.shape[0] != rows:
        raise ValueError(f"GPTQ weight must be uint8 [{rows}, out] for in_features={in_features}, "
                         f"group_size={group_size}, got {weight.dtype} {weight.shape}")
    out = weight.shape[1]
    half = in_features // 2
    qweight = np.ascontiguousarray(weight[:half]).view("<i4").reshape(in_features // 8, out)
    scales = np.ascontiguousarray(weight[half:]).view("<f2").reshape(-1, out)
    return qweight.astype(np.int32), scales.astype(np.float16)


def reorder_gptq_rows(qweight: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """qweight with its input rows taken in `perm` order (unpacked, permuted, repacked)."""
    codes = unpack_int4_rows(qweight)
    if perm.shape != (codes.shape[0],):
        raise ValueError(f"perm must be [{codes.shape[0]}], got {perm.shape}")
    return pack_int4_rows(codes[perm])
