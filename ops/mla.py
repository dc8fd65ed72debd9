"""Multi-head latent attention kernel ops: mla_cache_store, mla_prefill, mla_decode,
mla_attention (one of the two forms per batch) and mla_prefill_plan (references in
ops.mla_math).

The latent cache is a buffer ``[pages, 1 or 2, layers, page_size, 1, kv_lora_rank + rope]``;
ragged metadata as in ops.attention. ``q`` is ``[T, NH * (nope + rope)]`` with each head laid
out ``[nope | rope]`` and its rope part already rotated; the outputs are ``[T, NH * v_head_dim]``.
"""
from __future__ import annotations

import numpy as np

from graphir.dtype import DType
from graphir.opdef import OpDef, register
from graphir.types import BufferType, TensorType

from . import _rules as R
from . import mla_math as mm
from ._build import apply, tensors
from .attention import (_buffer, _check_rows, _pos_int, _ragged_meta, _rows, default_scale,
                        layer_index)


def _latent_blocks(b, attrs, width: int):
    if not isinstance(b, BufferType):
        raise ValueError(f"blocks must be a latent cache buffer [pages, 1 or 2, layers, "
                         f"page_size, 1, {width}], got {b}")
    kinds = b.shape[1] if b.rank == 6 else None
    if b.rank != 6 or not (kinds.is_static and int(kinds) in (1, 2)) or b.shape[4] != 1 \
            or b.shape[5] != width:
        raise ValueError(f"blocks must be [pages, 1 or 2, layers, page_size, 1, {width}] (one "
                         f"latent head of kv_lora_rank + qk_rope_head_dim), got {R.fmt(b.shape)}")
    if not b.dtype.is_float:
        raise ValueError(f"blocks must be float, got {b.dtype.short}")
    layer = attrs.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"attribute layer must be an int >= 0, got {layer!r}")
    if b.shape[2].is_static and layer >= int(b.shape[2]):
        raise ValueError(f"layer {layer} is out of range for blocks with {b.shape[2]} layers")


