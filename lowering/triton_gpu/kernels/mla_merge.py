"""The MLA decode merge as two launches: combine the split-K partials, then multiply by w_uv.

`mla_decode.mla_absorbed_out_kernel` does both in one program per (token block, head): it walks
the partitions once per 64 latent columns, each step a dependent chain of loads, with only
T / BLOCK_T x NH programs (256 at batch 64 x 64 heads), and reads w_uv once per token block.
Split in two, each launch has the parallelism its bytes need:
  1. `mla_combine_kernel`: per (ROWS (token, head) rows, COLS latent columns) the partials of
     every partition weighted by exp2(m_p - m) and divided by the sum, stored in the layer's
     dtype as o_lat [T * NH, R] (the fused kernel rounds the same sum to that dtype before its
     dot, so the numbers match up to fp32 summation order);
  2. `mla_uv_kernel`: out[:, h*V:(h+1)*V] = o_lat[:, h, :] @ w_uv[h], per (token block, head),
     its R loop pipelined by Triton (cp.async), so w_uv is read once per token block.
"""
from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv

COMBINE_ROWS = 16
COMBINE_COLS = 128
UV_BLOCK_R = 64
UV_STAGES = 3


@triton.jit
def mla_combine_kernel(o_part_ptr, ml_ptr, olat_ptr, rows, num_parts, R: tl.constexpr,
                       RP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    pdl_wait()
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rm = row < rows
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    slot0 = row.to(tl.int64) * num_parts
    m = tl.full((ROWS,), -1.0e30, tl.float32)
    for p in range(num_parts):
        m = tl.maximum(m, tl.load(ml_ptr + (slot0 + p) * 2, mask=rm, other=-1.0e30))
    den = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, COLS), tl.float32)
    for p in range(num_parts):
        w = tl.exp2(tl.load(ml_ptr + (slot0 + p) * 2, mask=rm, other=-1.0e30) - m)
        den += tl.load(ml_ptr + (slot0 + p) * 2 + 1, mask=rm, other=0.0) * w
        acc += tl.load(o_part_ptr + (slot0 + p)[:, None] * RP + c[None, :],
                       mask=rm[:, None], other=0.0) * w[:, None]
    # A row with no key at all (a sequence with an empty context) has sum 0 and partials 0.
    inv = 1.0 / tl.where(den == 0.0, 1.0, den)
    tl.store(olat_ptr + row.to(tl.int64)[:, None] * R + c[None, :],
             (acc * inv[:, None]).to(olat_ptr.dtype.element_ty),
             mask=rm[:, None] & (c < R)[None, :])


@triton.jit
def mla_uv_kernel(olat_ptr, wuv_ptr, out_ptr, T, NH: tl.constexpr, R: tl.constexpr,
                  V: tl.constexpr, VP: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_R: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    tm = t < T
    v = tl.arange(0, VP)
    arow = olat_ptr + (t.to(tl.int64) * NH + h)[:, None] * R
    wrow = wuv_ptr + h * (R * V) + v[None, :]
    acc = tl.zeros((BLOCK_T, VP), tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=STAGES):
        r = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(arow + r[None, :], mask=tm[:, None] & (r < R)[None, :], other=0.0)
        w = tl.load(wrow + r[:, None] * V, mask=(r < R)[:, None] & (v < V)[None, :], other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * (NH * V) + h * V + v[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tm[:, None] & (v < V)[None, :])


def specs(t: str, nh: int, r: int, v: int, rp: int, vp: int, bt: int, prec: str,
          sfx: str) -> list[KernelSpec]:
    """[combine, uv] for q / weights / output of Triton dtype `t`; `bt` tokens a uv program."""
    cc = dict(R=r, RP=rp, ROWS=COMBINE_ROWS, COLS=min(COMBINE_COLS, rp))
    csig = {"o_part_ptr": "*fp32", "ml_ptr": "*fp32", "olat_ptr": f"*{t}", "rows": "i32",
            "num_parts": "i32", **{k: "constexpr" for k in cc}}
    combine = KernelSpec(name=f"mla_combine_{t}", fn=mla_combine_kernel, signature=csig,
                         constexprs=cc, num_warps=4, num_stages=1,
                         grid=lambda T: (cdiv(T * nh, COMBINE_ROWS), cdiv(r, cc["COLS"]), 1),
                         grid_args=("T",), divisible_by_16=("o_part_ptr", "ml_ptr", "olat_ptr"))
    uc = dict(NH=nh, R=r, V=v, VP=vp, BLOCK_T=bt, BLOCK_R=min(UV_BLOCK_R, rp), STAGES=UV_STAGES,
              PRECISION=prec)
    usig = {"olat_ptr": f"*{t}", "wuv_ptr": f"*{t}", "out_ptr": f"*{t}", "T": "i32",
            **{k: "constexpr" for k in uc}}
    uv = KernelSpec(name=f"mla_uv_{t}{sfx}", fn=mla_uv_kernel, signature=usig, constexprs=uc,
                    num_warps=4, num_stages=UV_STAGES, grid=lambda T: (cdiv(T, bt), nh, 1),
                    grid_args=("T",), divisible_by_16=("olat_ptr", "wuv_ptr", "out_ptr"))
    return [combine, uv]
