"""Panel layouts of matmul weights packed once at load (no MLIR here: the runtime packs with it).

`"nk<NR>"` packs a `[N, K]` operand used transposed (a Linear weight), `"kn<NR>"` a `[K, N]`
one, into f32 panels of NR columns, `[N/NR, K, NR]`: packed[p, k, j] = W[p*NR + j, k]
(schedules.py's outer-product kernel reads one k row of a panel as NR/lanes vectors).

A trailing `p` (`"nk32p"`) packs bf16 pairs for the AVX512-BF16 kernel (lowerings/
bf16_matmul.py): `[N/NR, K/2, 2*NR]` bf16, packed[p, kk, 2j + t] = W[p*NR + j, 2kk + t], so one
32-bit lane of a vector holds the two k values `vdpbf16ps` multiplies by a broadcast pair of x.
K must be even.

`"q4k_r"` and `"q5k_r"` are not panel layouts: GGUF Q4_K / Q5_K rows `[N, blocks x 144]` /
`[N, blocks x 176]` (uint8) stay rows of blocks, each with its twelve bytes of packed six-bit
scales and mins unpacked to eight scale bytes then eight min bytes (148 / 180 bytes a block: d,
dmin, scales, mins, then the rest as stored: Q5_K's high bits and the codes), so the AVX2 row
path reads a sub-block's scale with one byte load (lowerings/quant_k_lanes.py).
`"q6k_r"`: GGUF Q6_K rows `[N, blocks x 210]` with each block's bytes reordered (212 bytes:
d, two zero bytes, the 16 scales, then the low-nibble bytes and the high-bit bytes in 32-byte
groups whose byte 4 j + b holds value 8 b + j of the group), so that byte b of every i32 word
of a group belongs to one 8-value run of x (lowerings/quant_q6_lanes.py).
`"gptq<bits>w<W>k<K>"`: a GPTQ weight's bytes reordered into column panels (pack_gptq.py).
"""
from __future__ import annotations

import re

import numpy as np

from graphir.dtype import bf16_bits

from . import pack_gptq

_LAYOUT = re.compile(r"(nk|kn)([1-9][0-9]*)(p?)")


Q4K_LAYOUT, Q5K_LAYOUT, Q6K_LAYOUT = "q4k_r", "q5k_r", "q6k_r"
# K-quant layouts: (encoding, bytes of a block as stored, repacked)
KQUANT_LAYOUTS = {Q4K_LAYOUT: ("Q4_K", 144, 148), Q5K_LAYOUT: ("Q5_K", 176, 180),
                  Q6K_LAYOUT: ("Q6_K", 210, 212)}


def check_layout(layout: str) -> None:
    """ValueError unless `layout` names a layout of this module."""
    if layout not in KQUANT_LAYOUTS and pack_gptq.parse(layout) is None:
        parse_layout(layout)


def parse_layout(layout: str) -> tuple[str, int, bool]:
    """("nk" | "kn", NR, bf16 pairs?) of a layout name such as "nk32" or "nk32p"."""
    m = _LAYOUT.fullmatch(layout) if isinstance(layout, str) else None
    if not m:
        raise ValueError(f"unknown pack layout {layout!r}; expected e.g. 'nk32', 'kn16' or "
                         f"'nk32p'")
    return m.group(1), int(m.group(2)), bool(m.group(3))


