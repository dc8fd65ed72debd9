"""The attention kernel ops: fused_qkv_matmul, rope, kv_cache_store, rope_split_store and
flash_attention_ragged (the graph forms of /work/helpers/KERNEL_OPS.md).

Ragged batches: rows of all sequences are packed; `input_row_offsets` (u32 [batch+1]) are prefix
sums, `cache_lengths` (u32 [batch]) the tokens already cached per sequence, `lookup_table`
(u32 [batch, max_pages]) the page ids. The paged cache is a buffer
`[pages, 2, layers, page_size, n_kv_heads, head_dim]`. References wrap ops.attention_math.
"""
from __future__ import annotations

import numpy as np

from graphir.dtype import round_to

from graphir.dim import Dim
from graphir.opdef import OpDef, register
from graphir.types import BufferType
from graphir.value import BufferValue, TensorValue

from . import _rules as R
from . import attention_math as am
from . import rope_math as rm
from ._build import apply, tensors

MASK_VARIANTS = am.MASK_VARIANTS
_WINDOWED = ("sliding_window_causal", "sliding_window_noncausal", "chunked_causal")
_META_DTYPES = ("u32", "i32", "i64")


# -- attribute helpers -----------------------------------------------------------------------
def layer_index(layer_idx) -> int:
    """The static layer index of an int or a TensorValue made by gir.constant."""
    if isinstance(layer_idx, (bool, np.bool_)):
        raise ValueError(f"layer_idx must be an int or a constant tensor, got {layer_idx!r}")
    if isinstance(layer_idx, (int, np.integer)):
        if layer_idx < 0:
            raise ValueError(f"layer_idx must be >= 0, got {layer_idx}")
        return int(layer_idx)
    if isinstance(layer_idx, TensorValue) and layer_idx.node is not None \
            and layer_idx.node.op == "constant":
        value = np.asarray(layer_idx.node.attrs["value"])
        if value.size == 1 and value.dtype.kind in "iu":
            return layer_index(int(value.reshape(())))
    raise ValueError(f"layer_idx must be an int or a scalar integer tensor made by "
                     f"ops.constant, got {layer_idx!r}")


def default_scale(op: str, **dims) -> float:
    """1 / sqrt(the sum of the head dims `dims`), the scale when none is given; a dim that is not
    a positive int is refused here by name (before numpy would warn on its square root)."""
    for name, d in dims.items():
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d <= 0:
            raise ValueError(f"{op}: {name} must be a positive int, got {d!r}")
    return 1.0 / float(np.sqrt(sum(int(d) for d in dims.values())))


def mask_name(mask_variant) -> str:
    """Normalize a mask variant (MHAMaskVariant member or string) to its attribute string."""
    v = getattr(mask_variant, "value", mask_variant)
    name = v.lower().removesuffix("_mask") if isinstance(v, str) else None
    if name not in MASK_VARIANTS:
        raise ValueError(f"unknown mask variant {mask_variant!r}; expected one of "
                         f"{list(MASK_VARIANTS)}")
    return name


# -- type-rule pieces ------------------------------------------------------------------------
def _meta(t, what: str, rank: int):
    R.tensor(t, what)
    if t.rank != rank or t.dtype.short not in _META_DTYPES:
        raise ValueError(f"{what} must be an integer (u32) tensor of rank {rank}, got {t}")
    return t


def _differ(a, b) -> bool:
    diff = a - b
    return diff.is_static and int(diff) != 0


def _ragged_meta(offs, clen, lut=None):
    _meta(offs, "input_row_offsets", 1)
    _meta(clen, "cache_lengths", 1)
    # Symbolic batch dims of different names may still agree at run time (the reference checks).
    if _differ(offs.shape[0], clen.shape[0] + 1):
        raise ValueError(f"input_row_offsets {R.fmt(offs.shape)} must be [batch + 1] for "
                         f"cache_lengths {R.fmt(clen.shape)}")
    if lut is not None:
        _meta(lut, "lookup_table", 2)
        if _differ(lut.shape[0], clen.shape[0]):
            raise ValueError(f"lookup_table {R.fmt(lut.shape)} must be [batch, max_pages] for "
                             f"cache_lengths {R.fmt(clen.shape)}")


