"""GPTQ 4- and 8-bit weights: unpacking, group bookkeeping and dequantization (numpy only).

Storage (the AutoGPTQ / Hugging Face layout MAX reads), with `bits` in (4, 8) and `p = 32 / bits`
values per int32 (8 or 4):
- `qweight` int32 `[in / p, out]`: bits `bits*k .. bits*k + bits - 1` of `qweight[i, o]` hold the
  code of weight row `p i + k` (packed along `in`).
- `qzeros` int32 `[groups, out / p]`: the same bits of `qzeros[g, j]` hold the zero point of
  output column `p j + k` (packed along `out`).
- `scales` float16 `[groups, out]`; `g_idx` int32 `[in]`, the group of each input row.
- `W[i, o] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]`, `W` being `[in, out]`.

AutoGPTQ's original checkpoint format ("gptq", v1) stores `zero - 1` in qzeros and its kernels add
the 1 back without wrapping (a stored 15 means zero point 16); "gptq_v2" stores the zero itself.
Without qzeros the quantization is symmetric with zero point `2 ** (bits - 1)` (8 for 4-bit, as
in MAX; 128 for 8-bit).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GPTQ_BITS",
    "GPTQ_CHECKPOINT_FORMATS",
    "gptq_per_word",
    "unpack_rows",
    "unpack_cols",
    "unpack_int4_rows",
    "unpack_int4_cols",
    "resolve_group_size",
    "g_idx_to_perm",
    "dequantize_gptq",
]

GPTQ_BITS = (4, 8)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def gptq_per_word(bits: int) -> int:
    """Codes per int32 word: 8 for 4-bit, 4 for 8-bit.

    Example:
        >>> gptq_per_word(8)
        4
    """
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits!r}")
    return 32 // int(bits)


def _shifts(bits: int) -> np.ndarray:
    return np.arange(0, 32, bits, dtype=np.uint32)


def _as_words(packed: np.ndarray, what: str, bits: int = 4) -> np.ndarray:
    if not isinstance(packed, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(packed).__name__}")
    if packed.dtype not in (np.int32, np.uint32):
        raise ValueError(
            f"{what} must have dtype int32 ({32 // bits} packed {bits}-bit values), "
            f"got {packed.dtype}"
        )
    if packed.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {packed.shape}")
    return np.ascontiguousarray(packed).view(np.uint32)


def unpack_rows(qweight: np.ndarray, bits: int = 4) -> np.ndarray:
    """Unpack int32 `[n / p, m]` (p = 32 / bits values per word along axis 0) to uint8 `[n, m]`.

    Example:
        >>> unpack_rows(np.array([[0x03020100]], dtype=np.int32), 8)[:, 0].tolist()
        [0, 1, 2, 3]
    """
    p = gptq_per_word(bits)
    words = _as_words(qweight, "qweight", bits)
    codes = (words[:, None, :] >> _shifts(bits)[None, :, None]) & np.uint32((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(words.shape[0] * p, words.shape[1])


def unpack_cols(qzeros: np.ndarray, bits: int = 4) -> np.ndarray:
    """Unpack int32 `[g, m / p]` (p = 32 / bits values per word along axis 1) to uint8 `[g, m]`.

    Example:
        >>> unpack_cols(np.array([[0x76543210]], dtype=np.int32))[0].tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    p = gptq_per_word(bits)
    words = _as_words(qzeros, "qzeros", bits)
    codes = (words[:, :, None] >> _shifts(bits)[None, None, :]) & np.uint32((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(words.shape[0], words.shape[1] * p)


def unpack_int4_rows(qweight: np.ndarray) -> np.ndarray:
    """`unpack_rows(qweight, 4)`: int32 `[n / 8, m]` -> uint8 `[n, m]`.

    Example:
        >>> unpack_int4_rows(np.array([[0x76543210]], dtype=np.int32))[:, 0].tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    return unpack_rows(qweight, 4)


def unpack_int4_cols(qzeros: np.ndarray) -> np.ndarray:
    """`unpack_cols(qzeros, 4)`: int32 `[g, m / 8]` -> uint8 `[g, m]`."""
    return unpack_cols(qzeros, 4)


def resolve_group_size(group_size: int, in_features: int) -> int:
    """The effective group size: `in_features` for -1 (one group), else `group_size` checked.

    Example:
        >>> resolve_group_size(-1, 256), resolve_group_size(128, 256)
        (256, 128)
    """
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be an int (or -1 for one group), got {group_size!r}")
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if group_size == -1:
        return int(in_features)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (one group), got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"in_features={in_features} is not divisible by group_size={group_size}"
        )
    return int(group_size)


def _check_g_idx(g_idx: np.ndarray, group_size: int) -> tuple[np.ndarray, int]:
    if not isinstance(g_idx, np.ndarray):
        raise ValueError(f"g_idx must be a numpy array, got {type(g_idx).__name__}")
    if g_idx.ndim != 1 or not np.issubdtype(g_idx.dtype, np.integer):
        raise ValueError(f"g_idx must be a 1-D integer array, got {g_idx.dtype} {g_idx.shape}")
    size = resolve_group_size(group_size, g_idx.shape[0])
    n_groups = g_idx.shape[0] // size
    g = g_idx.astype(np.int64)
    bad = np.flatnonzero((g < 0) | (g >= n_groups))
    if bad.size:
        raise ValueError(
            f"g_idx[{bad[0]}] = {g[bad[0]]} is not a group id: {g_idx.shape[0]} rows in groups of "
            f"{size} give ids 0..{n_groups - 1}"
        )
    counts = np.bincount(g, minlength=n_groups)
    wrong = np.flatnonzero(counts != size)
    if wrong.size:
        raise ValueError(
            f"g_idx assigns {counts[wrong[0]]} rows to group {wrong[0]}; every group must have "
            f"exactly group_size={size} rows"
        )
    return g, n_groups


def g_idx_to_perm(g_idx: np.ndarray, group_size: int) -> np.ndarray:
    """The row order that sorts `g_idx` by group (stable), as int32 `[in]`.

    `x[:, perm] @ W[perm]` equals `x @ W`, and `W[perm]` has its groups in contiguous blocks of
    `group_size` rows: the desc_act `perm_idx` layout.

    Raises:
        ValueError: a group id out of range, or a group without exactly `group_size` rows.

    Example:
        >>> g_idx_to_perm(np.array([1, 0, 1, 0]), 2).tolist()
        [1, 3, 0, 2]
    """
    g, _ = _check_g_idx(g_idx, group_size)
    return np.argsort(g, kind="stable").astype(np.int32)


def dequantize_gptq(
    qweight: np.ndarray,
    scales: np.ndarray,
    qzeros: np.ndarray | None = None,
    g_idx: np.ndarray | None = None,
    group_size: int = 128,
    *,
    checkpoint_format: str = "gptq",
    bits: int = 4,
) -> np.ndarray:
    """Decode GPTQ weights to float32 `[in, out]` (input rows in their original order).

    Args:
        qweight: int32 `[in / p, out]`, codes packed along `in` (p = 32 / bits).
        scales: float16 (or float32) `[groups, out]`.
        qzeros: int32 `[groups, out / p]`, or None for symmetric weights (zero point
            `2 ** (bits - 1)`).
        g_idx: int `[in]` group of each input row (desc_act), or None for `i // group_size`.
        group_size: rows per group; -1 means a single group.
        checkpoint_format: "gptq" (stored qzeros are zero - 1, AutoGPTQ v1) or "gptq_v2"
            (stored qzeros are the zero points).
        bits: 4 or 8.

    Returns:
        float32 `[in, out]`; exact, since (q - zero) * scale fits float32 for float16 scales.

    Example:
        >>> qw = np.full((1, 2), 0x99999999 - 2**32, dtype=np.int32)  # every code 9
        >>> dequantize_gptq(qw, np.full((1, 2), 0.5, np.float16), group_size=-1)[0].tolist()
        [0.5, 0.5]
    """
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )
    p = gptq_per_word(bits)
    q = unpack_rows(qweight, bits)
    in_features, out_features = q.shape
    size = resolve_group_size(group_size, in_features)
    n_groups = in_features // size
    if not isinstance(scales, np.ndarray) or scales.dtype not in (np.float16, np.float32):
        got = getattr(scales, "dtype", type(scales).__name__)
        raise ValueError(f"scales must be a float16 or float32 numpy array, got {got}")
    if scales.shape != (n_groups, out_features):
        raise ValueError(
            f"scales has shape {scales.shape}, expected ({n_groups}, {out_features}) for "
            f"in_features={in_features}, group_size={group_size}"
        )
    if qzeros is None:
        zeros = np.full((n_groups, out_features), 1 << (bits - 1), dtype=np.int16)
    else:
        if out_features % p:
            raise ValueError(f"out_features={out_features} must be a multiple of {p} to pack "
                             f"{bits}-bit qzeros")
        expected = (n_groups, out_features // p)
        if getattr(qzeros, "shape", None) != expected:
            got = getattr(qzeros, "shape", type(qzeros).__name__)
            raise ValueError(f"qzeros has shape {got}, expected {expected}")
        zeros = unpack_cols(qzeros, bits).astype(np.int16)
        if checkpoint_format == "gptq":
            zeros += 1
    if g_idx is None:
        groups = np.arange(in_features) // size
    else:
        if getattr(g_idx, "shape", None) != (in_features,):
            got = getattr(g_idx, "shape", type(g_idx).__name__)
            raise ValueError(f"g_idx has shape {got}, expected ({in_features},)")
        groups, _ = _check_g_idx(g_idx, size)
    centered = (q.astype(np.int16) - zeros[groups]).astype(np.float32)
    return centered * scales.astype(np.float32)[groups]