def packed_shape(shape, layout: str) -> list[int]:
    """Shape of an operand of `shape` ([N, K] for "nk", [K, N] for "kn") packed in `layout`."""
    if layout in KQUANT_LAYOUTS:
        enc, stored, packed = KQUANT_LAYOUTS[layout]
        if len(shape) != 2 or shape[1] % stored:
            raise ValueError(f"layout {layout!r} repacks {enc} rows [N, blocks x {stored}] "
                             f"bytes, got shape {tuple(shape)}")
        return [shape[0], shape[1] // stored * packed]
    if pack_gptq.parse(layout) is not None:
        pack_gptq.geometry(shape, layout)
        return list(shape)
    kind, nr, pairs = parse_layout(layout)
    if len(shape) != 2:
        raise ValueError(f"layout {layout!r} packs a 2-D operand, got shape {tuple(shape)}")
    n, k = shape if kind == "nk" else tuple(shape)[::-1]
    if n % nr:
        raise ValueError(f"layout {layout!r}: N = {n} is not a multiple of {nr}")
    if pairs and k % 2:
        raise ValueError(f"layout {layout!r}: K = {k} is odd (bf16 pairs need an even K)")
    return [n // nr, k // 2, 2 * nr] if pairs else [n // nr, k, nr]


def packed_dtype(layout: str) -> type:
    """The packed array's numpy dtype: f32, uint16 (bf16 bits) for a pairs layout, uint8 for
    the GGUF bytes of the K-quant layouts ("q4k_r", "q5k_r", "q6k_r") and GPTQ's panels."""
    if layout in KQUANT_LAYOUTS or pack_gptq.parse(layout) is not None:
        return np.uint8
    return np.uint16 if parse_layout(layout)[2] else np.float32


def pack_numpy(a: np.ndarray, layout: str, out: np.ndarray | None = None) -> np.ndarray:
    """`a` packed in `layout`, C-contiguous: f32, or for a pairs layout the bf16 bits (uint16)
    of a's values rounded to bf16 (graphir.dtype.bf16_bits; a bf16 weight's values are exact).
    `out`: a C-contiguous array of the packed shape and dtype to pack into (the runtime's
    cache-line aligned memory), so a weight is copied once, not packed and then copied."""
    if layout in KQUANT_LAYOUTS:
        return repack_kquant(a, layout, out)
    if pack_gptq.parse(layout) is not None:
        return pack_gptq.repack(a, layout, out)
    kind, nr, pairs = parse_layout(layout)
    a = np.asarray(a, np.float32)
    if a.ndim != 2:
        raise ValueError(f"pack layout {layout!r} needs a 2-D operand, got shape {a.shape}")
    shape = packed_shape(a.shape, layout)
    dtype = packed_dtype(layout)
    if out is None:
        out = np.empty(shape, dtype)
    elif out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"pack layout {layout!r}: out must be C-contiguous {dtype.__name__} "
                         f"{tuple(shape)}, got {out.dtype} {out.shape}")
    w = a if kind == "nk" else a.T                    # [N, K]
    n, k = w.shape
    if not pairs:
        np.copyto(out.reshape(n // nr, k, nr), w.reshape(n // nr, nr, k).transpose(0, 2, 1))
        return out
    bits = bf16_bits(w)
    # [N/NR, NR, K/2, 2] -> [N/NR, K/2, NR, 2]
    np.copyto(out.reshape(n // nr, k // 2, nr, 2),
              bits.reshape(n // nr, nr, k // 2, 2).transpose(0, 2, 1, 3))
    return out


def repack_kquant(rows: np.ndarray, layout: str = Q4K_LAYOUT,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Q4_K (Q5_K) rows uint8 `[N, blocks x 144 (176)]` in the "q4k_r" ("q5k_r") layout,
    `[N, blocks x 148 (180)]`: per block d and dmin (bytes 0-3 as stored), the scales of
    sub-blocks 0-7 as bytes, their mins as bytes, then the block's bytes 16 on as stored. The
    scales and mins unpack as GGML's get_scale_min_k4. Q6_K rows `[N, blocks x 210]` in
    "q6k_r": see _repack_q6k."""
    rows = np.asarray(rows)
    shape = packed_shape(rows.shape, layout)
    _, stored, packed = KQUANT_LAYOUTS[layout]
    if rows.dtype != np.uint8:
        raise ValueError(f"layout {layout!r} repacks uint8 GGUF bytes, got {rows.dtype}")
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != tuple(shape) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"layout {layout!r}: out must be C-contiguous uint8 "
                         f"{tuple(shape)}, got {out.dtype} {out.shape}")
    src = rows.reshape(rows.shape[0], -1, stored)
    dst = out.reshape(rows.shape[0], -1, packed)
    if layout == Q6K_LAYOUT:
        _repack_q6k(src, dst)
        return out
    # Bytes 4-7 / 8-11 hold the low six bits of scale / min of sub-blocks 0-3 and, in their top
    # two bits, bits 4-5 of sub-blocks 4-7; bytes 12-15 the low nibbles of sub-blocks 4-7.
    a, m, c = src[..., 4:8], src[..., 8:12], src[..., 12:16]
    dst[..., 0:4] = src[..., 0:4]
    dst[..., 4:8] = a & 63
    dst[..., 8:12] = (c & 15) | ((a >> 6) << 4)
    dst[..., 12:16] = m & 63
    dst[..., 16:20] = (c >> 4) | ((m >> 6) << 4)
    dst[..., 20:] = src[..., 16:]
    return out


def _repack_q6k(src: np.ndarray, dst: np.ndarray) -> None:
    """Q6_K blocks [..., 210] (ql 0-127, qh 128-191, int8 scales 192-207, d 208-209) into
    "q6k_r" blocks [..., 212]: d, two zero bytes, the scales, then the four 32-byte groups
    ql[32 g : 32 g + 32] and the two qh[32 n : 32 n + 32], each with byte 4 j + b taken from
    byte 8 b + j of the group (an [8 x 4] -> [4 x 8] transpose of its bytes)."""
    def groups(a: np.ndarray, n: int) -> np.ndarray:
        return a.reshape(*a.shape[:-1], n, 4, 8).swapaxes(-1, -2).reshape(a.shape)
    dst[..., 0:2] = src[..., 208:210]
    dst[..., 2:4] = 0
    dst[..., 4:20] = src[..., 192:208]
    dst[..., 20:148] = groups(src[..., 0:128], 4)
    dst[..., 148:212] = groups(src[..., 128:192], 2)