def _weight(t, shape, what: str, dtype):
    R.tensor(t, what)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} must be {R.fmt(shape)}, got {R.fmt(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{what} dtype {t.dtype.short} differs from q's {dtype.short}")


def _dims(attrs):
    names = ("n_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    nh, nope, rope, v, r = (_pos_int(attrs, k) for k in names)
    if rope % 2:
        raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {rope}")
    if not isinstance(attrs.get("scale"), float):
        raise ValueError(f"attribute scale must be a float, got {attrs.get('scale')!r}")
    return nh, nope, rope, v, r


# -- mla_cache_store ---------------------------------------------------------------------------
def _store_rule(ins, attrs):
    if len(ins) != 7:
        raise ValueError(f"mla_cache_store takes kv_latent, norm_weight, freqs_cis, "
                         f"input_row_offsets, cache_lengths, lookup_table, blocks, got "
                         f"{len(ins)} operands")
    kv, w, f, offs, clen, lut, b = ins
    r, rope = _pos_int(attrs, "kv_lora_rank"), _pos_int(attrs, "qk_rope_head_dim")
    if rope % 2:
        raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {rope}")
    _rows(kv, r + rope, "kv_latent")
    _weight(w, [r], "kv norm weight", kv.dtype)
    R.tensor(f, "freqs_cis")
    if f.rank != 2 or f.shape[1] != rope or not f.dtype.is_float:
        raise ValueError(f"freqs_cis must be float [max_positions, {rope}], got {f}")
    _latent_blocks(b, attrs, r + rope)
    R.same_device([kv, w, f, b])
    _ragged_meta(offs, clen, lut)
    if not isinstance(attrs.get("interleaved"), bool):
        raise ValueError(f"attribute interleaved must be a bool, got {attrs.get('interleaved')!r}")
    if not isinstance(attrs.get("eps"), float):
        raise ValueError(f"attribute eps must be a float, got {attrs.get('eps')!r}")
    return []


def _store_ref(ins, a):
    kv, w, f, offs, clen, lut, b = ins
    _check_rows(offs, kv.shape[0], "mla_cache_store")
    return [mm.mla_cache_store(b, kv, w, f, offs, clen, lut, layer_idx=a["layer"],
                               kv_lora_rank=a["kv_lora_rank"], interleaved=a["interleaved"],
                               eps=a["eps"])]


# -- mla_prefill / mla_decode / mla_attention -------------------------------------------------
_W1 = {"mla_prefill": "w_k", "mla_decode": "w_uk", "mla_attention": "w_uk"}


def _plan_operands(meta, offs, clen, op: str) -> None:
    """Types of the prefill metadata (mla_prefill_plan's results) taken as operands 7-9."""
    rows, starts, total = meta
    for what, t, want_dt, shape in (("buffer_row_offsets", rows, DType.uint32, offs.shape),
                                    ("cache_offsets", starts, DType.uint32, clen.shape),
                                    ("buffer_lengths", total, DType.int32, [1])):
        R.tensor(t, what)
        if t.dtype != want_dt or list(t.shape) != list(shape):
            raise ValueError(f"{op}: prefill metadata {what} must be {want_dt.short} "
                             f"{R.fmt(shape)} (ops.mla_prefill_plan), got {t}")


def _attn_rule(op: str):
    def rule(ins, attrs):
        with_plan = op != "mla_decode"
        if len(ins) != 7 and not (with_plan and len(ins) == 10):
            plan = " [, buffer_row_offsets, cache_offsets, buffer_lengths]" if with_plan else ""
            raise ValueError(f"{op} takes q, blocks, input_row_offsets, cache_lengths, "
                             f"lookup_table, {_W1[op]}, w_uv{plan}, got {len(ins)} operands")
        q, b, offs, clen, lut, wk, wuv = ins[:7]
        nh, nope, rope, v, r = _dims(attrs)
        _rows(q, nh * (nope + rope), "q")
        _latent_blocks(b, attrs, r + rope)
        if op == "mla_prefill":
            _weight(wk, [nh * nope, r], "w_k", q.dtype)
        else:
            _weight(wk, [nh, nope, r], "w_uk", q.dtype)
        if with_plan:
            _pos_int(attrs, "buffer_size")
        if op == "mla_attention":
            _pos_int(attrs, "absorb_max")
        _weight(wuv, [nh, r, v], "w_uv", q.dtype)
        R.same_device([q, b, wk, wuv])
        _ragged_meta(offs, clen, lut)
        if len(ins) == 10:
            _plan_operands(ins[7:], offs, clen, op)
        return [R.like(q, shape=[q.shape[0], nh * v])]
    return rule


def _attn_ref(op: str):
    def ref(ins, a):
        q, b, offs, clen, lut, wk, wuv = ins[:7]
        nh = a["n_heads"]
        _check_rows(offs, q.shape[0], op)
        q3 = q.reshape(q.shape[0], nh, q.shape[1] // nh)
        kw = dict(layer_idx=a["layer"], input_row_offsets=offs, cache_lengths=clen,
                  lookup_table=lut, qk_rope_head_dim=a["qk_rope_head_dim"], scale=a["scale"])
        rows = None
        if len(ins) == 10:
            mm.check_prefill_metadata(offs, clen, *ins[7:], op)
            rows = ins[7]
        if op == "mla_prefill":
            out = mm.mla_prefill(q3, b, wk, wuv, buffer_size=a["buffer_size"],
                                 buffer_row_offsets=rows, **kw)
        elif op == "mla_decode":
            out = mm.mla_decode(q3, b, wk, wuv, **kw)
        else:
            out = mm.mla_attention(q3, b, wk, wuv, absorb_max=a["absorb_max"],
                                   buffer_size=a["buffer_size"], buffer_row_offsets=rows, **kw)
        return [out.reshape(q.shape[0], -1)]
    return ref


# -- mla_prefill_plan --------------------------------------------------------------------------
def _plan_rule(ins, attrs):
    if len(ins) != 2:
        raise ValueError(f"mla_prefill_plan takes input_row_offsets, cache_lengths, got "
                         f"{len(ins)} operands")
    offs, clen = ins
    _ragged_meta(offs, clen)
    return [TensorType(DType.uint32, offs.shape, offs.device),
            TensorType(DType.uint32, clen.shape, clen.device),
            TensorType(DType.int32, [1], offs.device)]


def _plan_ref(ins, a):
    return list(mm.mla_prefill_plan(ins[0], ins[1]))


_ATTN_ATTRS = ("n_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank",
               "layer", "scale")
register(OpDef("mla_cache_store", _store_rule, _store_ref, effects=True, writes=(6,),
               attr_names=("kv_lora_rank", "qk_rope_head_dim", "layer", "interleaved", "eps")))
register(OpDef("mla_prefill", _attn_rule("mla_prefill"), _attn_ref("mla_prefill"), effects=True,
               attr_names=_ATTN_ATTRS + ("buffer_size",)))
register(OpDef("mla_decode", _attn_rule("mla_decode"), _attn_ref("mla_decode"), effects=True,
               attr_names=_ATTN_ATTRS))
register(OpDef("mla_attention", _attn_rule("mla_attention"), _attn_ref("mla_attention"),
               effects=True, attr_names=_ATTN_ATTRS + ("buffer_size", "absorb_max")))
register(OpDef("mla_prefill_plan", _plan_rule, _plan_ref))


# -- builders ----------------------------------------------------------------------------------
def mla_cache_store(kv_latent, norm_weight, freqs_cis, input_row_offsets, cache_lengths,
                    lookup_table, kv_blocks, *, kv_lora_rank: int, qk_rope_head_dim: int,
                    layer_idx, interleaved: bool = True, eps: float = 1e-6) -> None:
    """Store ``[rms_norm(c_kv) * norm_weight | rope(k_pe)]`` of kv_latent [T, R + rope] (the kv_a
    projection) into layer `layer_idx` of the latent cache.

    Example:
        >>> ops.mla_cache_store(kv, w, freqs, offs, clen, lut, blocks, kv_lora_rank=512,
        ...                     qk_rope_head_dim=64, layer_idx=0)
    """
    kv, w, f = tensors(kv_latent, norm_weight, freqs_cis)
    offs, clen, lut = tensors(input_row_offsets, cache_lengths, lookup_table)
    apply("mla_cache_store", [kv, w, f, offs, clen, lut, _buffer(kv_blocks)],
          kv_lora_rank=int(kv_lora_rank), qk_rope_head_dim=int(qk_rope_head_dim),
          layer=layer_index(layer_idx), interleaved=bool(interleaved), eps=float(eps))


def _metadata(prefill_metadata) -> list:
    """The three prefill-plan values of an MLAPrefillMetadata (or a 3-sequence), or []."""
    if prefill_metadata is None:
        return []
    if hasattr(prefill_metadata, "buffer_row_offsets"):
        m = prefill_metadata
        prefill_metadata = (m.buffer_row_offsets, m.cache_offsets, m.buffer_lengths)
    if not isinstance(prefill_metadata, (list, tuple)) or len(prefill_metadata) != 3:
        raise ValueError(f"prefill_metadata must be an MLAPrefillMetadata or (buffer_row_offsets, "
                         f"cache_offsets, buffer_lengths), got {prefill_metadata!r}")
    return list(tensors(*prefill_metadata))


def _buffer_size(op: str, buffer_size) -> int:
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, np.integer)) \
            or buffer_size <= 0:
        raise ValueError(f"{op}: buffer_size must be a positive int, got {buffer_size!r}")
    return int(buffer_size)


def _attention(op, q, kv_blocks, offs, clen, lut, w1, w_uv, *, n_heads, qk_nope_head_dim,
               qk_rope_head_dim, v_head_dim, kv_lora_rank, layer_idx, scale, metadata=(),
               **extra):
    q, w1, w_uv = tensors(q, w1, w_uv)
    offs, clen, lut = tensors(offs, clen, lut)
    if scale is None:
        scale = default_scale(op, qk_nope_head_dim=qk_nope_head_dim,
                              qk_rope_head_dim=qk_rope_head_dim)
    return apply(op, [q, _buffer(kv_blocks), offs, clen, lut, w1, w_uv] + list(metadata),
                 n_heads=int(n_heads),
                 qk_nope_head_dim=int(qk_nope_head_dim), qk_rope_head_dim=int(qk_rope_head_dim),
                 v_head_dim=int(v_head_dim), kv_lora_rank=int(kv_lora_rank),
                 layer=layer_index(layer_idx), scale=float(scale), **extra)


def mla_prefill(q, kv_blocks, input_row_offsets, cache_lengths, lookup_table, w_k, w_uv, *,
                n_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                kv_lora_rank: int, layer_idx, scale: float | None = None,
                buffer_size: int = 16384, prefill_metadata=None):
    """Causal attention of the roped q [T, NH*(nope+rope)] over K/V decompressed from the latent
    cache (K nope via w_k [NH*nope, R], V via w_uv [NH, R, v], k_pe shared by every head), at most
    `buffer_size` tokens decompressed at a time. `prefill_metadata` (the layer's
    create_mla_prefill_metadata, i.e. ops.mla_prefill_plan) lays the buffers over the whole
    batch's K/V rows, as MAX's kernels do. Returns [T, NH*v].

    Example:
        >>> o = ops.mla_prefill(q, blocks, offs, clen, lut, w_k, w_uv, n_heads=16,
        ...                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ...                     kv_lora_rank=512, layer_idx=0)
    """
    return _attention("mla_prefill", q, kv_blocks, input_row_offsets, cache_lengths,
                      lookup_table, w_k, w_uv, n_heads=n_heads, qk_nope_head_dim=qk_nope_head_dim,
                      qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
                      kv_lora_rank=kv_lora_rank, layer_idx=layer_idx, scale=scale,
                      metadata=_metadata(prefill_metadata),
                      buffer_size=_buffer_size("mla_prefill", buffer_size))


def mla_decode(q, kv_blocks, input_row_offsets, cache_lengths, lookup_table, w_uk, w_uv, *,
               n_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
               kv_lora_rank: int, layer_idx, scale: float | None = None):
    """Absorbed MLA: q_nope @ w_uk [NH, nope, R] into latent space, concat q_rope, causal
    attention over the latent cache rows (values: their first R columns), then @ w_uv
    [NH, R, v]. Returns [T, NH*v].

    Example:
        >>> o = ops.mla_decode(q, blocks, offs, clen, lut, w_uk, w_uv, n_heads=16,
        ...                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ...                    kv_lora_rank=512, layer_idx=0)
    """
    return _attention("mla_decode", q, kv_blocks, input_row_offsets, cache_lengths,
                      lookup_table, w_uk, w_uv, n_heads=n_heads, qk_nope_head_dim=qk_nope_head_dim,
                      qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
                      kv_lora_rank=kv_lora_rank, layer_idx=layer_idx, scale=scale)


def mla_attention(q, kv_blocks, input_row_offsets, cache_lengths, lookup_table, w_uk, w_uv, *,
                  n_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                  kv_lora_rank: int, layer_idx, scale: float | None = None,
                  buffer_size: int = 16384, absorb_max: int = 1, prefill_metadata=None):
    """MLA whatever the batch (LatentAttentionWithRope's graph_mode "auto"): one op computing
    one form per call, picked from the batch's most new tokens per sequence: the absorbed
    form (as mla_decode) while no sequence brings more than `absorb_max`, else the decompressed
    one (as mla_prefill, w_k being w_uk's rows [NH*nope, R], with `buffer_size` and
    `prefill_metadata`). Returns [T, NH*v].

    Example:
        >>> o = ops.mla_attention(q, blocks, offs, clen, lut, w_uk, w_uv, n_heads=16,
        ...                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ...                       kv_lora_rank=512, layer_idx=0)
    """
    if isinstance(absorb_max, bool) or not isinstance(absorb_max, (int, np.integer)) \
            or absorb_max <= 0:
        raise ValueError(f"mla_attention: absorb_max must be a positive int, got {absorb_max!r}")
    return _attention("mla_attention", q, kv_blocks, input_row_offsets, cache_lengths,
                      lookup_table, w_uk, w_uv, n_heads=n_heads,
                      qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                      v_head_dim=v_head_dim, kv_lora_rank=kv_lora_rank, layer_idx=layer_idx,
                      scale=scale, metadata=_metadata(prefill_metadata),
                      buffer_size=_buffer_size("mla_attention", buffer_size),
                      absorb_max=int(absorb_max))


def mla_prefill_plan(input_row_offsets, cache_lengths) -> list:
    """[buffer_row_offsets u32 [batch+1], cache_offsets u32 [batch], buffer_lengths i32 [1]]:
    where each sequence's decompressed cached + new K/V rows sit in the prefill buffer.

    Example:
        >>> rows, starts, total = ops.mla_prefill_plan(offs, clen)
    """
    offs, clen = tensors(input_row_offsets, cache_lengths)
    return apply("mla_prefill_plan", [offs, clen])
