"""C = A @ B^T (+ bias): the tiled tensor-core kernel (optionally split along K) and the float8
(e4m3) scaled variant.

A is `[M, K]`, B is `[N, K]` (the nn.Linear weight layout), C is `[M, N]`, all row-major and
contiguous; bf16/fp16/fp32 inputs accumulate in fp32. Tile sizes, split-K and pipeline depth
are constexprs chosen per shape bucket from the candidate lists of `matmul_configs.py` (the
compile-time tuner picks among them); rows past M are clamped rather than masked, so the loads
along M and N stay unmasked and no address ever leaves A or B.

With SPLIT_K > 1 the program grid is (tiles, SPLIT_K): each program sums one contiguous K range
and writes its fp32 partial tile to `c_ptr` (then a `[SPLIT_K, M, N]` fp32 scratch) at
`pid_k * M * N`; `matmul_skinny.splitk_reduce_kernel` adds the partials and the bias.
Skinny M wants this: with M <= 64 the weight is read exactly once and the split multiplies the
number of programs sharing that read, filling all SMs even where N alone gives too few tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

FP8_CONFIGS = {
    "decode": (16, 32, 512, 1, 4, 4),
    "prefill": (128, 128, 128, 8, 8, 3),
}


@triton.jit
def tile_ids(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear tile index in grouped order: GROUP_M row-tiles share the
    B tiles of consecutive programs, so those come from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def k_range(K, pid_k, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[k_lo, k_hi) of split `pid_k`: whole BLOCK_K blocks, the last split takes the rest."""
    if SPLIT_K == 1:
        return 0, K
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    return k_lo, tl.minimum(K, k_lo + k_per)


@triton.jit
def _ab_loop(a_ptr, b_ptr, M, N, K, pid_m, pid_n, k_lo, k_hi, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows past the end repeat the last row and are never stored: loads stay unmasked in M/N.
    rm_c = tl.minimum(rm, M - 1).to(tl.int64)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = a_ptr + rm_c[:, None] * K + (k_lo + rk)[None, :]
    b_ptrs = b_ptr + rn_c[:, None] * K + (k_lo + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (k0 + rk) < k_hi
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc, rm, rn


@triton.jit
def matmul_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    pdl_wait()
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    k_lo, k_hi = k_range(K, pid_k, SPLIT_K, BLOCK_K)
    acc, rm, rn = _ab_loop(a_ptr, b_ptr, M, N, K, pid_m, pid_n, k_lo, k_hi, BLOCK_M, BLOCK_N,
                           BLOCK_K, EVEN_K)
    if HAS_BIAS and SPLIT_K == 1:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    row = rm.to(tl.int64)
    if SPLIT_K > 1:
        row += pid_k.to(tl.int64) * M
    c_ptrs = c_ptr + row[:, None] * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def matmul_fp8_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K,
                      A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pdl_wait()
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _ab_loop(a_ptr, b_ptr, M, N, K, pid_m, pid_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K,
                           False)
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
    """Legacy config name for a row count: 'decode' for M <= 64, else 'prefill'."""
    return "decode" if M <= 64 else "prefill"


def check_operands(a, b, bias=None, what: str = "matmul") -> tuple[int, int, int]:
    """(M, N, K) of a [M, K] and b [N, K]; ValueError naming the mismatch otherwise."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: need a [M, K] and b [N, K], got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{what}: bias must be [{N}], got {tuple(bias.shape)}")
    return M, N, K


def matmul(a, b, bias=None, out=None, config=None):
    """C = a @ b.T (+ bias) for torch tensors a [M, K], b [N, K]; returns C [M, N] in a.dtype.

    `config` is a candidate of matmul_configs (a dict or its name; 'decode'/'prefill' are the
    legacy names); None picks the shipped default for M's bucket.

    Example:
        >>> c = matmul(a, w, config="t64x32x256_g1_w4_s4")   # doctest: +SKIP
    """
    from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

    return mc.run_torch(a, b, bias, out=out, config=config)


def aot_specs(dtype: str = "bfloat16", has_bias: bool = False, config=None,
              K: int | None = None) -> list[KernelSpec]:
    """Specializations to compile: those of one candidate config (a dict or name; a split-K
    config gives its partial and reduce kernels), or with config=None the legacy 'decode' and
    'prefill' pair. K (static) lets the specs drop the K-tail masks when it divides evenly."""
    from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

    if config is None:
        return [s for name in ("decode", "prefill")
                for s in mc.specs(mc.get(name), dtype, has_bias, K)]
    return mc.specs(mc.get(config), dtype, has_bias, K)


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
    bm, bn, bk, gm, nw, ns = FP8_CONFIGS[config or pick_config(M)]
    matmul_fp8_kernel[(cdiv(M, bm) * cdiv(N, bn),)](
        a.contiguous(), b.contiguous(), a_scale.contiguous(), b_scale.contiguous(),
        bias if bias is not None else out, out, M, N, K,
        A_ROWWISE=a_scale.numel() == M and M > 1, B_COLWISE=b_scale.numel() == N and N > 1,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        num_warps=nw, num_stages=ns)
    return out


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
            num_warps=nw, num_stages=ns, grid=_fp8_grid(bm, bn), grid_args=("M", "N"),
            divisible_by_16=("a_ptr", "b_ptr", "c_ptr", "K"),
            notes="decode: M <= 64; prefill otherwise"))
    return specs


def _fp8_grid(bm: int, bn: int):
    return lambda M, N: (cdiv(M, bm) * cdiv(N, bn), 1, 1)
