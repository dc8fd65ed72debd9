"""Ragged prefill attention over the paged KV cache (chunked prefill, cached prefix).

q `[T, NH, D]` (rows packed by input_row_offsets); K/V read from the paged cache, which already
holds the new tokens (written by rope_split_store), for positions 0 .. cache_len + new_len - 1.
Query token i of sequence b sits at position cache_lengths[b] + i. Masks: NULL, CAUSAL,
SLIDING_WINDOW_CAUSAL, SLIDING_WINDOW_NONCAUSAL, CHUNKED_CAUSAL (window W); GQA; online softmax
in fp32 with exp2. Output `[T, NH*D]` in q's dtype.

Grid (query blocks, NH, batch), query blocks issued longest-first (causal work grows with the
block index). Key blocks outside the mask's [start, end) range are skipped. Tiles for D <= 128:
BLOCK_M=128, BLOCK_N=64, 8 warps (two warpgroups of wgmma, 64 query rows each), 3 stages: Q
32 KiB + 2-3 stages of K and V (16 KiB each) stays near 128 KiB of shared memory. D=256 halves
both tile sides to keep the registers of the fp32 accumulator in bounds.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.paged import (attend_paged_keys, check_attention_args,
                                               key_range, mask_id)
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype

@triton.jit
def flash_attention_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, window, scale,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start = tl.load(offs_ptr + b)
    seq_len = tl.load(offs_ptr + b + 1) - seq_start
    if pid_m * BLOCK_M < seq_len:
        cache_len = tl.load(cache_len_ptr + b)
        kv_len = cache_len + seq_len
        kvh = h // (NH // NKV)
        i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = i < seq_len
        qp = cache_len + i
        d = tl.arange(0, D)
        rows = (seq_start + i).to(tl.int64) * (NH * D) + h * D
        q = tl.load(q_ptr + rows[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
        q_lo = cache_len + pid_m * BLOCK_M
        q_hi = tl.minimum(kv_len, q_lo + BLOCK_M) - 1
        start, end = key_range(q_lo, q_hi, kv_len, window, MASK)
        start = (start // BLOCK_N) * BLOCK_N
        acc, _, l_i = attend_paged_keys(q, qp, b, kvh, start, end, lut_ptr, blocks_ptr,
                                        max_pages, layer_idx, num_layers, window, scale, NKV,
                                        D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None])


def block_sizes(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim."""
    if D <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def grid_rule(BLOCK_M: int, NH: int):
    return lambda batch, max_seq_len: (max(1, cdiv(max_seq_len, BLOCK_M)), NH, batch)


def flash_attention(q, input_row_offsets, cache_lengths, lookup_table, blocks, layer_idx: int,
                    mask="CAUSAL", window: int = 0, scale: float | None = None,
                    max_seq_len: int | None = None, block_m: int | None = None,
                    block_n: int | None = None):
    """Ragged attention on torch tensors; q [T, NH, D] -> [T, NH*D]."""
    import torch

    T, NH, D = q.shape
    num_layers, page_size, NKV, m = check_attention_args("flash_attention", q, blocks, mask, window)
    offs = input_row_offsets.to(torch.int64)
    batch = offs.shape[0] - 1
    if max_seq_len is None:
        max_seq_len = int((offs[1:] - offs[:-1]).max()) if batch else 0
    bm, bn, nw, ns = block_sizes(D)
    bm, bn = block_m or bm, block_n or bn
    out = q.new_empty((T, NH * D))
    if T == 0 or batch == 0:
        return out
    as_i32 = lambda x: x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else x
    flash_attention_kernel[grid_rule(bm, NH)(batch, max_seq_len)](
        q.contiguous(), as_i32(input_row_offsets), as_i32(cache_lengths), as_i32(lookup_table),
        blocks, out, lookup_table.shape[1], layer_idx, num_layers, max(window, 1),
        float(D ** -0.5 if scale is None else scale), NH=NH, NKV=NKV, D=D, PAGE_SIZE=page_size,
        MASK=m, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    return out


def aot_specs(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
              dtype: str = "bfloat16", mask="CAUSAL") -> list[KernelSpec]:
    """One specialization per (model shape, mask); window and scale stay runtime values."""
    t = triton_dtype(dtype)
    bm, bn, nw, ns = block_sizes(head_dim)
    sig = {"q_ptr": f"*{t}", "offs_ptr": "*i32", "cache_len_ptr": "*i32", "lut_ptr": "*i32",
           "blocks_ptr": f"*{t}", "out_ptr": f"*{t}", "max_pages": "i32", "layer_idx": "i32",
           "num_layers": "i32", "window": "i32", "scale": "fp32"}
    names = ["NH", "NKV", "D", "PAGE_SIZE", "MASK", "BLOCK_M", "BLOCK_N"]
    sig.update({n: "constexpr" for n in names})
    vals = [n_heads, n_kv_heads, head_dim, page_size, mask_id(mask), bm, bn]
    return [KernelSpec(
        name=f"flash_attention_{t}_mask{mask_id(mask)}", fn=flash_attention_kernel,
        signature=sig, constexprs=dict(zip(names, vals)), num_warps=nw, num_stages=ns,
        grid=grid_rule(bm, n_heads), grid_args=("batch", "max_seq_len"),
        divisible_by_16=("q_ptr", "blocks_ptr", "out_ptr"),
        notes="window must be >= 1 (pass 1 for masks without a window)")]
