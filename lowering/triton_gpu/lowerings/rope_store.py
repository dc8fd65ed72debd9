"""The unfused path's `rope` and `kv_cache_store` on cuda: small Triton kernels reusing the
pair loads of the fused rope_split_store kernel and the paged addressing of kernels/paged.py.

One program per token, all heads of the token in one [1, HB, D] tile (bandwidth-bound, like the
fused kernel; the unfused path reads and writes q/k/v once more than the fused one).
"""
from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels.paged import find_sequence, slot_offsets
from graphir.lowering.triton_gpu.kernels.rope_split_store import _load_pairs, _store_pairs
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, next_pow2

from graphir.lowering.triton_gpu.kernels import rope_split_store as rss
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from .base import StepBuilder, e, static_int, ttype
from .common import MM_DTYPES, cache_dims, pow2_head_dim


@triton.jit
def rope_kernel(x_ptr, freqs_ptr, offs_ptr, clen_ptr, out_ptr, T, batch, rope_rows,
                H: tl.constexpr,
                D: tl.constexpr, HB: tl.constexpr, INTERLEAVED: tl.constexpr):
    pdl_wait()
    t = tl.program_id(0) + tl.zeros((1,), tl.int32)
    b = find_sequence(offs_ptr, t, batch)
    pos = tl.load(clen_ptr + b) + t - tl.load(offs_ptr + b)
    # The table row clamped once per token (defence in depth; valid positions unchanged).
    pos = tl.minimum(tl.maximum(pos, 0), rope_rows - 1)
    fr = tl.load(freqs_ptr + pos.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :])
    cos, sin = tl.split(tl.reshape(fr.to(tl.float32), (1, D // 2, 2)))
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    row = t.to(tl.int64) * (H * D)
    for h0 in range(0, H, HB):
        h = h0 + tl.arange(0, HB)
        m = (t < T)[:, None] & (h < H)[None, :]
        base = row[:, None] + h[None, :] * D
        a, bb = _load_pairs(x_ptr, base, m, D, INTERLEAVED)
        _store_pairs(out_ptr, base, m, a * cos - bb * sin, a * sin + bb * cos, D, INTERLEAVED)


@triton.jit
def kv_store_kernel(x_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr, T, batch, max_pages,
                    layer_idx, num_layers, num_pages, KV: tl.constexpr, NKV: tl.constexpr,
                    D: tl.constexpr, PAGE_SIZE: tl.constexpr, HB: tl.constexpr):
    pdl_wait()
    t = tl.program_id(0) + tl.zeros((1,), tl.int32)
    valid = t < T
    b = find_sequence(offs_ptr, t, batch)
    pos = tl.load(clen_ptr + b) + t - tl.load(offs_ptr + b)
    # Slot clamped into the lookup table and the cache (slot_offsets with num_pages).
    base = slot_offsets(lut_ptr, b, pos, max_pages, layer_idx, num_layers, valid, KV,
                        PAGE_SIZE, NKV, D, num_pages)
    d = tl.arange(0, D)
    for h0 in range(0, NKV, HB):
        h = h0 + tl.arange(0, HB)
        m = (valid[:, None] & (h < NKV)[None, :])[:, :, None]
        src = (t.to(tl.int64) * (NKV * D))[:, None] + h[None, :] * D
        v = tl.load(x_ptr + src[:, :, None] + d[None, None, :], mask=m)
        dst = base[:, None] + h[None, :] * D
        tl.store(blocks_ptr + dst[:, :, None] + d[None, None, :],
                 v.to(blocks_ptr.dtype.element_ty), mask=m)


def _check_d(d: int, op: str) -> None:
    if d < 2 or d & (d - 1):
        raise ValueError(f"gir.{op} on cuda: head_dim must be a power of two, got {d}")


def rope_spec(h: int, d: int, dtype: str, freqs_dtype: str, interleaved: bool) -> KernelSpec:
    hb = min(next_pow2(h), max(1, 4096 // d))
    sig = {"x_ptr": f"*{dtype}", "freqs_ptr": f"*{freqs_dtype}", "offs_ptr": "*i32",
           "clen_ptr": "*i32", "out_ptr": f"*{dtype}", "T": "i32", "batch": "i32",
           "rope_rows": "i32", "H": "constexpr", "D": "constexpr", "HB": "constexpr",
           "INTERLEAVED": "constexpr"}
    return KernelSpec(name=f"rope_{dtype}_h{h}_d{d}", fn=rope_kernel, signature=sig,
                      constexprs={"H": h, "D": d, "HB": hb, "INTERLEAVED": interleaved},
                      num_warps=4, num_stages=1, grid=lambda T: (T, 1, 1), grid_args=("T",))


def kv_store_spec(kind: int, nkv: int, d: int, page: int, dtype: str,
                  blocks_dtype: str) -> KernelSpec:
    hb = min(next_pow2(nkv), max(1, 4096 // d))
    sig = {"x_ptr": f"*{dtype}", "offs_ptr": "*i32", "clen_ptr": "*i32", "lut_ptr": "*i32",
           "blocks_ptr": f"*{blocks_dtype}", "T": "i32", "batch": "i32", "max_pages": "i32",
           "layer_idx": "i32", "num_layers": "i32", "num_pages": "i32", "KV": "constexpr",
           "NKV": "constexpr", "D": "constexpr", "PAGE_SIZE": "constexpr", "HB": "constexpr"}
    return KernelSpec(name=f"kv_store_{'kv'[kind]}_{blocks_dtype}", fn=kv_store_kernel,
                      signature=sig, constexprs={"KV": kind, "NKV": nkv, "D": d,
                                                 "PAGE_SIZE": page, "HB": hb},
                      num_warps=4, num_stages=1, grid=lambda T: (T, 1, 1), grid_args=("T",))


@register_lowering("rope", "cuda")
def _rope(sb: StepBuilder, node) -> None:
    x, freqs, offs, clen = node.operands
    d = node.attrs["head_dim"]
    _check_d(d, node.op)
    h = static_int(x.type.shape[1], "the width of gir.rope's input") // d
    spec = rope_spec(h, d, ttype(x.type.dtype), ttype(freqs.type.dtype),
                     node.attrs["interleaved"])
    T = e(x.type.shape[0])
    sb.launch(sb.kernel(spec), [T], [sb.ptr(x), sb.ptr(freqs), sb.ptr(offs), sb.ptr(clen),
                                     sb.ptr(node.results[0]), T, e(offs.type.shape[0] - 1),
                                     e(freqs.type.shape[0])])


@register_lowering("kv_cache_store", "cuda")
def _kv_cache_store(sb: StepBuilder, node) -> None:
    x, blocks, offs, clen, lut = node.operands[:5]
    shape = blocks.type.shape
    page = static_int(shape[3], "page_size of the KV blocks")
    nkv = static_int(shape[4], "n_kv_heads of the KV blocks")
    d = static_int(shape[5], "head_dim of the KV blocks")
    _check_d(d, node.op)
    spec = kv_store_spec(node.attrs["kind"], nkv, d, page, ttype(x.type.dtype),
                         ttype(blocks.type.dtype))
    T = e(x.type.shape[0])
    sb.launch(sb.kernel(spec), [T], [sb.ptr(x), sb.ptr(offs), sb.ptr(clen), sb.ptr(lut),
                                     sb.ptr(blocks), T, e(offs.type.shape[0] - 1),
                                     e(lut.type.shape[1]), node.attrs["layer"], e(shape[2]),
                                     e(shape[0])])


@register_lowering("rope_split_store", "cuda")
def _rope_split_store(sb: StepBuilder, node) -> None:
    qkv, freqs, offs, clen, lut, blocks = node.operands[:6]
    a = node.attrs
    nh, nkv, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    pow2_head_dim(d, node.op)
    page, _, _ = cache_dims(blocks, node.op)
    dt = qkv.type.dtype
    if dt not in MM_DTYPES or blocks.type.dtype != dt:
        raise ValueError(f"gir.rope_split_store on cuda needs qkv and blocks of one float dtype, "
                         f"got {dt.short} and {blocks.type.dtype.short}")
    norm = len(node.operands) >= 8
    norm_dt = node.operands[6].type.dtype if norm else dt
    specs = rss.aot_specs(nh, nkv, d, page, MM_DTYPES[dt], a["interleaved"], norm,
                          MM_DTYPES[freqs.type.dtype], MM_DTYPES[norm_dt])
    T = e(qkv.type.shape[0])
    batch = e(offs.type.shape[0] - 1)
    q_out = node.results[0]
    nw = [sb.ptr(node.operands[6]), sb.ptr(node.operands[7])] if norm else [sb.ptr(freqs)] * 2
    args = [sb.ptr(qkv), sb.ptr(offs), sb.ptr(clen), sb.ptr(lut), sb.ptr(freqs), sb.ptr(blocks),
            sb.ptr(q_out), *nw, T, batch, e(lut.type.shape[1]), a["layer"],
            e(blocks.type.shape[2]), float(a.get("qk_norm_eps", 1e-6)),
            e(blocks.type.shape[0]), e(freqs.type.shape[0])]
    chunks = [rss.head_chunks(nh, nkv, sp.constexprs["HB_Q"], sp.constexprs["HB_KV"])
              if sp.constexprs["SPLIT_HEADS"] else 1 for sp in specs]
    conds = (f"{T} * {chunks[0]} <= {rss.SPLIT_PROGRAMS}", f"{T} <= 1024", None)
    for spec, cond, c in zip(specs, conds, chunks):
        key = sb.kernel(spec)
        bt = spec.constexprs["BLOCK_T"]
        with sb.when(cond):
            sb.launch(key, [f"cdiv({T}, {bt})", c], args)
