"""GPTQ weights reordered into column panels at load (layout `"gptq<bits>w<W>k<K>"`; no MLIR here:
the runtime packs with it).

MAX's GPTQ weight is uint8 `[K bits/8 + 2 G, N]`: int32 code words `[K/P, N]` (P = 32 / bits codes
of one output column along k), then float16 scales `[G, N]`. The CPU kernel's row path (a decode
step: lowerings/quant_gptq.py) gives each task a few output columns and walks all of K for them;
in that layout a task's consecutive word rows lie N * 4 bytes apart (24 KB at N = 6144), a new
page for every 32 to 256 bytes read, which the hardware prefetchers do not follow: with the
weights in DRAM (a layer's worth of them) the kernel ran ~3x slower than on the same weight
resident in L3 (BENCHMARKS.md, CPU: GPTQ's panels). Panelled, the same bytes and shape hold the
words `[N/W, K/P, W]` then the scales `[N/W, G, W]`, so a task reads its W columns' words and
scales as two contiguous runs.
"""
from __future__ import annotations

import re

import numpy as np

_NAME = re.compile(r"gptq(4|8)w([1-9][0-9]*)k([1-9][0-9]*)")


def layout_name(bits: int, panel: int, k: int) -> str:
    """The layout of a `bits`-bit GPTQ weight of K = k inputs in panels of `panel` columns."""
    return f"gptq{bits}w{panel}k{k}"


def parse(layout: str) -> tuple[int, int, int] | None:
    """(bits, panel width, K) of a GPTQ panel layout name, None for another name."""
    m = _NAME.fullmatch(layout) if isinstance(layout, str) else None
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def geometry(shape, layout: str) -> tuple[int, int, int, int, int]:
    """(bits, W, K, groups, N) of a weight of `shape` in `layout`; ValueError if they disagree."""
    bits, w, k = parse(layout)
    code_rows = k * bits // 8
    if len(shape) != 2 or k % (32 // bits) or shape[0] <= code_rows \
            or (shape[0] - code_rows) % 2 or shape[1] % w:
        raise ValueError(f"layout {layout!r} reorders a {bits}-bit GPTQ weight uint8 "
                         f"[{code_rows} + 2 groups, N] with N a multiple of {w}, got shape "
                         f"{tuple(shape)}")
    return bits, w, k, (shape[0] - code_rows) // 2, shape[1]


def repack(a: np.ndarray, layout: str, out: np.ndarray | None = None) -> np.ndarray:
    """The GPTQ weight `a` (uint8 `[K bits/8 + 2G, N]`) reordered into `layout`'s panels, in
    `out` when given (C-contiguous uint8 of a's shape)."""
    a = np.asarray(a)
    bits, w, k, groups, n = geometry(a.shape, layout)
    if a.dtype != np.uint8:
        raise ValueError(f"layout {layout!r} reorders uint8 GPTQ bytes, got {a.dtype}")
    if out is None:
        out = np.empty(a.shape, np.uint8)
    elif out.shape != a.shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"layout {layout!r}: out must be C-contiguous uint8 {a.shape}, got "
                         f"{out.dtype} {out.shape}")
    src = np.ascontiguousarray(a).reshape(-1)
    dst = out.reshape(-1)
    kw = k // (32 // bits)
    code_bytes = kw * n * 4
    words = src[:code_bytes].view("<u4").reshape(kw, n // w, w)
    dst[:code_bytes].view("<u4").reshape(n // w, kw, w)[...] = words.transpose(1, 0, 2)
    scales = src[code_bytes:].view("<u2").reshape(groups, n // w, w)
    dst[code_bytes:].view("<u2").reshape(n // w, groups, w)[...] = scales.transpose(1, 0, 2)
    return out


def pick_panel(n: int, width: int) -> int | None:
    """The panel width for N = n outputs read `width` columns a vector: 64 columns (a task's
    usual share; quant_gptq._gptq_rows) or the widest smaller power of two dividing n that the
    vectors fill; None when none does (the weight stays as stored)."""
    return next((w for w in (64, 32, 16) if n % w == 0 and w % width == 0), None)
