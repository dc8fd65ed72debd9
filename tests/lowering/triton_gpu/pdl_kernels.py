"""Tiny kernels for test_pdl.py (Triton compiles only functions defined in a file)."""

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


@triton.jit
def with_prelude(x, y, n, B: tl.constexpr):
    pdl_wait()
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y + o, tl.load(x + o, mask=o < n) + 1.0, mask=o < n)


@triton.jit
def plain(x, y, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y + o, tl.load(x + o, mask=o < n) + 1.0, mask=o < n)


@triton.jit
def loads_first(x, y, n, B: tl.constexpr):
    v = tl.load(x)
    pdl_wait()
    tl.store(y, v)


@triton.jit
def strided_with_prelude(x, y, n, B: tl.constexpr):
    """with_prelude over any grid: each program strides over the blocks (test_pdl_gpu.py runs
    it on one program per SM, the grids that launch early, and on one per block)."""
    pdl_wait()
    for start in range(tl.program_id(0) * B, n, tl.num_programs(0) * B):
        o = start + tl.arange(0, B)
        tl.store(y + o, tl.load(x + o, mask=o < n) + 1.0, mask=o < n)