def _pos_int(attrs, key) -> int:
    v = attrs.get(key)
    if isinstance(v, Dim) and v.is_static:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"attribute {key} must be a positive int, got {v!r}")
    return int(v)


def _rows(x, width, what: str):
    R.tensor(x, what)
    if x.rank != 2 or x.shape[1] != width:
        raise ValueError(f"{what} must be [tokens, {width}], got {R.fmt(x.shape)}")
    if not x.dtype.is_float:
        raise ValueError(f"{what} must be float, got {x.dtype.short}")


def _blocks(b, attrs, nkv=None, d=None):
    if not isinstance(b, BufferType):
        raise ValueError(f"blocks must be a buffer [pages, 2, layers, page_size, n_kv_heads, "
                         f"head_dim], got {b}")
    if b.rank != 6 or b.shape[1] != 2:
        raise ValueError(f"blocks must be [pages, 2, layers, page_size, n_kv_heads, head_dim], "
                         f"got {R.fmt(b.shape)}")
    if nkv is not None and (b.shape[4] != nkv or b.shape[5] != d):
        raise ValueError(f"blocks {R.fmt(b.shape)} hold [n_kv_heads, head_dim] = "
                         f"[{b.shape[4]}, {b.shape[5]}], the op says [{nkv}, {d}]")
    layer = attrs.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"attribute layer must be an int >= 0, got {layer!r}")
    if b.shape[2].is_static and layer >= int(b.shape[2]):
        raise ValueError(f"layer {layer} is out of range for blocks with {b.shape[2]} layers")


def _heads(attrs):
    nh, nkv, d = (_pos_int(attrs, k) for k in ("n_heads", "n_kv_heads", "head_dim"))
    if nh % nkv:
        raise ValueError(f"n_heads {nh} is not a multiple of n_kv_heads {nkv}")
    return nh, nkv, d


# -- fused_qkv_matmul ------------------------------------------------------------------------
def _qkv_rule(ins, attrs):
    if len(ins) not in (2, 3):
        raise ValueError(f"fused_qkv_matmul takes x, wqkv [, bias], got {len(ins)} operands")
    x, w = R.tensor(ins[0], "x"), R.tensor(ins[1], "wqkv")
    if x.rank != 2 or w.rank != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [tokens, hidden] and wqkv [out, hidden], got x "
                         f"{R.fmt(x.shape)} and wqkv {R.fmt(w.shape)}")
    ts = [x, w]
    if len(ins) == 3:
        b = R.tensor(ins[2], "bias")
        if b.rank != 1 or b.shape[0] != w.shape[0]:
            raise ValueError(f"bias must be [{w.shape[0]}] for wqkv {R.fmt(w.shape)}, got "
                             f"{R.fmt(b.shape)}")
        ts.append(b)
    dt, dev = R.same_dtype(ts), R.same_device(ts)
    if not dt.is_float:
        raise ValueError(f"fused_qkv_matmul needs float operands, got {dt.short}")
    return [R.like(x, shape=[x.shape[0], w.shape[0]], device=dev)]


def _qkv_ref(ins, a):
    out = ins[0] @ ins[1].T
    return [out + ins[2] if len(ins) == 3 else out]


# -- rope --------------------------------------------------------------------------------------
def _rope_rule(ins, attrs):
    if len(ins) != 4:
        raise ValueError(f"rope takes x, freqs_cis, input_row_offsets, cache_lengths, got "
                         f"{len(ins)} operands")
    x, f, offs, clen = ins
    d = _pos_int(attrs, "head_dim")
    R.tensor(x, "x")
    if d % 2 or x.rank != 2 or not x.shape[1].divides_by(d):
        raise ValueError(f"x must be [tokens, heads * {d}] with an even head_dim, got "
                         f"{R.fmt(x.shape)}")
    R.tensor(f, "freqs_cis")
    if f.rank != 2 or f.shape[1] != d:
        raise ValueError(f"freqs_cis must be [max_positions, {d}], got {R.fmt(f.shape)}")
    if not x.dtype.is_float or not f.dtype.is_float:
        raise ValueError(f"x and freqs_cis must be float, got {x.dtype.short}, {f.dtype.short}")
    R.same_device([x, f])
    _ragged_meta(offs, clen)
    if not isinstance(attrs.get("interleaved"), bool):
        raise ValueError(f"attribute interleaved must be a bool, got {attrs.get('interleaved')!r}")
    return [R.like(x)]


