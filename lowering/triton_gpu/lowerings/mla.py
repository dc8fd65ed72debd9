"""CUDA lowerings of the MLA ops onto kernels/mla*.py: the latent cache store, the prefill plan,
and mla_prefill / mla_decode / mla_attention.

The three attention ops compute the same attention (the decompressed and the absorbed forms of
one softmax; operands 7-9, the prefill plan, are not needed: the kernels place every key from
the offsets and cache lengths), so all lower to the same two plan variants and the batch picks:
while every sequence brings at most ABSORB_MAX new tokens (decode, speculative decode, short
chunks; mla_attention's absorb_max when larger) the absorbed kernels run (q absorbed into
latent space, split-K over the context, then w_uv); longer prefills decompress K/V once per key
and head into scratch and run the ragged flash loop (head dim nope + rope for q/k, v_head_dim
for v). The absorbed path costs ~(R + rope + R) per
query-key pair and head against ~(nope + rope + v) for the decompressed one plus R * (nope + v)
per key and head to decompress, which breaks even near a hundred new tokens per sequence.
Launches depend on the batch, T, the exact most-new-tokens fact and the longest context bucketed
by 256 tokens (so a decode loop replays one CUDA graph per bucket).
"""
from __future__ import annotations

from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels import mla as mk
from graphir.lowering.triton_gpu.kernels import mla_decode as md
from graphir.lowering.triton_gpu.kernels import mla_prefill as mp
from graphir.lowering.triton_gpu.kernels.spec import cdiv

from .base import StepBuilder, e, static_int
from .common import MM_DTYPES

ABSORB_MAX = 64       # most new tokens per sequence the absorbed path takes
KV_BUCKET = 256
_SCRATCH = {"float32": "float32", "float16": "float16", "bfloat16": "float16"}  # by item size


def _dtypes(node, q, blocks) -> tuple[str, str]:
    for what, v in (("q", q), ("the latent cache", blocks)):
        if v.type.dtype not in MM_DTYPES:
            raise ValueError(f"gir.{node.op} on cuda needs float32, float16 or bfloat16 {what}, "
                             f"got {v.type.dtype.short}")
    return MM_DTYPES[q.type.dtype], MM_DTYPES[blocks.type.dtype]


def _cache_geometry(sb: StepBuilder, node, blocks, lut) -> tuple[int, int, list]:
    """(KINDS, page_size, [max_pages, layer, num_layers, num_pages] launch args)."""
    shape = blocks.type.shape
    kinds = static_int(shape[1], f"the kinds axis of the blocks of gir.{node.op}")
    page = static_int(shape[3], f"page_size of the blocks of gir.{node.op}")
    return kinds, page, [e(lut.type.shape[1]), node.attrs["layer"], e(shape[2]), e(shape[0])]


@register_lowering("mla_cache_store", "cuda")
def _cache_store(sb: StepBuilder, node) -> None:
    kv, w, freqs, offs, clen, lut, blocks = node.operands[:7]
    a = node.attrs
    dt, cdt = _dtypes(node, kv, blocks)
    if freqs.type.dtype not in MM_DTYPES:
        raise ValueError(f"gir.mla_cache_store on cuda needs a float RoPE table, got "
                         f"{freqs.type.dtype.short}")
    kinds, page, geo = _cache_geometry(sb, node, blocks, lut)
    r, rope = a["kv_lora_rank"], a["qk_rope_head_dim"]
    spec = mk.cache_store_spec(dt, cdt, r, rope, kinds, page, a["interleaved"],
                               MM_DTYPES[freqs.type.dtype])
    sb.launch(sb.kernel(spec), [e(kv.type.shape[0])],
              [sb.ptr(kv), sb.ptr(w), sb.ptr(freqs), sb.ptr(offs), sb.ptr(clen), sb.ptr(lut),
               sb.ptr(blocks), e(offs.type.shape[0] - 1)] + geo
              + [float(a["eps"]), e(freqs.type.shape[0])])


@register_lowering("mla_prefill_plan", "cuda")
def _prefill_plan(sb: StepBuilder, node) -> None:
    offs, clen = node.operands[:2]
    rows, starts, total = node.results
    sb.launch(sb.kernel(mk.prefill_plan_spec()), [1],
              [sb.ptr(offs), sb.ptr(clen), sb.ptr(rows), sb.ptr(starts), sb.ptr(total),
               e(offs.type.shape[0] - 1)])


