"""Row-wise RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w, statistics in fp32.

Works on any `[rows, D]` view with a row stride, so the per-head q/k norm of `use_qk_norm` is the
same kernel with rows = tokens * heads. Each program normalizes BLOCK_R rows of a power-of-two
padded width BLOCK_D; BLOCK_R is picked so a program touches ~4096 elements (16 per thread with
4 warps: two 16-byte loads of bf16), enough bytes in flight for a bandwidth-bound kernel while
keeping many programs for small row counts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, next_pow2, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, R, D, stride_x, stride_y, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pdl_wait()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * inv[:, None] * w[None, :]
    tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


def block_sizes(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for a row width D."""
    block_d = next_pow2(D)
    block_r = max(1, 4096 // block_d)
    num_warps = 4 if block_d <= 4096 else 8
    return block_r, block_d, num_warps


def rms_norm(x, weight, eps: float = 1e-6, out=None):
    """RMSNorm over the last axis of a torch tensor x [..., D] with weight [D]."""
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"rms_norm: weight must be [{D}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x.new_empty(x.shape) if out is None else out
    y2 = out.view(-1, D)
    R = x2.shape[0]
    br, bd, nw = block_sizes(D)
    rms_norm_kernel[(cdiv(R, br),)](x2, weight, y2, R, D, x2.stride(0), y2.stride(0), float(eps),
                                    BLOCK_R=br, BLOCK_D=bd, num_warps=nw)
    return out


def aot_specs(D: int, dtype: str = "bfloat16", w_dtype: str | None = None) -> list[KernelSpec]:
    """One specialization for a row width D (rows, strides and eps are runtime values)."""
    t = triton_dtype(dtype)
    tw = triton_dtype(w_dtype or dtype)
    br, bd, nw = block_sizes(D)
    sig = {"x_ptr": f"*{t}", "w_ptr": f"*{tw}", "y_ptr": f"*{t}", "R": "i32", "D": "i32",
           "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "BLOCK_R": "constexpr",
           "BLOCK_D": "constexpr"}
    return [KernelSpec(name=f"rms_norm_{t}_d{D}", fn=rms_norm_kernel, signature=sig,
                       constexprs={"BLOCK_R": br, "BLOCK_D": bd}, num_warps=nw, num_stages=1,
                       grid=lambda R: (cdiv(R, br), 1, 1), grid_args=("R",),
                       divisible_by_16=("x_ptr", "y_ptr", "w_ptr")
                       + (("D", "stride_x", "stride_y") if D % 16 == 0 else ()),
                       notes="row strides must be multiples of 16 when D is")]