def _check_rows(offs, t, op):
    if int(np.asarray(offs)[-1]) != t:
        raise ValueError(f"{op}: input_row_offsets[-1] = {int(np.asarray(offs)[-1])} but the "
                         f"input has {t} rows")


def _rope_ref(ins, a):
    x, f, offs, clen = ins
    d = a["head_dim"]
    _check_rows(offs, x.shape[0], "rope")
    _, pos = am.token_positions(offs, clen)
    out = rm.apply_rope(x.reshape(x.shape[0], x.shape[1] // d, d), f, pos,
                        interleaved=a["interleaved"])
    return [out.reshape(x.shape)]


# -- kv_cache_store ----------------------------------------------------------------------------
def _store_rule(ins, attrs):
    if len(ins) != 5:
        raise ValueError(f"kv_cache_store takes x, blocks, input_row_offsets, cache_lengths, "
                         f"lookup_table, got {len(ins)} operands")
    x, b, offs, clen, lut = ins
    _blocks(b, attrs)
    if attrs.get("kind") not in (0, 1):
        raise ValueError(f"attribute kind must be 0 (K) or 1 (V), got {attrs.get('kind')!r}")
    _rows(x, b.shape[4] * b.shape[5], "x")
    R.same_device([x, b])
    _ragged_meta(offs, clen, lut)
    return []


def _store_ref(ins, a):
    x, b, offs, clen, lut = ins
    _check_rows(offs, x.shape[0], "kv_cache_store")
    vals = x.reshape(x.shape[0], b.shape[4], b.shape[5])
    return [am.kv_cache_store(b, vals, a["kind"], a["layer"], offs, clen, lut)]


# -- rope_split_store --------------------------------------------------------------------------
def _rss_rule(ins, attrs):
    if len(ins) not in (6, 8):
        raise ValueError(f"rope_split_store takes qkv, freqs_cis, input_row_offsets, "
                         f"cache_lengths, lookup_table, blocks [, q_norm_w, k_norm_w], got "
                         f"{len(ins)} operands")
    qkv, f, offs, clen, lut, b = ins[:6]
    nh, nkv, d = _heads(attrs)
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    _rows(qkv, (nh + 2 * nkv) * d, "qkv")
    R.tensor(f, "freqs_cis")
    if f.rank != 2 or f.shape[1] != d:
        raise ValueError(f"freqs_cis must be [max_positions, {d}], got {R.fmt(f.shape)}")
    _blocks(b, attrs, nkv, d)
    R.same_device([qkv, f, b])
    _ragged_meta(offs, clen, lut)
    if not isinstance(attrs.get("interleaved"), bool):
        raise ValueError(f"attribute interleaved must be a bool, got {attrs.get('interleaved')!r}")
    if len(ins) == 8:
        for w, nm in ((ins[6], "q_norm weight"), (ins[7], "k_norm weight")):
            R.tensor(w, nm)
            if w.rank != 1 or w.shape[0] != d:
                raise ValueError(f"{nm} must be [{d}], got {R.fmt(w.shape)}")
        if not isinstance(attrs.get("qk_norm_eps"), float):
            raise ValueError("with q/k norm weights the attribute qk_norm_eps (float) is required")
    return [R.like(qkv, shape=[qkv.shape[0], nh * d])]


def _rss_ref(ins, a):
    qkv, f, offs, clen, lut, b = ins[:6]
    _check_rows(offs, qkv.shape[0], "rope_split_store")
    if len(ins) == 8:
        # Round the normed q/k to qkv's dtype before RoPE, as a kernel holding them in that
        # dtype does; this keeps the fused op bit-identical to norm -> rope done separately.
        nh, nkv, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
        eps = a.get("qk_norm_eps", 1e-6)
        dt = a["_in_types"][0].dtype
        t = qkv.shape[0]
        q = round_to(am.rms_norm_heads(qkv[:, :nh * d].reshape(t, nh, d), ins[6], eps), dt)
        k = round_to(am.rms_norm_heads(qkv[:, nh * d:(nh + nkv) * d].reshape(t, nkv, d), ins[7], eps), dt)
        qkv = np.concatenate([q.reshape(t, nh * d), k.reshape(t, nkv * d), qkv[:, (nh + nkv) * d:]],
                             axis=1)
        qkv = qkv.astype(np.float64)
    q, new = am.rope_split_store(qkv, f, offs, clen, lut, b, layer_idx=a["layer"],
                                 n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"],
                                 head_dim=a["head_dim"], interleaved=a["interleaved"])
    return [q, new]


# -- flash_attention_ragged --------------------------------------------------------------------
def _fa_rule(ins, attrs):
    if len(ins) != 5:
        raise ValueError(f"flash_attention_ragged takes q, blocks, input_row_offsets, "
                         f"cache_lengths, lookup_table, got {len(ins)} operands")
    q, b, offs, clen, lut = ins
    nh, nkv, d = _heads(attrs)
    _rows(q, nh * d, "q")
    _blocks(b, attrs, nkv, d)
    R.same_device([q, b])
    _ragged_meta(offs, clen, lut)
    mask = attrs.get("mask")
    if mask not in MASK_VARIANTS:
        raise ValueError(f"unknown mask {mask!r}; expected one of {list(MASK_VARIANTS)}")
    if mask in _WINDOWED:
        _pos_int(attrs, "window")
    elif attrs.get("window") is not None:
        raise ValueError(f"mask {mask!r} takes no window, got window = {attrs['window']!r}")
    if not isinstance(attrs.get("scale"), float):
        raise ValueError(f"attribute scale must be a float, got {attrs.get('scale')!r}")
    cap = attrs.get("softcap")
    if cap is not None and not (isinstance(cap, float) and cap > 0):
        raise ValueError(f"attribute softcap must be None or a float > 0, got {cap!r}")
    return [R.like(q)]


def _fa_ref(ins, a):
    q, b, offs, clen, lut = ins
    nh, d = a["n_heads"], a["head_dim"]
    out = am.flash_attention_ragged(q.reshape(q.shape[0], nh, d), b, layer_idx=a["layer"],
                                    input_row_offsets=offs, cache_lengths=clen,
                                    lookup_table=lut, mask_variant=a["mask"],
                                    window=a.get("window"), scale=a["scale"],
                                    softcap=a.get("softcap"))
    return [out.reshape(q.shape)]


register(OpDef("fused_qkv_matmul", _qkv_rule, _qkv_ref))
register(OpDef("rope", _rope_rule, _rope_ref, attr_names=("head_dim", "interleaved")))
register(OpDef("kv_cache_store", _store_rule, _store_ref, effects=True, writes=(1,),
               attr_names=("kind", "layer")))
register(OpDef("rope_split_store", _rss_rule, _rss_ref, effects=True, writes=(5,),
               attr_names=("head_dim", "n_heads", "n_kv_heads", "interleaved", "layer",
                           "qk_norm_eps")))
register(OpDef("flash_attention_ragged", _fa_rule, _fa_ref, effects=True,
               attr_names=("head_dim", "n_heads", "n_kv_heads", "layer", "mask", "window",
                           "scale", "softcap")))


# -- builders ----------------------------------------------------------------------------------
def _buffer(b) -> BufferValue:
    if not isinstance(b, BufferValue):
        raise ValueError(f"kv blocks must be a BufferValue (a BufferType graph input), got {b!r}")
    return b


def fused_qkv_matmul(x, wqkv, bias=None) -> TensorValue:
    """qkv = x @ wqkv^T (+ bias): the packed [q | k | v] projection of a ragged batch.

    Example:
        >>> qkv = ops.fused_qkv_matmul(x, wqkv)  # x [T, hidden], wqkv [(NH+2NKV)*D, hidden]
    """
    vals = tensors(x, wqkv) if bias is None else tensors(x, wqkv, bias)
    return apply("fused_qkv_matmul", vals)


def rope(x, freqs_cis, input_row_offsets, cache_lengths, *, head_dim: int,
         interleaved: bool = True) -> TensorValue:
    """RoPE of x [T, H*head_dim]; row i of sequence b rotates at position
    cache_lengths[b] + i - input_row_offsets[b].

    Example:
        >>> qr = ops.rope(q, freqs, offs, clen, head_dim=128, interleaved=False)
    """
    x, f = tensors(x, freqs_cis)
    offs, clen = tensors(input_row_offsets, cache_lengths)
    return apply("rope", [x, f, offs, clen], head_dim=int(head_dim), interleaved=bool(interleaved))


def kv_cache_store(x, kv_blocks, input_row_offsets, cache_lengths, lookup_table, *, kind: int,
                   layer_idx) -> None:
    """Write x [T, NKV*D] (kind 0: K, 1: V) into layer `layer_idx` of the paged cache.

    Example:
        >>> ops.kv_cache_store(k, blocks, offs, clen, lut, kind=0, layer_idx=0)
    """
    (x,) = tensors(x)
    offs, clen, lut = tensors(input_row_offsets, cache_lengths, lookup_table)
    apply("kv_cache_store", [x, _buffer(kv_blocks), offs, clen, lut], kind=int(kind),
          layer=layer_index(layer_idx))


def rope_split_store(qkv, freqs_cis, input_row_offsets, cache_lengths, lookup_table, kv_blocks,
                     *, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx,
                     interleaved: bool = True, q_norm_weight=None, k_norm_weight=None,
                     qk_norm_eps: float | None = None) -> TensorValue:
    """Split qkv, (optionally RMS-norm q and k per head), RoPE q and k, store k and v; returns
    q_roped [T, NH*D].

    Example:
        >>> q = ops.rope_split_store(qkv, freqs, offs, clen, lut, blocks, n_heads=32,
        ...                          n_kv_heads=8, head_dim=128, layer_idx=0)
    """
    qkv, f = tensors(qkv, freqs_cis)
    offs, clen, lut = tensors(input_row_offsets, cache_lengths, lookup_table)
    operands = [qkv, f, offs, clen, lut, _buffer(kv_blocks)]
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rope_split_store: give both q_norm_weight and k_norm_weight or neither")
    eps = None
    if q_norm_weight is not None:
        operands += tensors(q_norm_weight, k_norm_weight)
        eps = float(1e-6 if qk_norm_eps is None else qk_norm_eps)
    return apply("rope_split_store", operands, head_dim=int(head_dim), n_heads=int(n_heads),
                 n_kv_heads=int(n_kv_heads), interleaved=bool(interleaved),
                 layer=layer_index(layer_idx), qk_norm_eps=eps)


def flash_attention_ragged(q, kv_blocks, input_row_offsets, cache_lengths, lookup_table, *,
                           n_heads: int, n_kv_heads: int, head_dim: int, layer_idx,
                           mask_variant="causal", window: int | None = None,
                           scale: float | None = None,
                           softcap: float | None = None) -> TensorValue:
    """Attention of the ragged new tokens q [T, NH*D] over their sequences' cached prefix and
    themselves (read from the paged cache); GQA; masks on absolute positions. `softcap` caps the
    scaled scores s to softcap * tanh(s / softcap) (Gemma 2's attn_logit_softcapping).

    Example:
        >>> o = ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=32, n_kv_heads=8,
        ...                                head_dim=128, layer_idx=0)
    """
    (q,) = tensors(q)
    offs, clen, lut = tensors(input_row_offsets, cache_lengths, lookup_table)
    mask = mask_name(mask_variant)
    if scale is None:
        scale = default_scale("flash_attention_ragged", head_dim=head_dim)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating)):
            raise ValueError(f"flash_attention_ragged: softcap must be None or a float > 0, got "
                             f"{softcap!r}")
        softcap = float(softcap)
    return apply("flash_attention_ragged", [q, _buffer(kv_blocks), offs, clen, lut],
                 head_dim=int(head_dim), n_heads=int(n_heads), n_kv_heads=int(n_kv_heads),
                 layer=layer_index(layer_idx), mask=mask,
                 window=None if mask not in _WINDOWED else window, scale=float(scale),
                 softcap=softcap)
