"""MLA prefill with decompressed K/V: ordinary causal attention with head dim nope + rope for q/k
(192 for DeepSeek) and v_head_dim for v (128), for batches that bring many new tokens.

Two launches:
  1. `mla_decompress_kernel`: for every cached + new key of every sequence and every head,
     K_nope = c_kv @ w_k[h]^T and V = c_kv @ w_uv[h] (c_kv: the first R columns of its latent
     cache row), written once to scratch `kv [batch, kv_cap, NH, NOPE + V]` in q's dtype (key l
     of sequence b at row b * kv_cap + l, kv_cap = the bucketed longest context), so the
     decompression is done once per key and head, not once per query tile;
  2. `mla_prefill_attn_kernel`: the ragged flash loop (grid: query blocks longest-first x heads x
     sequences): scores = q_nope . K_nope + q_rope . k_pe, where the shared k_pe (roped, one per
     key) is read straight from the latent cache; online softmax in fp32 with exp2; output
     `[T, NH * V]`.
Query token i of sequence b sits at position cache_len + i and sees the keys up to itself (the
cached prefix and the earlier new tokens).
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.mla import latent_rows, pad
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

DECOMP_BLOCK_L = 128
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64


@triton.jit
def mla_decompress_kernel(wk_ptr, wuv_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr, kv_ptr,
                          kv_cap, max_pages, layer_idx, num_layers, num_pages,
                          NH: tl.constexpr, NOPE: tl.constexpr, V: tl.constexpr,
                          R: tl.constexpr, ROPE: tl.constexpr, NOPEP: tl.constexpr,
                          VP: tl.constexpr, KINDS: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    W: tl.constexpr = R + ROPE
    lb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_new = tl.load(offs_ptr + b + 1) - tl.load(offs_ptr + b)
    # Keys clamped into the sequence's scratch rows (kv_cap) and the cache length into what the
    # lookup table addresses: bad metadata writes no scratch row of another sequence or past
    # the buffer (once a program; valid metadata is unchanged).
    cache_len = tl.minimum(tl.maximum(tl.load(clen_ptr + b), 0), max_pages * PAGE_SIZE)
    kv_len = tl.minimum(cache_len + n_new, kv_cap)
    if (lb * BLOCK_L < kv_len) & (n_new > 0):
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        lm = l < kv_len
        crow = latent_rows(lut_ptr, b, l, lm, max_pages, layer_idx, num_layers, num_pages, KINDS,
                           PAGE_SIZE)
        d = tl.arange(0, NOPEP)
        v = tl.arange(0, VP)
        dt = kv_ptr.dtype.element_ty
        acc_k = tl.zeros((BLOCK_L, NOPEP), tl.float32)
        acc_v = tl.zeros((BLOCK_L, VP), tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rm = r < R
            c = tl.load(blocks_ptr + crow[:, None] * W + r[None, :], mask=lm[:, None] & rm[None, :],
                        other=0.0).to(dt)
            wk = tl.load(wk_ptr + (h * NOPE + d)[None, :].to(tl.int64) * R + r[:, None],
                         mask=rm[:, None] & (d < NOPE)[None, :], other=0.0).to(dt)
            acc_k = tl.dot(c, wk, acc_k, input_precision=PRECISION)
            wv = tl.load(wuv_ptr + h * (R * V) + r[:, None] * V + v[None, :],
                         mask=rm[:, None] & (v < V)[None, :], other=0.0).to(dt)
            acc_v = tl.dot(c, wv, acc_v, input_precision=PRECISION)
        dst = kv_ptr + ((b.to(tl.int64) * kv_cap + l) * NH + h)[:, None] * (NOPE + V)
        tl.store(dst + d[None, :], acc_k.to(dt), mask=lm[:, None] & (d < NOPE)[None, :])
        tl.store(dst + NOPE + v[None, :], acc_v.to(dt), mask=lm[:, None] & (v < V)[None, :])


@triton.jit
def mla_prefill_attn_kernel(q_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr, kv_ptr, out_ptr,
                            kv_cap, max_pages, layer_idx, num_layers, num_pages, scale,
                            NH: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                            V: tl.constexpr, R: tl.constexpr, NOPEP: tl.constexpr,
                            EP: tl.constexpr, VP: tl.constexpr, KINDS: tl.constexpr,
                            PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    W: tl.constexpr = R + ROPE
    QW: tl.constexpr = NOPE + ROPE
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)   # longest query blocks first
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start = tl.load(offs_ptr + b)
    n_new = tl.load(offs_ptr + b + 1) - seq_start
    if pid_m * BLOCK_M < n_new:
        # As in the decompression: keys stay inside the sequence's kv_cap scratch rows.
        cache_len = tl.minimum(tl.maximum(tl.load(clen_ptr + b), 0), max_pages * PAGE_SIZE)
        i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        im = i < n_new
        d = tl.arange(0, NOPEP)
        e = tl.arange(0, EP)
        v = tl.arange(0, VP)
        qrow = q_ptr + (seq_start + i).to(tl.int64)[:, None] * (NH * QW) + h * QW
        q_n = tl.load(qrow + d[None, :], mask=im[:, None] & (d < NOPE)[None, :], other=0.0)
        q_pe = tl.load(qrow + NOPE + e[None, :], mask=im[:, None] & (e < ROPE)[None, :],
                       other=0.0)
        dt = q_n.dtype
        qp = cache_len + i
        end = tl.minimum(tl.minimum(cache_len + n_new, cache_len + pid_m * BLOCK_M + BLOCK_M),
                         kv_cap)
        qk_scale = scale * 1.4426950408889634
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, VP), tl.float32)
        kv_base = kv_ptr + (b.to(tl.int64) * kv_cap * NH + h) * (NOPE + V)
        for n0 in range(0, end, BLOCK_N):
            kp = n0 + tl.arange(0, BLOCK_N)
            km = kp < end
            rows = kv_base + kp.to(tl.int64)[:, None] * (NH * (NOPE + V))
            k = tl.load(rows + d[None, :], mask=km[:, None] & (d < NOPE)[None, :], other=0.0)
            vv = tl.load(rows + NOPE + v[None, :], mask=km[:, None] & (v < V)[None, :], other=0.0)
            crow = latent_rows(lut_ptr, b, kp, km, max_pages, layer_idx, num_layers, num_pages,
                               KINDS, PAGE_SIZE)
            pe = tl.load(blocks_ptr + crow[:, None] * W + R + e[None, :],
                         mask=km[:, None] & (e < ROPE)[None, :], other=0.0).to(dt)
            s = tl.dot(q_n, tl.trans(k), input_precision=PRECISION)
            s = tl.dot(q_pe, tl.trans(pe), s, input_precision=PRECISION)
            ok = (kp[None, :] <= qp[:, None]) & km[None, :]
            s = tl.where(ok, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(dt), vv, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (seq_start + i).to(tl.int64)[:, None] * (NH * V) + h * V + v[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=im[:, None] & (v < V)[None, :])


def specs(dtype: str, cache_dtype: str, nh: int, nope: int, rope: int, v: int, r: int,
          kinds: int, page_size: int) -> list[KernelSpec]:
    """[decompress, attention] for q/weights of `dtype` over a `cache_dtype` cache."""
    t, tc = triton_dtype(dtype), triton_dtype(cache_dtype)
    prec = "tf32x3" if dtype == "float32" else "tf32"
    nopep, vp, ep = pad(nope), pad(v), pad(rope)
    dc = dict(NH=nh, NOPE=nope, V=v, R=r, ROPE=rope, NOPEP=nopep, VP=vp, KINDS=kinds,
              PAGE_SIZE=page_size, BLOCK_L=DECOMP_BLOCK_L, BLOCK_R=min(pad(r), 64),
              PRECISION=prec)
    dsig = {"wk_ptr": f"*{t}", "wuv_ptr": f"*{t}", "offs_ptr": "*i32", "clen_ptr": "*i32",
            "lut_ptr": "*i32", "blocks_ptr": f"*{tc}", "kv_ptr": f"*{t}", "kv_cap": "i32",
            "max_pages": "i32", "layer_idx": "i32", "num_layers": "i32", "num_pages": "i32",
            **{k: "constexpr" for k in dc}}
    # Float32 operands over R > 128 take fewer stages, within sm_90's shared memory (at R 512:
    # 262 and 246 KB with the 16-bit stage counts, 164 KB each with these).
    wide32 = "float32" in (dtype, cache_dtype) and pad(r) > 128
    decomp = KernelSpec(name=f"mla_decompress_{t}", fn=mla_decompress_kernel, signature=dsig,
                        constexprs=dc, num_warps=8, num_stages=2 if wide32 else 3,
                        grid=lambda batch, kv_cap: (cdiv(kv_cap, DECOMP_BLOCK_L), nh, batch),
                        grid_args=("batch", "kv_cap"),
                        divisible_by_16=("wk_ptr", "wuv_ptr", "blocks_ptr", "kv_ptr"))
    warps = 8 if nopep + ep > 128 else 4
    ac = dict(NH=nh, NOPE=nope, ROPE=rope, V=v, R=r, NOPEP=nopep, EP=ep, VP=vp, KINDS=kinds,
              PAGE_SIZE=page_size, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N,
              PRECISION=prec)
    asig = {"q_ptr": f"*{t}", "offs_ptr": "*i32", "clen_ptr": "*i32", "lut_ptr": "*i32",
            "blocks_ptr": f"*{tc}", "kv_ptr": f"*{t}", "out_ptr": f"*{t}", "kv_cap": "i32",
            "max_pages": "i32", "layer_idx": "i32", "num_layers": "i32", "num_pages": "i32",
            "scale": "fp32", **{k: "constexpr" for k in ac}}
    attn = KernelSpec(name=f"mla_prefill_attn_{t}", fn=mla_prefill_attn_kernel, signature=asig,
                      constexprs=ac, num_warps=warps, num_stages=1 if wide32 else 2,
                      grid=lambda batch, seqmax: (cdiv(seqmax, PREFILL_BLOCK_M), nh, batch),
                      grid_args=("batch", "seqmax"),
                      divisible_by_16=("q_ptr", "blocks_ptr", "kv_ptr", "out_ptr"))
    return [decomp, attn]
