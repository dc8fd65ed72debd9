"""Decode attention over the paged KV cache: split-K partitions plus a reduce kernel.

Each program of the partial kernel owns (sequence b, KV head, partition of the context) and
processes every query head of that KV head's GQA group together: the G = NH/NKV heads (times up
to Q_PER_SEQ new tokens, for speculative / few-token decode) form the M side of the dot, so each
K/V tile is read from memory once per group. Partials (unnormalized accumulator, running max in
log2 units and sum) go to fp32 scratch `o_part [T*NH, num_parts, D]`, `ml_part [T*NH,
num_parts, 2]`; the reduce kernel rescales and sums them. Empty partitions write (0, -1e30, 0),
so the reduce needs no lengths.

Tiles: BLOCK_N=64 keys, BLOCK_M = next_pow2(max(16, Q_PER_SEQ*G)) (tl.dot needs M >= 16), 4
warps, 3 stages (~64-96 KiB of shared memory: two CTAs per SM keep ~200 KiB of K/V in flight).
The partition count targets two programs per SM (132 SMs on H100) with at least 256 keys each.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.paged import (attend_paged_keys, check_attention_args,
                                               key_range, mask_id)
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, next_pow2, triton_dtype

NUM_SMS = 132
BLOCK_P = 16


@triton.jit
def paged_decode_partial_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, o_part_ptr, ml_part_ptr,
        max_pages, layer_idx, num_layers, window, scale, part_size, num_parts,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, Q_PER_SEQ: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    G: tl.constexpr = NH // NKV
    seq_start = tl.load(offs_ptr + b)
    seq_len = tl.minimum(tl.load(offs_ptr + b + 1) - seq_start, Q_PER_SEQ)
    cache_len = tl.load(cache_len_ptr + b)
    kv_len = cache_len + seq_len
    r = tl.arange(0, BLOCK_M)
    i = r // G
    rmask = (i < seq_len) & (r < Q_PER_SEQ * G)
    head_row = (seq_start + i).to(tl.int64) * NH + kvh * G + r % G
    d = tl.arange(0, D)
    q = tl.load(q_ptr + head_row[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    qp = cache_len + i
    lo, hi = key_range(cache_len, kv_len - 1, kv_len, window, MASK)
    p_start = tl.maximum(part * part_size, lo)
    p_end = tl.minimum(part * part_size + part_size, hi)
    acc, m_i, l_i = attend_paged_keys(q, qp, b, kvh, p_start, p_end, lut_ptr, blocks_ptr,
                                      max_pages, layer_idx, num_layers, window, scale, NKV, D,
                                      PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
    slot = head_row * num_parts + part
    tl.store(o_part_ptr + slot[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(ml_part_ptr + slot * 2, m_i, mask=rmask)
    tl.store(ml_part_ptr + slot * 2 + 1, l_i, mask=rmask)


@triton.jit
def paged_decode_reduce_kernel(o_part_ptr, ml_part_ptr, out_ptr, num_parts, D: tl.constexpr,
                               BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    m_run = tl.max(tl.full((BLOCK_P,), -1.0e30, tl.float32), 0)
    l_run = tl.sum(tl.zeros((BLOCK_P,), tl.float32), 0)
    acc = tl.zeros((D,), tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < num_parts
        slot = row * num_parts + p
        m = tl.load(ml_part_ptr + slot * 2, mask=pm, other=-1.0e30)
        l = tl.load(ml_part_ptr + slot * 2 + 1, mask=pm, other=0.0)
        o = tl.load(o_part_ptr + slot[:, None] * D + d[None, :], mask=pm[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new)
        l_run = l_run * alpha + tl.sum(l * w, 0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def partition(batch: int, n_kv_heads: int, max_kv_len: int, block_n: int = 64,
              num_sms: int = NUM_SMS, min_part: int = 256) -> tuple[int, int]:
    """(num_parts, part_size): about two programs per SM, partitions a multiple of block_n."""
    max_kv_len = max(max_kv_len, 1)
    want = max(1, cdiv(2 * num_sms, max(batch * n_kv_heads, 1)))
    part = max(cdiv(max_kv_len, want), min(min_part, max_kv_len))
    part = cdiv(part, block_n) * block_n
    return cdiv(max_kv_len, part), part


def block_m(n_heads: int, n_kv_heads: int, q_per_seq: int) -> int:
    return next_pow2(max(16, q_per_seq * (n_heads // n_kv_heads)))


def paged_decode(q, input_row_offsets, cache_lengths, lookup_table, blocks, layer_idx: int,
                 mask="CAUSAL", window: int = 0, scale: float | None = None,
                 max_kv_len: int | None = None, q_per_seq: int = 1, block_n: int = 64,
                 num_parts: int | None = None):
    """Decode attention on torch tensors; q [T, NH, D] (<= q_per_seq rows per sequence)."""
    import torch

    T, NH, D = q.shape
    num_layers, page_size, NKV, m = check_attention_args("paged_decode", q, blocks, mask, window)
    offs = input_row_offsets.to(torch.int64)
    lens = offs[1:] - offs[:-1]
    batch = lens.shape[0]
    if batch and int(lens.max()) > q_per_seq:
        raise ValueError(f"paged_decode: a sequence has {int(lens.max())} new tokens, more "
                         f"than q_per_seq={q_per_seq}")
    if max_kv_len is None:
        max_kv_len = int((cache_lengths.to(torch.int64) + lens).max()) if batch else 1
    nparts, part = partition(batch, NKV, max_kv_len, block_n)
    if num_parts is not None:
        part = cdiv(cdiv(max_kv_len, num_parts), block_n) * block_n
        nparts = cdiv(max_kv_len, part)
    out = q.new_empty((T, NH * D))
    if T == 0:
        return out
    o_part = torch.empty((T * NH, nparts, D), dtype=torch.float32, device=q.device)
    ml_part = torch.empty((T * NH, nparts, 2), dtype=torch.float32, device=q.device)
    as_i32 = lambda x: x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else x
    paged_decode_partial_kernel[(batch, NKV, nparts)](
        q.contiguous(), as_i32(input_row_offsets), as_i32(cache_lengths), as_i32(lookup_table),
        blocks, o_part, ml_part, lookup_table.shape[1], layer_idx, num_layers, max(window, 1),
        float(D ** -0.5 if scale is None else scale), part, nparts, NH=NH, NKV=NKV, D=D,
        PAGE_SIZE=page_size, MASK=m, Q_PER_SEQ=q_per_seq, BLOCK_M=block_m(NH, NKV, q_per_seq),
        BLOCK_N=block_n, num_warps=4, num_stages=3)
    paged_decode_reduce_kernel[(T * NH,)](o_part, ml_part, out, nparts, D=D, BLOCK_P=BLOCK_P,
                                          num_warps=4)
    return out


def aot_specs(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
              dtype: str = "bfloat16", mask="CAUSAL", q_per_seq: int = 1,
              block_n: int = 64) -> list[KernelSpec]:
    """The partial and reduce kernels. Launch: (num_parts, part_size) = partition(batch,
    n_kv_heads, max_kv_len); scratch o_part T*NH*num_parts*D fp32, ml_part T*NH*num_parts*2."""
    t = triton_dtype(dtype)
    sig = {"q_ptr": f"*{t}", "offs_ptr": "*i32", "cache_len_ptr": "*i32", "lut_ptr": "*i32",
           "blocks_ptr": f"*{t}", "o_part_ptr": "*fp32", "ml_part_ptr": "*fp32",
           "max_pages": "i32", "layer_idx": "i32", "num_layers": "i32", "window": "i32",
           "scale": "fp32", "part_size": "i32", "num_parts": "i32"}
    names = ["NH", "NKV", "D", "PAGE_SIZE", "MASK", "Q_PER_SEQ", "BLOCK_M", "BLOCK_N"]
    sig.update({n: "constexpr" for n in names})
    vals = [n_heads, n_kv_heads, head_dim, page_size, mask_id(mask), q_per_seq,
            block_m(n_heads, n_kv_heads, q_per_seq), block_n]
    partial = KernelSpec(
        name=f"paged_decode_partial_{t}_mask{mask_id(mask)}", fn=paged_decode_partial_kernel,
        signature=sig, constexprs=dict(zip(names, vals)), num_warps=4, num_stages=3,
        grid=lambda batch, max_kv_len: (batch, n_kv_heads,
                                        partition(batch, n_kv_heads, max_kv_len, block_n)[0]),
        grid_args=("batch", "max_kv_len"),
        divisible_by_16=("q_ptr", "blocks_ptr", "o_part_ptr", "ml_part_ptr"),
        notes="part_size, num_parts = partition(batch, n_kv_heads, max_kv_len); window >= 1")
    rsig = {"o_part_ptr": "*fp32", "ml_part_ptr": "*fp32", "out_ptr": f"*{t}",
            "num_parts": "i32", "D": "constexpr", "BLOCK_P": "constexpr"}
    reduce = KernelSpec(
        name=f"paged_decode_reduce_{t}", fn=paged_decode_reduce_kernel, signature=rsig,
        constexprs={"D": head_dim, "BLOCK_P": BLOCK_P}, num_warps=4, num_stages=1,
        grid=lambda T: (T * n_heads, 1, 1), grid_args=("T",),
        divisible_by_16=("o_part_ptr", "ml_part_ptr", "out_ptr"))
    return [partial, reduce]
