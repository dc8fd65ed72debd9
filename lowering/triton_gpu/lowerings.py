"""CUDA lowerings of the kernel ops onto the hand-written Triton kernels.

fused_qkv_matmul / matmul(transpose_b) -> kernels/matmul.py (decode tiles for M <= 64, prefill
tiles otherwise: two variants chosen at run time); rms_norm -> kernels/rms_norm.py;
rope_split_store -> kernels/rope_split_store.py (decode for T <= 1024, prefill otherwise);
flash_attention_ragged -> the split-K paged decode kernels when every sequence has at most one
new token, the ragged flash kernel otherwise (decided per call from the offsets).
"""
from __future__ import annotations

from graphir.dtype import DType
from lowering.registry import register_lowering
from lowering.triton_gpu.kernels import flash_attention as fa
from lowering.triton_gpu.kernels import matmul as mm
from lowering.triton_gpu.kernels import paged_decode as pd
from lowering.triton_gpu.kernels import rms_norm as rn
from lowering.triton_gpu.kernels import rope_split_store as rss

from .lowerings_base import StepBuilder, e, numel, static_int

MM_DTYPES = {DType.float32: "float32", DType.float16: "float16", DType.bfloat16: "bfloat16"}
DECODE_KV_BUCKET = 256   # decode launch sizes change every 256 tokens: CUDA graphs replay between


def _pow2_head_dim(d: int, op: str, minimum: int = 2) -> None:
    if d < minimum or d & (d - 1):
        raise ValueError(f"gir.{op} on cuda: head_dim must be a power of two >= {minimum}, "
                         f"got {d}")


def hand_matmul_ok(a, b, transpose_a=False, transpose_b=True) -> bool:
    """Can the hand-written A @ B^T kernel run this matmul?"""
    ta, tb = a.type, b.type
    return (ta.rank == 2 and tb.rank == 2 and transpose_b and not transpose_a
            and ta.dtype in MM_DTYPES and ta.dtype == tb.dtype and tb.shape[1].is_static
            and tb.shape[0].is_static)


def lower_hand_matmul(sb: StepBuilder, x, w, bias, out) -> None:
    dt = MM_DTYPES[x.type.dtype]
    M, N, K = x.type.shape[0], int(w.type.shape[0]), int(w.type.shape[1])
    drop = () if K % 16 == 0 else ("K",)
    decode, prefill = mm.aot_specs(dt, has_bias=bias is not None)
    args = [sb.ptr(x), sb.ptr(w), sb.ptr(bias if bias is not None else x), sb.ptr(out),
            e(M), N, K]
    for spec, cond, cfg in ((decode, f"{e(M)} <= 64", mm.CONFIGS["decode"]),
                            (prefill, None, mm.CONFIGS["prefill"])):
        key = sb.kernel(spec, drop_divisibility=drop)
        with sb.when(cond):
            sb.launch(key, [f"cdiv({e(M)}, {cfg[0]}) * cdiv({N}, {cfg[1]})"], args)


@register_lowering("fused_qkv_matmul", "cuda")
def _fused_qkv(sb: StepBuilder, node) -> None:
    x, w = node.operands[:2]
    bias = node.operands[2] if len(node.operands) == 3 else None
    if not hand_matmul_ok(x, w):
        raise ValueError(f"gir.fused_qkv_matmul on cuda needs float16/bfloat16/float32 x and "
                         f"a static wqkv of the same dtype, got {x.type} and {w.type}")
    lower_hand_matmul(sb, x, w, bias, node.results[0])


@register_lowering("matmul", "cuda")
def _matmul(sb: StepBuilder, node) -> None:
    a, b = node.operands
    ta, tb = bool(node.attrs.get("transpose_a")), bool(node.attrs.get("transpose_b"))
    if hand_matmul_ok(a, b, ta, tb):
        lower_hand_matmul(sb, a, b, None, node.results[0])
        return
    from .lowerings_reduce import lower_generic_matmul

    lower_generic_matmul(sb, node)


@register_lowering("rms_norm", "cuda")
def _rms_norm(sb: StepBuilder, node) -> None:
    x, w = node.operands
    D = static_int(x.type.shape[-1], "the normalized axis of gir.rms_norm")
    if node.attrs.get("weight_offset") or x.type.dtype not in MM_DTYPES \
            or w.type.dtype not in MM_DTYPES:
        from .lowerings_reduce import lower_row_norm

        lower_row_norm(sb, node)
        return
    (spec,) = rn.aot_specs(D, MM_DTYPES[x.type.dtype], MM_DTYPES[w.type.dtype])
    key = sb.kernel(spec)
    R = e(numel(x.type.shape[:-1]))
    br = spec.constexprs["BLOCK_R"]
    sb.launch(key, [f"cdiv({R}, {br})"],
              [sb.ptr(x), sb.ptr(w), sb.ptr(node.results[0]), R, D, D, D,
               float(node.attrs["epsilon"])])


