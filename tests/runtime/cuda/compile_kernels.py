"""Test kernels for runtime.cuda, compiled offline for sm_90 (no GPU needed).

Run as `python -m tests.runtime.cuda.compile_kernels` (a subprocess of the tests, because the
Triton tests elsewhere switch this process to the interpreter); prints one JSON line with, per
kernel, the cubin (hex), launch metadata, the PTX `.entry` parameter list and, when available,
the metadata lowering.triton_gpu.aot produces for the same kernel.
"""

from __future__ import annotations

import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
ADD_BLOCK = 256
MM_TILE = (128, 128, 64)  # fp16 tiles: 2 pipeline buffers of 32 KiB -> 64 KiB shared


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m)
    y = tl.load(y_ptr + offs, mask=m)
    tl.store(out_ptr + offs, x + alpha * y, mask=m)


@triton.jit
def scalars_kernel(out_ptr, a, b, c, d, e):
    # Writes back every scalar so the launcher's packing of each kind can be checked.
    tl.store(out_ptr + 0, a.to(tl.float64))
    tl.store(out_ptr + 1, b.to(tl.float64))
    tl.store(out_ptr + 2, c.to(tl.float64))
    tl.store(out_ptr + 3, d.to(tl.float64))
    tl.store(out_ptr + 4, e.to(tl.float64))


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def tma_scale_kernel(x_ptr, out_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr):
    # Device-side TMA descriptors live in Triton's global scratch: this kernel faults unless the
    # launcher passes a real per-program scratch buffer.
    pid = tl.program_id(0)
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    od = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    od.store([pid * BM, 0], xd.load([pid * BM, 0]) * 2.0)


TMA_TILE = (16, 32)

# label -> (fn, signature, constexprs, num_warps, num_stages, args assumed divisible by 16)
KERNELS = {
    "add": (add_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                         "alpha": "fp32", "BLOCK": "constexpr"}, {"BLOCK": ADD_BLOCK}, 4, 1, ()),
    "scalars": (scalars_kernel, {"out_ptr": "*fp64", "a": "i32", "b": "i64", "c": "u32",
                                 "d": "fp32", "e": "fp16"}, {}, 1, 1, ()),
    "matmul": (matmul_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32",
                               "N": "i32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
                               "BK": "constexpr"},
               dict(zip(("BM", "BN", "BK"), MM_TILE)), 4, 3, ()),
    "tma": (tma_scale_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "N": "i32",
                               "BM": "constexpr", "BN": "constexpr"},
            dict(zip(("BM", "BN"), TMA_TILE)), 4, 1, ("x_ptr", "out_ptr", "N")),
}


def _ptx_params(ptx: str) -> list[int]:
    """Byte size of each `.entry` parameter (`.u32` -> 4; `.align 2 .b8 p[2]` -> 2)."""
    entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx)
    sizes = []
    for decl in (entry.group(1).split(",") if entry else []):
        arr = re.search(r"\.b8\s+\w+\[(\d+)\]", decl)
        width = re.search(r"\.param\s+\.[a-z]+(\d+)", decl)
        sizes.append(int(arr.group(1)) if arr else int(width.group(1)) // 8)
    return sizes


def compile_all() -> dict:
    """Compile every test kernel; JSON-able result keyed by kernel label."""
    out = {}
    for label, (fn, sig, consts, warps, stages, div16) in KERNELS.items():
        attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in div16}
        c = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=SM90,
                           options={"num_warps": warps, "num_stages": stages})
        md = c.metadata
        out[label] = {
            "cubin": bytes(c.kernel).hex(), "ptx_params": _ptx_params(c.asm["ptx"]),
            "metadata": {
                "name": c.name, "params": [t for t in sig.values() if t != "constexpr"],
                "num_warps": md.num_warps, "shared": md.shared, "num_ctas": md.num_ctas,
                "global_scratch_size": md.global_scratch_size,
                "global_scratch_align": md.global_scratch_align,
                "profile_scratch_size": md.profile_scratch_size,
                "profile_scratch_align": md.profile_scratch_align}}
        try:
            from graphir.lowering.triton_gpu import aot
        except ImportError:
            continue
        out[label]["aot_metadata"] = aot.compile_kernel(fn, sig, consts, warps, stages,
                                                      divisible_by_16=div16).launch_metadata()
    return out


if __name__ == "__main__":
    print("JSON" + json.dumps(compile_all()))