def _attention(sb: StepBuilder, node) -> None:
    q, blocks, offs, clen, lut, w1, w_uv = node.operands[:7]
    a = node.attrs
    nh, nope, rope, v, r = (a[k] for k in ("n_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                           "v_head_dim", "kv_lora_rank"))
    dt, cdt = _dtypes(node, q, blocks)
    kinds, page, geo = _cache_geometry(sb, node, blocks, lut)
    scale = float(a["scale"])
    out = node.results[0]
    T, batch = e(q.type.shape[0]), e(offs.type.shape[0] - 1)
    seqmax = sb.seq_max(sb.vid(offs))
    kvmax = sb.kv_max(sb.vid(offs), sb.vid(clen), bucket=KV_BUCKET)
    meta = [sb.ptr(offs), sb.ptr(clen), sb.ptr(lut), sb.ptr(blocks)]
    item = _SCRATCH[dt]

    conf = md.layer_config(nh, r, dt, cdt, rope, page)
    absorb, attn, *tail = md.specs(dt, cdt, nh, nope, rope, v, r, kinds, page, conf)
    bm, rp = conf["BLOCK_M"], attn.constexprs["RP"]
    sb.let("mla_kv_len", f"max({kvmax}, 1)")
    sb.let("mla_tiles", f"cdiv(max({seqmax}, 1) * {nh}, {bm})")
    for name, expr in md.split_lets(batch, "mla_tiles", "mla_kv_len", conf):
        sb.let(name, expr)
    parts, part_size = "mla_num_parts", "mla_part_size"
    absorb_max = max(ABSORB_MAX, int(a.get("absorb_max", 0)))
    with sb.when(f"{seqmax} <= {absorb_max}"):
        qlat = sb.scratch("q_lat", item, f"({T}) * {nh * (r + rope)}")
        o_part = sb.scratch("o_part", "float32", f"({T}) * {nh} * {parts} * {rp}")
        ml = sb.scratch("ml_part", "float32", f"({T}) * {nh} * {parts} * 2")
        br = absorb.constexprs["BLOCK_R"]
        sb.launch(sb.kernel(absorb), [f"cdiv({T}, {absorb.constexprs['BLOCK_T']})", nh,
                                      cdiv(r, br)],
                  [sb.ptr(q), sb.ptr(w1), qlat, T])
        sb.launch(sb.kernel(attn), [f"cdiv({seqmax} * {nh}, {bm}) * {conf['VSPLIT']}", parts,
                                    batch],
                  [qlat] + meta + [o_part, ml] + geo + [scale, part_size, parts])
        if len(tail) == 1:   # the fused merge
            sb.launch(sb.kernel(tail[0]), [f"cdiv({T}, {tail[0].constexprs['BLOCK_T']})", nh],
                      [o_part, ml, sb.ptr(w_uv), sb.ptr(out), T, parts])
        else:                # combine into o_lat, then the w_uv product (mla_merge.py)
            combine, uv = tail
            olat = sb.scratch("o_lat", item, f"({T}) * {nh * r}")
            sb.launch(sb.kernel(combine), [f"cdiv(({T}) * {nh}, {combine.constexprs['ROWS']})",
                                           cdiv(r, combine.constexprs["COLS"])],
                      [o_part, ml, olat, f"({T}) * {nh}", parts])
            sb.launch(sb.kernel(uv), [f"cdiv({T}, {uv.constexprs['BLOCK_T']})", nh],
                      [olat, sb.ptr(w_uv), sb.ptr(out), T])
    decomp, pattn = mp.specs(dt, cdt, nh, nope, rope, v, r, kinds, page)
    with sb.when(None):
        kv = sb.scratch("kv_decompressed", item,
                        f"({batch}) * mla_kv_len * {nh * (nope + v)}")
        sb.launch(sb.kernel(decomp), [f"cdiv(mla_kv_len, {mp.DECOMP_BLOCK_L})", nh, batch],
                  [sb.ptr(w1), sb.ptr(w_uv)] + meta + [kv, "mla_kv_len"] + geo)
        sb.launch(sb.kernel(pattn), [f"cdiv({seqmax}, {mp.PREFILL_BLOCK_M})", nh, batch],
                  [sb.ptr(q)] + meta + [kv, sb.ptr(out), "mla_kv_len"] + geo + [scale])


register_lowering("mla_prefill", "cuda")(_attention)
register_lowering("mla_decode", "cuda")(_attention)
register_lowering("mla_attention", "cuda")(_attention)  # graph_mode "auto"; w1 = w_uk
