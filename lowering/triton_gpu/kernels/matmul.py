"""C = A @ B^T (+ bias): bf16/fp16 with fp32 accumulation, and a float8 (e4m3) scaled variant.

A is `[M, K]`, B is `[N, K]` (the nn.Linear weight layout), C is `[M, N]`, all row-major and
contiguous. Two tile configurations: a "decode" one for M <= 64 (weight streaming: narrow N tiles
so enough programs cover the SMs, long K tiles, deep pipeline) and a "prefill" one for large M
(128x128x64 tiles, 8 warps, 3 stages -> wgmma-sized, 96 KiB of shared memory) with grouped
program order so consecutive programs reuse the same B tiles from L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
CONFIGS = {
    "decode": (16, 32, 256, 1, 4, 4),
    "prefill": (128, 128, 64, 8, 8, 3),
}
FP8_CONFIGS = {
    "decode": (16, 32, 512, 1, 4, 4),
    "prefill": (128, 128, 128, 8, 8, 3),
}


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _ab_loop(a_ptr, b_ptr, M, N, K, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Clamp rows instead of masking them: the loads stay unmasked along M/N, rows past the end
    # repeat the last row and are never stored.
    rm_c = tl.minimum(rm, M - 1).to(tl.int64)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = a_ptr + rm_c[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn_c[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc, rm, rn


@triton.jit
def matmul_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _ab_loop(a_ptr, b_ptr, M, N, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def matmul_fp8_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K,
                      A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _ab_loop(a_ptr, b_ptr, M, N, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
    if A_ROWWISE:
        sa = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
        acc = acc * sa[:, None]
    else:
        acc = acc * tl.load(a_scale_ptr).to(tl.float32)
    if B_COLWISE:
        sb = tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc * sb[None, :]
    else:
        acc = acc * tl.load(b_scale_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def pick_config(M: int) -> str:
    """Config name for a row count: 'decode' for M <= 64, else 'prefill'."""
    return "decode" if M <= 64 else "prefill"


def _grid(cfg):
    bm, bn = cfg[0], cfg[1]
    return lambda M, N: (cdiv(M, bm) * cdiv(N, bn), 1, 1)


def matmul(a, b, bias=None, out=None, config: str | None = None):
    """C = a @ b.T (+ bias) for torch tensors a [M, K], b [N, K]; returns C [M, N] in a.dtype."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"matmul: need a [M, K] and b [N, K], got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"matmul: bias must be [{N}], got {tuple(bias.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = a.new_empty((M, N)) if out is None else out
    cfg = CONFIGS[config or pick_config(M)]
    bm, bn, bk, gm, nw, ns = cfg
    matmul_kernel[_grid(cfg)(M, N)[:1]](
        a, b, bias if bias is not None else a, out, M, N, K, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)
    return out


def matmul_fp8(a, b, a_scale, b_scale, bias=None, out_dtype=None, config: str | None = None):
    """C = (a * a_scale) @ (b * b_scale).T (+ bias) for float8_e4m3fn a [M, K], b [N, K].

    a_scale: 1 element (per tensor) or [M] (per row); b_scale: 1 element or [N] (per column).
    """
    import torch

    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"matmul_fp8: K mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a_scale.numel() not in (1, M) or b_scale.numel() not in (1, N):
        raise ValueError(f"matmul_fp8: a_scale must have 1 or {M} elements and b_scale 1 or "
                         f"{N}, got {a_scale.numel()} and {b_scale.numel()}")
    out = torch.empty((M, N), dtype=out_dtype or torch.bfloat16, device=a.device)
    cfg = FP8_CONFIGS[config or pick_config(M)]
    bm, bn, bk, gm, nw, ns = cfg
    matmul_fp8_kernel[_grid(cfg)(M, N)[:1]](
        a.contiguous(), b.contiguous(), a_scale.contiguous(), b_scale.contiguous(),
        bias if bias is not None else out, out, M, N, K,
        A_ROWWISE=a_scale.numel() == M and M > 1, B_COLWISE=b_scale.numel() == N and N > 1,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        num_warps=nw, num_stages=ns)
    return out


def aot_specs(dtype: str = "bfloat16", has_bias: bool = False) -> list[KernelSpec]:
    """Both tile configurations of the bf16/fp16 matmul; K must be a multiple of 16."""
    t = triton_dtype(dtype)
    specs = []
    for name, cfg in CONFIGS.items():
        bm, bn, bk, gm, nw, ns = cfg
        sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "bias_ptr": f"*{t}", "c_ptr": f"*{t}",
               "M": "i32", "N": "i32", "K": "i32", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
               "GROUP_M": "constexpr"}
        specs.append(KernelSpec(
            name=f"matmul_{t}_{name}{'_bias' if has_bias else ''}", fn=matmul_kernel,
            signature=sig, constexprs={"HAS_BIAS": has_bias, "BLOCK_M": bm, "BLOCK_N": bn,
                                       "BLOCK_K": bk, "GROUP_M": gm},
            num_warps=nw, num_stages=ns, grid=_grid(cfg), grid_args=("M", "N"),
            divisible_by_16=("a_ptr", "b_ptr", "c_ptr", "K"),
            notes="decode: M <= 64; prefill otherwise"))
    return specs


def aot_specs_fp8(out_dtype: str = "bfloat16", a_rowwise: bool = False, b_colwise: bool = False,
                  has_bias: bool = False) -> list[KernelSpec]:
    """Both tile configurations of the float8 e4m3 scaled matmul; K a multiple of 16."""
    t = triton_dtype(out_dtype)
    specs = []
    for name, cfg in FP8_CONFIGS.items():
        bm, bn, bk, gm, nw, ns = cfg
        sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32",
               "b_scale_ptr": "*fp32", "bias_ptr": f"*{t}", "c_ptr": f"*{t}", "M": "i32",
               "N": "i32", "K": "i32", "A_ROWWISE": "constexpr", "B_COLWISE": "constexpr",
               "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}
        specs.append(KernelSpec(
            name=f"matmul_fp8_{t}_{name}", fn=matmul_fp8_kernel, signature=sig,
            constexprs={"A_ROWWISE": a_rowwise, "B_COLWISE": b_colwise, "HAS_BIAS": has_bias,
                        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
            num_warps=nw, num_stages=ns, grid=_grid(cfg), grid_args=("M", "N"),
            divisible_by_16=("a_ptr", "b_ptr", "c_ptr", "K"),
            notes="decode: M <= 64; prefill otherwise"))
    return specs
