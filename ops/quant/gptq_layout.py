"""GPTQ weights in MAX's in-graph layout: one uint8 tensor holding packed codes then scales.

A GPTQ linear's graph weight is uint8 `[in * bits / 8 + 2 * groups, out]`: the little-endian bytes
of `qweight` (int32 `[in / p, out]`, p = 32 / bits) followed by those of `scales` (float16
`[groups, out]`), the whole buffer read with `out` columns. For 4-bit that is `[in / 2 + 2 groups,
out]` (MAX's layout); for 8-bit `[in + 2 groups, out]`. Groups are contiguous runs of
`group_size` input rows; a desc_act checkpoint is brought to that order by `reorder_gptq_rows`
(its rows sorted by group), and the matmul gathers its input by the same permutation.
"""

from __future__ import annotations

import numpy as np

from graphir.ops.quant.gptq import gptq_per_word, resolve_group_size, unpack_rows

__all__ = ["pack_rows", "pack_int4_rows", "gptq_weight_rows", "gptq_weight_bytes",
           "split_gptq_weight_bytes", "reorder_gptq_rows"]


def pack_rows(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """Pack uint8 codes `[n, m]` (values below 2**bits, n a multiple of 32 / bits) into int32
    `[n * bits / 32, m]`, the inverse of `gptq.unpack_rows`.

    Example:
        >>> w = pack_rows(np.arange(4, dtype=np.uint8).reshape(4, 1), 8)
        >>> hex(int(w.view(np.uint32)[0, 0]))
        '0x3020100'
    """
    p = gptq_per_word(bits)
    c = np.asarray(codes)
    if c.ndim != 2 or c.shape[0] % p or c.dtype.kind not in "iu" or \
            (c.size and (c.max() >= 1 << bits or c.min() < 0)):
        raise ValueError(f"codes must be integer [n, m] with n % {p} == 0 and values "
                         f"0..{(1 << bits) - 1}, got {c.dtype} {c.shape}")
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    words = c.astype(np.uint32).reshape(c.shape[0] // p, p, c.shape[1]) << shifts[None, :, None]
    return np.bitwise_or.reduce(words, axis=1).view(np.int32)


def pack_int4_rows(codes: np.ndarray) -> np.ndarray:
    """`pack_rows(codes, 4)`.

    Example:
        >>> w = pack_int4_rows(np.arange(8, dtype=np.uint8).reshape(8, 1))
        >>> hex(int(w.view(np.uint32)[0, 0]))
        '0x76543210'
    """
    return pack_rows(codes, 4)


def gptq_weight_rows(in_features: int, group_size: int, bits: int = 4) -> int:
    """Rows of the uint8 weight: `in * bits / 8` of packed codes plus `2 * groups` of scales.

    Example:
        >>> gptq_weight_rows(256, 128), gptq_weight_rows(256, 128, bits=8)
        (132, 260)
    """
    p = gptq_per_word(bits)
    if in_features % p:
        raise ValueError(f"GPTQ: in_features={in_features} must be a multiple of {p} "
                         f"({p} {bits}-bit codes per int32)")
    size = resolve_group_size(group_size, in_features)
    return in_features * bits // 8 + 2 * (in_features // size)


def gptq_weight_bytes(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """qweight int32 `[in / p, out]` and scales `[groups, out]` -> uint8
    `[in * bits / 8 + 2 groups, out]`."""
    out = qweight.shape[1]
    packed = np.ascontiguousarray(qweight, dtype="<i4").view(np.uint8).reshape(-1, out)
    sc = np.ascontiguousarray(scales, dtype="<f2").view(np.uint8).reshape(-1, out)
    return np.concatenate([packed, sc], axis=0)


def split_gptq_weight_bytes(weight: np.ndarray, in_features: int, group_size: int,
                            bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `gptq_weight_bytes`: (qweight int32 `[in / p, out]`, scales f16
    `[groups, out]`)."""
    rows = gptq_weight_rows(in_features, group_size, bits)
    if weight.dtype != np.uint8 or weight.ndim != 2 or weight.shape[0] != rows:
        raise ValueError(f"GPTQ weight must be uint8 [{rows}, out] for in_features={in_features}, "
                         f"group_size={group_size}, bits={bits}, got {weight.dtype} "
                         f"{weight.shape}")
    out = weight.shape[1]
    code_rows = in_features * bits // 8
    qweight = np.ascontiguousarray(weight[:code_rows]).view("<i4").reshape(-1, out)
    scales = np.ascontiguousarray(weight[code_rows:]).view("<f2").reshape(-1, out)
    return qweight.astype(np.int32), scales.astype(np.float16)


def reorder_gptq_rows(qweight: np.ndarray, perm: np.ndarray, bits: int = 4) -> np.ndarray:
    """qweight with its input rows taken in `perm` order (unpacked, permuted, repacked)."""
    codes = unpack_rows(qweight, bits)
    if perm.shape != (codes.shape[0],):
        raise ValueError(f"perm must be [{codes.shape[0]}], got {perm.shape}")
    return pack_rows(codes[perm], bits)
