"""Dequantize-in-the-loop matmul and dequantize kernels for GGUF weights.

`gguf_matmul_kernel`: C `[M, N]` = X `[M, K]` @ dequant(W)^T for W uint8 `[N, row_bytes]` (the
GGUF blocks as stored). Each program decodes a `[BLOCK_N, NG groups]` tile of blocks per step
(quant_gguf.deq_planes: P planes of `NG * L` values each) in registers, casts it to X's dtype
and multiplies it on the tensor cores against the matching columns of X (gathered by the
planes' value indices), one dot per plane. The weight is read exactly once per row tile of X,
so at batch 1 to 16 (BLOCK_M = 16, the rows padded) the kernel streams the quantized bytes; the
decode arithmetic is the same for every row count. With SPLIT_K > 1 (grid axis 2, contiguous
runs of groups) the programs write fp32 partials `[SPLIT_K, M, N]` that
`matmul_skinny.splitk_reduce_kernel` sums: at batch 1 a 4096-row weight has only 64 column
tiles, too few to keep 132 SMs streaming.

float32 X multiplies in full precision (input_precision "ieee"); float16 / bfloat16 X multiply
the weight rounded to that type, accumulating in fp32.

Decode batches (M <= quant_gemv.GEMV_MAX_M["gguf"] while quant_gemv.GEMV_ENABLED) go to
quant_gemv.gguf_gemv_kernel instead: fp32 FMAs, no padded dot tile; config_for picks.

`gguf_dequant_kernel` writes the float32 `[N, K]` weight (op `dequantize`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.matmul_skinny import splitk_reduce_kernel
from graphir.lowering.triton_gpu.kernels.quant_gemv import (GEMV_BUCKETS, gemv_bucket,
                                                            gguf_gemv_kernel)
from graphir.lowering.triton_gpu.kernels.quant_gguf import FORMATS, deq_planes, fmt, groups_per_row
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

SM_COUNT = 132          # H100 / H200: the split rule fills this many SMs a few times over
TARGET_PROGRAMS = 4 * SM_COUNT
REDUCE_BLOCK = 1024
# Row buckets of X: (largest M, BLOCK_M, BLOCK_N, K values per step, warps, stages).
CONFIGS = ((16, 16, 64, 256, 4, 3), (64, 64, 64, 128, 4, 3), (None, 128, 128, 64, 8, 3))
# Decoders with more live words per value take smaller K steps (no spills offline:
# tests/lowering/triton_gpu/test_quant_aot.py).
MAX_STEP = {"Q5_K": 128}


@triton.jit
def gguf_matmul_kernel(x_ptr, w_ptr, c_ptr, M, N, row_bytes, n_groups, groups_per_split,
                       ENC: tl.constexpr, E: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                       SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    K = n_groups * E
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N are clamped, not masked: every address stays inside X and W.
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * K
    p8 = w_ptr + (tl.minimum(rn, N - 1).to(tl.int64) * row_bytes)[:, None, None]
    g_lo = pid_k * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, n_groups)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g0 in range(g_lo, g_hi, NG):
        g = g0 + tl.arange(0, NG)
        live = tl.reshape(tl.broadcast_to((g < g_hi)[:, None], (NG, L)), (NG * L,))
        ws, idx = deq_planes(p8, tl.minimum(g, n_groups - 1)[None, :, None], ENC, L)
        for p in tl.static_range(P):
            k = tl.reshape(idx[p], (NG * L,))
            x = tl.load(x_rows + k[None, :], mask=live[None, :], other=0.0)
            w = tl.reshape(ws[p], (BLOCK_N, NG * L)).to(dt)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    cmask = (rm < M)[:, None] & (rn < N)[None, :]
    dst = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K > 1:
        tl.store(c_ptr + pid_k.to(tl.int64) * M * N + dst, acc, mask=cmask)
    else:
        tl.store(c_ptr + dst, acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gguf_dequant_kernel(w_ptr, out_ptr, N, row_bytes, n_groups, ENC: tl.constexpr,
                        E: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                        BLOCK_N: tl.constexpr, NG: tl.constexpr):
    pdl_wait()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * NG + tl.arange(0, NG)
    p8 = w_ptr + (tl.minimum(rn, N - 1).to(tl.int64) * row_bytes)[:, None, None]
    ws, idx = deq_planes(p8, tl.minimum(g, n_groups - 1)[None, :, None], ENC, L)
    rows = out_ptr + rn.to(tl.int64)[:, None, None] * (n_groups * E)
    ok = (rn < N)[:, None, None] & (g < n_groups)[None, :, None]
    for p in tl.static_range(P):
        tl.store(rows + idx[p], ws[p], mask=ok)


# -- configs and launch rules ---------------------------------------------------------------------
# GEMV tiles by values per group E: (BLOCK_N, K values per weight row and step, warps). From
# the H200 sweep's alternatives at M = 1 on 14336x4096 (tools/gpu_sweeps/quant.py "gemv-" rows):
# 32-value blocks ran best as 16 rows x 256 values on 2 warps (Q4_0 29.5 us against 37.6 us
# for 32 x 256 on 4), K-quant super-blocks as 32 rows x 128 values on 4 (Q4_K 43.8 against
# 66.0, Q6_K 42.5 against 49.2): fewer registers, more programs per SM.
GEMV_TILES = {32: (16, 256, 2), 64: (32, 128, 4)}
GEMV_TILE = (32, 256, 4)    # unquantized rows
# At most this many values per plane, weight row and step, divided among X's rows (each row
# has an accumulator of the tile's shape; no spills offline, test_quant_aot.py).
GEMV_LANES = 64


def bucket_tops() -> list[int | None]:
    """Largest M of each row bucket a dynamic M is planned for, smallest first."""
    return [top for top, _ in GEMV_BUCKETS if gemv_bucket(top)] + [c[0] for c in CONFIGS]


def _gemv_config(bm: int, encoding: str, n: int, k: int) -> dict:
    f = fmt(encoding)
    groups = groups_per_row(encoding, k)
    bn, values, warps = GEMV_TILES.get(f.E, GEMV_TILE)
    values = min(values, MAX_STEP.get(encoding, values))
    ng = max(1, min(values // f.E, GEMV_LANES // f.L) // bm)
    while ng > 1 and groups % ng:      # whole steps: the tail mask never fires on usual shapes
        ng //= 2
    steps = cdiv(groups, ng)
    split = max(1, min(cdiv(TARGET_PROGRAMS, cdiv(n, bn)), steps, 16))
    per = cdiv(steps, split) * ng
    return dict(GEMV=True, BLOCK_M=bm, BLOCK_N=bn, NG=ng, SPLIT_K=cdiv(groups, per),
                groups_per_split=per, num_warps=warps, num_stages=2)


def config_for(m_max: int | None, encoding: str, n: int, k: int,
               dtype: str = "bfloat16", gemv: bool | None = None) -> dict:
    """The config of the row bucket whose largest M is m_max (None: the unbounded bucket):
    tile sizes, groups per step and the split of the K groups (float32 X: half the step).
    Decode buckets take the GEMV kernel (`GEMV` in the config) when quant_gemv's switch says
    so; `gemv` True / False forces the choice (sweeps time both)."""
    f = fmt(encoding)
    groups = groups_per_row(encoding, k)
    bm = gemv_bucket(m_max, gemv)
    if gemv and bm is None:
        raise ValueError(f"no GEMV bucket for M <= {m_max}")
    if bm is not None:
        return _gemv_config(bm, encoding, n, k)
    for top, bm, bn, kv, warps, stages in CONFIGS:
        if top is None or (m_max is not None and m_max <= top):
            break
    kv = min(kv, MAX_STEP.get(encoding, kv)) // (2 if dtype == "float32" else 1)
    ng = max(2, min(kv // f.E, 16))
    # Dots need NG * L >= 16 values along K, and a power of two.
    while ng * f.L < 16:
        ng *= 2
    tiles = cdiv(n, bn) * (cdiv(m_max, bm) if m_max else 8)
    steps = cdiv(groups, ng)
    split = max(1, min(cdiv(TARGET_PROGRAMS, tiles), steps, 16)) if m_max else 1
    per = cdiv(steps, split) * ng
    return dict(BLOCK_M=bm, BLOCK_N=bn, NG=ng, SPLIT_K=cdiv(groups, per), groups_per_split=per,
                num_warps=warps, num_stages=stages)


def constexprs(encoding: str, conf: dict, dtype: str) -> dict:
    f = fmt(encoding)
    c = dict(ENC=f.id, E=f.E, L=f.L, P=f.P, BLOCK_M=conf["BLOCK_M"], BLOCK_N=conf["BLOCK_N"],
             NG=conf["NG"], SPLIT_K=conf["SPLIT_K"])
    if not conf.get("GEMV"):
        c["PRECISION"] = "tf32x3" if dtype == "float32" else "tf32"
    return c


def matmul_specs(encoding: str, dtype: str, conf: dict,
                 row_bytes: int | None = None) -> list[KernelSpec]:
    """The matmul kernel and, when the config splits K, the reduce of its partials; a
    row_bytes that is a multiple of 16 is compiled in (aligned rows: wider weight loads)."""
    t = triton_dtype(dtype)
    split = conf["SPLIT_K"]
    sig = {"x_ptr": f"*{t}", "w_ptr": "*u8", "c_ptr": "*fp32" if split > 1 else f"*{t}",
           "M": "i32", "N": "i32", "row_bytes": "i32", "n_groups": "i32",
           "groups_per_split": "i32"}
    consts = constexprs(encoding, conf, dtype)
    sig.update({k: "constexpr" for k in consts})
    bm, bn = conf["BLOCK_M"], conf["BLOCK_N"]
    gemv = bool(conf.get("GEMV"))
    main = KernelSpec(
        name=f"gguf_{encoding.lower()}_{'gemv' if gemv else 'matmul'}_{t}_m{bm}n{bn}"
        + (f"g{conf['NG']}" if gemv else "") + (f"s{split}" if split > 1 else ""),
        fn=gguf_gemv_kernel if gemv else gguf_matmul_kernel, signature=sig, constexprs=consts,
        num_warps=conf["num_warps"],
        num_stages=conf["num_stages"],
        grid=lambda M, N: (cdiv(M, bm), cdiv(N, bn), split), grid_args=("M", "N"),
        divisible_by_16=("x_ptr", "w_ptr", "c_ptr")
        + (("row_bytes",) if row_bytes is not None and row_bytes % 16 == 0 else ()))
    if split == 1:
        return [main]
    return [main, splitk_reduce_spec("gguf", t, split)]


def splitk_reduce_spec(family: str, t: str, split: int) -> KernelSpec:
    """The kernel summing a split-K matmul's fp32 partials `[split, M, N]` into C (GGUF and
    GPTQ alike; `family` names it)."""
    rsig = {"part_ptr": "*fp32", "bias_ptr": f"*{t}", "c_ptr": f"*{t}", "M": "i32", "N": "i32",
            "HAS_BIAS": "constexpr", "SPLIT_K": "constexpr", "BLOCK": "constexpr"}
    return KernelSpec(
        name=f"{family}_splitk_reduce_{t}_s{split}", fn=splitk_reduce_kernel, signature=rsig,
        constexprs=dict(HAS_BIAS=False, SPLIT_K=split, BLOCK=REDUCE_BLOCK), num_warps=4,
        num_stages=1, grid=lambda M, N: (cdiv(M * N, REDUCE_BLOCK), 1, 1), grid_args=("M", "N"),
        divisible_by_16=("part_ptr", "c_ptr"))


DEQUANT_BLOCK_N = 16


def dequant_spec(encoding: str) -> KernelSpec:
    f = fmt(encoding)
    ng = max(1, 256 // f.E)
    consts = dict(ENC=f.id, E=f.E, L=f.L, P=f.P, BLOCK_N=DEQUANT_BLOCK_N, NG=ng)
    sig = {"w_ptr": "*u8", "out_ptr": "*fp32", "N": "i32", "row_bytes": "i32",
           "n_groups": "i32", **{k: "constexpr" for k in consts}}
    return KernelSpec(
        name=f"gguf_{encoding.lower()}_dequantize", fn=gguf_dequant_kernel, signature=sig,
        constexprs=consts, num_warps=4, num_stages=1,
        grid=lambda N, n_groups: (cdiv(N, DEQUANT_BLOCK_N), cdiv(n_groups, ng), 1),
        grid_args=("N", "n_groups"), divisible_by_16=("w_ptr", "out_ptr"))


# -- torch entry points (tests, sweeps) ------------------------------------------------------------
_TORCH_NAMES = {"torch.float32": "float32", "torch.float16": "float16",
                "torch.bfloat16": "bfloat16"}


def launch_matmul(x, w, encoding: str, out=None, conf: dict | None = None, scratch=None):
    """x [M, K] (torch, float) @ dequant(w [N, row_bytes] uint8)^T -> [M, N] in x's dtype,
    launching the kernels through Triton (the interpreter on the CPU)."""
    import torch

    M, K = x.shape
    N = w.shape[0]
    dt = _TORCH_NAMES[str(x.dtype)]
    conf = conf or config_for(M, encoding, N, K, dt)
    groups = groups_per_row(encoding, K)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    specs = matmul_specs(encoding, dt, conf, w.shape[1])
    split = conf["SPLIT_K"]
    c = out if split == 1 else (scratch if scratch is not None else
                                torch.empty((split, M, N), dtype=torch.float32, device=x.device))
    main = specs[0]
    main.fn[main.grid_for(M=M, N=N)](x, w, c, M, N, w.shape[1], groups, conf["groups_per_split"],
                                     **main.constexprs, num_warps=main.num_warps,
                                     num_stages=main.num_stages)
    if split > 1:
        red = specs[1]
        red.fn[red.grid_for(M=M, N=N)](c, out, out, M, N, **red.constexprs, num_warps=4)
    return out


def launch_dequantize(w, encoding: str, k: int):
    """float32 [N, k] of the GGUF rows w (torch uint8)."""
    import torch

    groups = groups_per_row(encoding, k)
    out = torch.empty((w.shape[0], k), dtype=torch.float32, device=w.device)
    s = dequant_spec(encoding)
    s.fn[s.grid_for(N=w.shape[0], n_groups=groups)](w, out, w.shape[0], w.shape[1], groups,
                                                    **s.constexprs, num_warps=4)
    return out


__all__ = ["FORMATS", "CONFIGS", "bucket_tops", "config_for", "matmul_specs", "dequant_spec",
           "launch_matmul", "launch_dequantize"]
