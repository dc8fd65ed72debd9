"""GPTQ matmul: C `[M, N]` = X[:, perm] @ W for MAX's packed GPTQ weight, decoded in registers.

The weight operand is one uint8 buffer: `qweight` int32 `[K / P, N]` (P = 32 / BITS codes per
word, packed along K: code of row P*r + s sits at bits BITS*s of word r) followed by `scales`
float16 `[G, N]`; `qzeros` int32 `[G, N / P]` (packed along N) when asymmetric, else the zero
point is 2**(BITS-1); checkpoint format "gptq" (v1) stores zero - 1. desc_act is a permutation
of the activations: X's columns are gathered by `perm` (the weight rows were sorted by group
when the model was loaded), never the weight.

Each program owns a `[BLOCK_M, BLOCK_N]` tile of C and walks K in steps of BLOCK_K rows
(BLOCK_K / P words per column; columns are contiguous in memory, so a warp reads whole 128-byte
lines of packed words). Plane s of a word tile is the code at bit BITS*s of every word: it
multiplies X's columns P*r + s, one tensor-core dot per plane, after
`(code - zero) * scale` in fp32 and a cast to X's dtype. Scales and zeros are read per word row,
so a step may span groups (group sizes down to P rows). Codes become floats through the bits
of 2**23 (no int -> float conversion; see quant_gguf.py). SPLIT_K > 1 writes fp32 partials that
matmul_skinny.splitk_reduce_kernel sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.quant import TARGET_PROGRAMS, splitk_reduce_spec
from graphir.lowering.triton_gpu.kernels.quant_gemv import (GEMV_BUCKETS, gemv_bucket,
                                                            gptq_gemv_kernel, gptq_words)
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

# Row buckets of X: (largest M, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
CONFIGS = ((16, 16, 64, 256, 4, 3), (64, 64, 64, 128, 4, 3), (None, 128, 128, 128, 8, 2))


@triton.jit
def gptq_matmul_kernel(x_ptr, w_ptr, z_ptr, perm_ptr, c_ptr, M, N, K, group_size,
                       tiles_per_split, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                       ZERO_PLUS_ONE: tl.constexpr, HAS_PERM: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    P: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // P
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)
    nmask = rn < N
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * K
    words = w_ptr.to(tl.pointer_type(tl.int32))
    scales = (w_ptr + (K * BITS // 8).to(tl.int64) * N).to(tl.pointer_type(tl.float16))
    r = tl.arange(0, KW)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        row = k0 // P + r                                  # word rows of this step
        live = row < K // P
        row = tl.minimum(row, K // P - 1)
        # (code - z) * s = code * s - z * s: one FFMA per code after the magic-number float.
        w, s, zs = gptq_words(words, scales, z_ptr, row, rn, rn_c, nmask, N, group_size, BITS,
                              HAS_ZEROS, ZERO_PLUS_ONE, KW, BLOCK_N)
        for p in tl.static_range(P):
            code = (w >> (BITS * p)) & MASK
            wv = (((code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s + zs).to(dt)
            kcol = k0 + r * P + p
            if HAS_PERM:
                kcol = tl.load(perm_ptr + tl.minimum(kcol, K - 1))
            x = tl.load(x_rows + kcol[None, :], mask=live[None, :], other=0.0)
            acc = tl.dot(x, wv, acc, input_precision=PRECISION)
    cmask = (rm < M)[:, None] & (rn < N)[None, :]
    dst = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K > 1:
        tl.store(c_ptr + pid_k.to(tl.int64) * M * N + dst, acc, mask=cmask)
    else:
        tl.store(c_ptr + dst, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def check_shape(k: int, n: int, group_size: int, bits: int) -> int:
    """The effective group size (ValueError for shapes the kernel does not take)."""
    p = 32 // bits
    g = k if group_size == -1 else group_size
    if k % p or g % p or k % g:
        raise ValueError(f"GPTQ on cuda: in_features={k} and group_size={group_size} must be "
                         f"multiples of {p} ({bits}-bit codes per int32) and divide evenly")
    return g


GEMV_BLOCK_N = 64
GEMV_WORDS = 16         # packed words per column and step, divided among X's rows (registers)


def _family(has_perm: bool) -> str:
    return "gptq_perm" if has_perm else "gptq"


def bucket_tops(has_perm: bool = False) -> list[int | None]:
    """Largest M of each row bucket a dynamic M is planned for, smallest first."""
    return [top for top, _ in GEMV_BUCKETS if gemv_bucket(top, family=_family(has_perm))] \
        + [c[0] for c in CONFIGS]


def _gemv_config(bm: int, n: int, k: int, bits: int) -> dict:
    p = 32 // bits
    bk = max(GEMV_WORDS // bm, 4) * p
    steps = cdiv(k, bk)
    split = max(1, min(cdiv(TARGET_PROGRAMS, cdiv(n, GEMV_BLOCK_N)), steps, 16))
    per = cdiv(steps, split)
    return dict(GEMV=True, BLOCK_M=bm, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=bk,
                SPLIT_K=cdiv(steps, per), tiles_per_split=per, num_warps=4, num_stages=3)


def config_for(m_max: int | None, n: int, k: int, bits: int = 4,
               dtype: str = "bfloat16", gemv: bool | None = None,
               has_perm: bool = False) -> dict:
    """Tiles and K split for the row bucket whose largest M is m_max (None: unbounded);
    float32 X takes half the K step. Decode buckets take quant_gemv.gptq_gemv_kernel when its
    switch says so; `gemv` True / False forces the choice (sweeps time both)."""
    p = 32 // bits
    bm = gemv_bucket(m_max, gemv, _family(has_perm))
    if gemv and bm is None:
        raise ValueError(f"no GEMV bucket for M <= {m_max}")
    if bm is not None:
        return _gemv_config(bm, n, k, bits)
    for top, bm, bn, bk, warps, stages in CONFIGS:
        if top is None or (m_max is not None and m_max <= top):
            break
    # 8-bit words hold half the codes: half the rows per step keep the registers (no spills
    # offline, test_quant_aot.py); dots need BLOCK_K / P >= 16 values per plane.
    bk = max(bk // (bits // 4) // (2 if dtype == "float32" else 1), 16 * p)
    tiles = cdiv(n, bn) * (cdiv(m_max, bm) if m_max else 8)
    steps = cdiv(k, bk)
    split = max(1, min(cdiv(TARGET_PROGRAMS, tiles), steps, 16)) if m_max else 1
    per = cdiv(steps, split)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=cdiv(steps, per),
                tiles_per_split=per, num_warps=warps, num_stages=stages)


def matmul_specs(dtype: str, conf: dict, *, bits: int = 4, has_zeros: bool = False,
                 zero_plus_one: bool = True, has_perm: bool = False,
                 n: int | None = None) -> list[KernelSpec]:
    """The GPTQ matmul kernel and, when the config splits K, the reduce of its partials; an
    output width n that is a multiple of 16 is compiled in (16-byte loads of packed words)."""
    t = triton_dtype(dtype)
    split = conf["SPLIT_K"]
    sig = {"x_ptr": f"*{t}", "w_ptr": "*u8", "z_ptr": "*i32", "perm_ptr": "*i32",
           "c_ptr": "*fp32" if split > 1 else f"*{t}", "M": "i32", "N": "i32", "K": "i32",
           "group_size": "i32", "tiles_per_split": "i32"}
    gemv = bool(conf.get("GEMV"))
    consts = dict(BITS=bits, HAS_ZEROS=has_zeros, ZERO_PLUS_ONE=zero_plus_one and has_zeros,
                  HAS_PERM=has_perm, BLOCK_M=conf["BLOCK_M"], BLOCK_N=conf["BLOCK_N"],
                  BLOCK_K=conf["BLOCK_K"], SPLIT_K=split)
    if not gemv:
        consts["PRECISION"] = "tf32x3" if dtype == "float32" else "tf32"
    sig.update({k: "constexpr" for k in consts})
    bm, bn = conf["BLOCK_M"], conf["BLOCK_N"]
    tag = f"{bits}b" + ("_z" if has_zeros else "") + ("_perm" if has_perm else "")
    main = KernelSpec(
        name=f"gptq_{tag}_{'gemv' if gemv else 'matmul'}_{t}_m{bm}n{bn}"
        + (f"k{conf['BLOCK_K']}" if gemv else "") + (f"s{split}" if split > 1 else ""),
        fn=gptq_gemv_kernel if gemv else gptq_matmul_kernel, signature=sig, constexprs=consts,
        num_warps=conf["num_warps"],
        num_stages=conf["num_stages"],
        grid=lambda M, N: (cdiv(M, bm), cdiv(N, bn), split), grid_args=("M", "N"),
        divisible_by_16=("x_ptr", "w_ptr", "c_ptr")
        + (("N",) if n is not None and n % 16 == 0 else ()))
    if split == 1:
        return [main]
    return [main, splitk_reduce_spec("gptq", t, split)]


_TORCH_NAMES = {"torch.float32": "float32", "torch.float16": "float16",
                "torch.bfloat16": "bfloat16"}


def launch_matmul(x, weight, group_size: int, *, bits: int = 4, qzeros=None, perm=None,
                  checkpoint_format: str = "gptq", conf: dict | None = None, out=None):
    """x [M, K] (torch) @ the GPTQ weight (uint8 [K*bits/8 + 2G, N]) -> [M, N] in x's dtype."""
    import torch

    M, K = x.shape
    N = weight.shape[1]
    gs = check_shape(K, N, group_size, bits)
    dt = _TORCH_NAMES[str(x.dtype)]
    conf = conf or config_for(M, N, K, bits, dt, has_perm=perm is not None)
    specs = matmul_specs(dt, conf, bits=bits,
                         has_zeros=qzeros is not None,
                         zero_plus_one=checkpoint_format == "gptq", has_perm=perm is not None,
                         n=N)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    split = conf["SPLIT_K"]
    c = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    dummy = torch.zeros(1, dtype=torch.int32, device=x.device)
    main = specs[0]
    main.fn[main.grid_for(M=M, N=N)](
        x, weight, dummy if qzeros is None else qzeros, dummy if perm is None else perm, c, M, N,
        K, gs, conf["tiles_per_split"], **main.constexprs, num_warps=main.num_warps,
        num_stages=main.num_stages)
    if split > 1:
        red = specs[1]
        red.fn[red.grid_for(M=M, N=N)](c, out, out, M, N, **red.constexprs, num_warps=4)
    return out
