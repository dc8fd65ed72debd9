"""CUDA lowering of flash_attention_ragged: the split-K paged decode kernels when every sequence
has at most one new token, the ragged flash kernel otherwise (decided per call from the offsets).
"""
from __future__ import annotations

from dataclasses import dataclass

from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import paged_decode as pd

from .base import StepBuilder, e
from .common import MM_DTYPES, cache_dims, pow2_head_dim

DECODE_KV_BUCKET = 256   # decode launch sizes change every 256 tokens: CUDA graphs replay between


@dataclass(frozen=True)
class AttentionCall:
    """What both attention paths need: the node's operands as plan arguments and its sizes."""

    nh: int
    nkv: int
    d: int
    page: int
    dtype: str
    mask: str
    T: str          # expression: total new tokens
    batch: str      # expression: sequences in the batch
    seqmax: str     # runtime fact: the most new tokens of any sequence
    kvmax: str      # runtime fact: the longest cache + new tokens
    common: list    # q, offsets, cache lengths, lookup table, blocks
    tail: list      # max_pages, layer, num_layers, window, scale
    out: object


@register_lowering("flash_attention_ragged", "cuda")
def _flash_attention(sb: StepBuilder, node) -> None:
    q, blocks, offs, clen, lut = node.operands[:5]
    a = node.attrs
    nh, nkv, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    pow2_head_dim(d, node.op, 16)
    page, _, _ = cache_dims(blocks, node.op)
    dt = q.type.dtype
    if dt not in MM_DTYPES or blocks.type.dtype != dt:
        raise ValueError(f"gir.flash_attention_ragged on cuda needs q and blocks of one float "
                         f"dtype, got {dt.short} and {blocks.type.dtype.short}")
    window = int(a.get("window") or 1)
    call = AttentionCall(
        nh=nh, nkv=nkv, d=d, page=page, dtype=MM_DTYPES[dt], mask=a["mask"].upper(),
        T=e(q.type.shape[0]), batch=e(offs.type.shape[0] - 1),
        seqmax=sb.seq_max(sb.vid(offs)), kvmax=sb.kv_max(sb.vid(offs), sb.vid(clen)),
        common=[sb.ptr(q), sb.ptr(offs), sb.ptr(clen), sb.ptr(lut), sb.ptr(blocks)],
        tail=[e(lut.type.shape[1]), a["layer"], e(blocks.type.shape[2]), window,
              float(a["scale"])],
        out=node.results[0])
    with sb.when(f"{call.seqmax} <= 1"):
        lower_decode(sb, call)
    with sb.when(None):
        lower_prefill(sb, call)


def lower_decode(sb: StepBuilder, c: AttentionCall) -> None:
    """Every sequence has at most one new token: split-K partials, then a reduce."""
    partial, reduce = pd.aot_specs(c.nh, c.nkv, c.d, c.page, c.dtype, c.mask)
    bn = partial.constexprs["BLOCK_N"]
    sb.let("kv_len", f"cdiv(max({c.kvmax}, 1), {DECODE_KV_BUCKET}) * {DECODE_KV_BUCKET}")
    # kernels/paged_decode.partition(batch, nkv, kv_len), written as data.
    sb.let("want", f"max(1, cdiv(2 * {pd.NUM_SMS}, max({c.batch} * {c.nkv}, 1)))")
    sb.let("part0", "max(cdiv(kv_len, want), min(256, kv_len))")
    sb.let("part_size", f"cdiv(part0, {bn}) * {bn}")
    sb.let("num_parts", "cdiv(kv_len, part_size)")
    o_part = sb.scratch("o_part", "float32", f"{c.T} * {c.nh} * num_parts * {c.d}")
    ml_part = sb.scratch("ml_part", "float32", f"{c.T} * {c.nh} * num_parts * 2")
    kp = sb.kernel(partial)
    sb.launch(kp, [c.batch, c.nkv, "num_parts"],
              c.common + [o_part, ml_part] + c.tail + ["part_size", "num_parts"])
    kr = sb.kernel(reduce)
    sb.launch(kr, [f"{c.T} * {c.nh}"], [o_part, ml_part, sb.ptr(c.out), "num_parts"])


def lower_prefill(sb: StepBuilder, c: AttentionCall) -> None:
    """Ragged prefill (and chunked prefill over a cached prefix): the flash kernel."""
    (spec,) = fa.aot_specs(c.nh, c.nkv, c.d, c.page, c.dtype, c.mask)
    bm = spec.constexprs["BLOCK_M"]
    kf = sb.kernel(spec)
    sb.launch(kf, [f"max(1, cdiv({c.seqmax}, {bm}))", c.nh, c.batch],
              c.common + [sb.ptr(c.out)] + c.tail)
