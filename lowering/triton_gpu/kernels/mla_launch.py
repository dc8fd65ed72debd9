"""The MLA kernels on torch tensors, launched as the cuda plan launches them (tests under Triton's
interpreter, GPU sweeps). Index tensors (offsets, cache lengths, lookup table) may be uint32
or int32; blocks are `[pages, KINDS, layers, page_size, 1, R + ROPE]`."""

from __future__ import annotations

from graphir.lowering.triton_gpu.kernels import mla as mk
from graphir.lowering.triton_gpu.kernels import mla_decode as md
from graphir.lowering.triton_gpu.kernels import mla_prefill as mp
from graphir.lowering.triton_gpu.kernels.spec import cdiv, torch_global_scratch

_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def _i32(x):
    import torch

    return x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else \
        x.to(torch.int32).contiguous()


def _run(spec, grid, *args):
    if not grid[0] * grid[1] * grid[2]:
        return
    if not args[0].is_cuda:  # a Gluon kernel has no interpreter: its Triton twin runs there
        spec = spec.interpretable()
    elif spec.interpretable() is not spec:  # the Gluon kernel makes its TMA descriptor
        torch_global_scratch(args[0].device)
    spec.fn[grid](*args, **spec.constexprs, num_warps=spec.num_warps,
                  num_stages=spec.num_stages)


def cache_store(kv, norm_w, freqs, offs, clen, lut, blocks, *, kv_lora_rank: int, layer: int,
                interleaved: bool, eps: float = 1e-6) -> None:
    """Write [rms_norm(c_kv) * w | rope(k_pe)] of kv [T, R + ROPE] into `blocks` (in place)."""
    T, W = kv.shape
    r = kv_lora_rank
    s = mk.cache_store_spec(_NAMES[str(kv.dtype)], _NAMES[str(blocks.dtype)], r, W - r,
                            blocks.shape[1], blocks.shape[3], interleaved,
                            _NAMES[str(freqs.dtype)])
    _run(s, (T, 1, 1), kv.contiguous(), norm_w.contiguous(), freqs.contiguous(), _i32(offs),
         _i32(clen), _i32(lut), blocks, offs.shape[0] - 1, lut.shape[1], layer, blocks.shape[2],
         blocks.shape[0], float(eps), freqs.shape[0])


def prefill_plan(offs, clen):
    """(buffer_row_offsets, cache_offsets, buffer_lengths) as int32 tensors."""
    import torch

    batch = offs.shape[0] - 1
    rows = torch.empty(batch + 1, dtype=torch.int32, device=offs.device)
    starts = torch.empty(max(batch, 1), dtype=torch.int32, device=offs.device)
    total = torch.empty(1, dtype=torch.int32, device=offs.device)
    s = mk.prefill_plan_spec()
    _run(s, (1, 1, 1), _i32(offs), _i32(clen), rows, starts, total, batch)
    return rows, starts[:batch], total


def attention(q, blocks, offs, clen, lut, w1, w_uv, *, n_heads: int, qk_nope_head_dim: int,
              qk_rope_head_dim: int, v_head_dim: int, kv_lora_rank: int, layer: int,
              scale: float, path: str, num_parts: int | None = None, conf: dict | None = None,
              aux_block_t: int = md.AUX_BLOCK_T, merge: str | None = None):
    """MLA attention [T, NH * V] by the absorbed (path="absorbed") or decompressed kernels
    (`aux_block_t`, `merge`: mla_decode.specs' tokens a program of the absorption and the w_uv
    product, and the merge's form).

    w1 is w_k [NH * nope, R] or w_uk [NH, nope, R] (the same memory); w_uv is [NH, R, V].
    """
    import torch

    nh, nope, rope, v, r = n_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank
    T = q.shape[0]
    batch = offs.shape[0] - 1
    dt, cdt = _NAMES[str(q.dtype)], _NAMES[str(blocks.dtype)]
    kinds, page = blocks.shape[1], blocks.shape[3]
    o64, c64 = offs.to(torch.int64), clen.to(torch.int64)
    lens = o64[1:] - o64[:-1]
    seqmax = int(lens.max()) if batch else 0
    kvmax = int((c64 + lens).max()) if batch else 0
    out = torch.empty((T, nh * v), dtype=q.dtype, device=q.device)
    io, ic, il = _i32(offs), _i32(clen), _i32(lut)
    geo = (lut.shape[1], layer, blocks.shape[2], blocks.shape[0])
    q, w1, w_uv = q.contiguous(), w1.contiguous(), w_uv.contiguous()
    if path == "absorbed":
        conf = md.layer_config(nh, r, dt, cdt, rope, page, conf)
        absorb, attn, *tail = md.specs(dt, cdt, nh, nope, rope, v, r, kinds, page, conf,
                                       aux_block_t, merge)
        qlat = torch.empty((T * nh, r + rope), dtype=q.dtype, device=q.device)
        _run(absorb, absorb.grid_for(T=T), q, w1, qlat, T)
        kv_len = max(kvmax, 1)
        tiles = cdiv(max(seqmax, 1) * nh, conf["BLOCK_M"])
        if num_parts is None:
            parts, part = md.split(batch, tiles, kv_len, conf)
        else:
            bn = conf["BLOCK_N"]
            part = cdiv(cdiv(kv_len, num_parts), bn) * bn
            parts = cdiv(kv_len, part)
        rp = attn.constexprs["RP"]
        o_part = torch.empty((max(T * nh * parts, 1), rp), dtype=torch.float32, device=q.device)
        ml = torch.empty((max(T * nh * parts, 1), 2), dtype=torch.float32, device=q.device)
        _run(attn, attn.grid_for(batch=batch, seqmax=seqmax, num_parts=parts), qlat, io, ic, il,
             blocks, o_part, ml, *geo, float(scale), part, parts)
        merge_partials(tail, o_part, ml, w_uv, out, T, nh, r, parts)
        return out
    decomp, attn = mp.specs(dt, cdt, nh, nope, rope, v, r, kinds, page)
    kv_cap = max(kvmax, 1)
    kv = torch.empty((batch * kv_cap * nh, nope + v), dtype=q.dtype, device=q.device)
    _run(decomp, decomp.grid_for(batch=batch, kv_cap=kv_cap), w1, w_uv, io, ic, il, blocks, kv,
         kv_cap, *geo)
    _run(attn, attn.grid_for(batch=batch, seqmax=seqmax), q, io, ic, il, blocks, kv, out, kv_cap,
         *geo, float(scale))
    return out


def merge_partials(tail, o_part, ml, w_uv, out, T: int, nh: int, r: int, parts: int) -> None:
    """The launches after the attention (mla_decode.specs' tail): the fused merge, or the
    combine into o_lat [T * nh, r] then the w_uv product."""
    import torch

    if len(tail) == 1:
        _run(tail[0], tail[0].grid_for(T=T), o_part, ml, w_uv, out, T, parts)
        return
    combine, uv = tail
    olat = torch.empty((max(T * nh, 1), r), dtype=out.dtype, device=out.device)
    _run(combine, combine.grid_for(T=T), o_part, ml, olat, T * nh, parts)
    _run(uv, uv.grid_for(T=T), olat, w_uv, out, T)