def _cache_dims(blocks, op: str) -> tuple[int, int, int]:
    shape = blocks.type.shape
    page = static_int(shape[3], f"page_size of the blocks of gir.{op}")
    nkv = static_int(shape[4], f"n_kv_heads of the blocks of gir.{op}")
    d = static_int(shape[5], f"head_dim of the blocks of gir.{op}")
    return page, nkv, d


@register_lowering("rope_split_store", "cuda")
def _rope_split_store(sb: StepBuilder, node) -> None:
    qkv, freqs, offs, clen, lut, blocks = node.operands[:6]
    a = node.attrs
    nh, nkv, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    _pow2_head_dim(d, node.op)
    page, _, _ = _cache_dims(blocks, node.op)
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
            e(blocks.type.shape[2]), float(a.get("qk_norm_eps", 1e-6))]
    for spec, cond in zip(specs, (f"{T} <= 1024", None)):
        key = sb.kernel(spec)
        bt = spec.constexprs["BLOCK_T"]
        with sb.when(cond):
            sb.launch(key, [f"cdiv({T}, {bt})"], args)


@register_lowering("flash_attention_ragged", "cuda")
def _flash_attention(sb: StepBuilder, node) -> None:
    q, blocks, offs, clen, lut = node.operands[:5]
    a = node.attrs
    nh, nkv, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    _pow2_head_dim(d, node.op, 16)
    page, _, _ = _cache_dims(blocks, node.op)
    dt = q.type.dtype
    if dt not in MM_DTYPES or blocks.type.dtype != dt:
        raise ValueError(f"gir.flash_attention_ragged on cuda needs q and blocks of one float "
                         f"dtype, got {dt.short} and {blocks.type.dtype.short}")
    mask = a["mask"].upper()
    window = int(a.get("window") or 1)
    T, batch = e(q.type.shape[0]), e(offs.type.shape[0] - 1)
    out = node.results[0]
    seqmax = sb.seq_max(sb.vid(offs))
    kvmax = sb.kv_max(sb.vid(offs), sb.vid(clen))
    common = [sb.ptr(q), sb.ptr(offs), sb.ptr(clen), sb.ptr(lut), sb.ptr(blocks)]
    tail = [e(lut.type.shape[1]), a["layer"], e(blocks.type.shape[2]), window,
            float(a["scale"])]

    partial, reduce = pd.aot_specs(nh, nkv, d, page, MM_DTYPES[dt], mask)
    bn = partial.constexprs["BLOCK_N"]
    sb.let("kv_len", f"cdiv(max({kvmax}, 1), {DECODE_KV_BUCKET}) * {DECODE_KV_BUCKET}")
    # kernels/paged_decode.partition(batch, nkv, kv_len), written as data.
    sb.let("want", f"max(1, cdiv(2 * {pd.NUM_SMS}, max({batch} * {nkv}, 1)))")
    sb.let("part0", "max(cdiv(kv_len, want), min(256, kv_len))")
    sb.let("part_size", f"cdiv(part0, {bn}) * {bn}")
    sb.let("num_parts", "cdiv(kv_len, part_size)")
    with sb.when(f"{seqmax} <= 1"):
        o_part = sb.scratch("o_part", "float32", f"{T} * {nh} * num_parts * {d}")
        ml_part = sb.scratch("ml_part", "float32", f"{T} * {nh} * num_parts * 2")
        kp = sb.kernel(partial)
        sb.launch(kp, [batch, nkv, "num_parts"],
                  common + [o_part, ml_part] + tail + ["part_size", "num_parts"])
        kr = sb.kernel(reduce)
        sb.launch(kr, [f"{T} * {nh}"], [o_part, ml_part, sb.ptr(out), "num_parts"])
    (spec,) = fa.aot_specs(nh, nkv, d, page, MM_DTYPES[dt], mask)
    bm = spec.constexprs["BLOCK_M"]
    with sb.when(None):
        kf = sb.kernel(spec)
        sb.launch(kf, [f"max(1, cdiv({seqmax}, {bm}))", nh, batch],
                  common[:5] + [sb.ptr(out)] + tail)

