"""Float64 numpy reference math for the attention kernel ops.

RoPE tables (plain, linear, Llama-3, YaRN, LongRoPE), RoPE application, ragged-batch positions, the
paged KV-cache store, the fused split + RoPE + store, and ragged flash attention over the paged
cache. The op library wraps these as the references of its OpDefs; nothing here knows about graphs.

Conventions (see shared/MAX_SEMANTICS.md): packed rows with ``input_row_offsets`` prefix sums; new
token ``i`` of sequence ``b`` sits at absolute position ``cache_lengths[b] + i``; the paged cache
``blocks[page, kv, layer, slot, head, :]`` holds token ``p`` of sequence ``b`` at page
``lookup_table[b, p // page_size]`` and slot ``p % page_size``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Llama3RopeScaling",
    "LinearRopeScaling",
    "YarnRopeScaling",
    "LongRopeScaling",
    "MASK_VARIANTS",
    "attention_mask",
    "rope_inv_freq",
    "rope_freqs_cis",
    "rope_table_magnitude",
    "longrope_inv_freqs",
    "yarn_mscale",
    "apply_rope",
    "rms_norm_heads",
    "token_positions",
    "kv_cache_store",
    "rope_split_store",
    "flash_attention_ragged",
]

MASK_VARIANTS = (
    "causal",
    "null",
    "sliding_window_causal",
    "sliding_window_noncausal",
    "chunked_causal",
)
_WINDOWED = ("sliding_window_causal", "sliding_window_noncausal", "chunked_causal")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency scaling (HF ``rope_type="llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (HF ``rope_type="linear"``): every frequency divided by ``factor``."""

    factor: float


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (HF ``rope_type="yarn"``); cos/sin times ``attention_factor``, else the mscale ratio.
    ``truncate=False`` keeps the correction range's ends unrounded (HF's ``truncate``)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class LongRopeScaling:
    """LongRoPE (HF ``rope_type="longrope"``): per-frequency divisors, ``short_factor`` below
    ``original_max_position``, ``long_factor`` from there on; cos/sin times ``attention_factor``."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position: int
    attention_factor: float = 1.0

    def __post_init__(self):  # lists become tuples: the scaling stays hashable
        for name in ("short_factor", "long_factor"):
            object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))


_SCALINGS = {"llama3": Llama3RopeScaling, "linear": LinearRopeScaling, "yarn": YarnRopeScaling,
             "longrope": LongRopeScaling}


def _as_scaling(scaling):
    if scaling is None or isinstance(scaling, tuple(_SCALINGS.values())):
        return scaling
    if isinstance(scaling, Mapping):
        kind = scaling.get("rope_type", scaling.get("type"))
        rest = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
        if "original_max_position_embeddings" in rest:
            rest["original_max_position"] = rest.pop("original_max_position_embeddings")
        cls = _SCALINGS.get(kind)
        if cls is None:
            raise ValueError(f"rope scaling: unknown rope_type {kind!r}; expected one of {sorted(_SCALINGS)}")
        try:
            return cls(**rest)
        except TypeError as e:
            raise ValueError(f"rope scaling {kind!r}: bad fields {sorted(rest)}: {e}") from None
    raise ValueError(f"rope scaling must be None, one of {[c.__name__ for c in _SCALINGS.values()]} "
                     f"or a dict, got {type(scaling).__name__}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``).

    MLA's softmax scale becomes ``scale * yarn_mscale(factor, mscale_all_dim) ** 2``.

    >>> round(yarn_mscale(40.0, 1.0), 6)
    1.368888
    """
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, theta: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` float32, computed in float64 then rounded.

    >>> rope_inv_freq(4, 10000.0).tolist()
    [1.0, 0.009999999776482582]
    """
    if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"rope: theta must be > 0, got {theta!r}")
    scaling = _as_scaling(scaling)
    if isinstance(scaling, LongRopeScaling):
        raise ValueError("rope_inv_freq: longrope has two frequency sets (short and long); use "
                         "longrope_inv_freqs or rope_freqs_cis")
    i2 = np.arange(0, head_dim, 2, dtype=np.float64)
    inv = 1.0 / float(theta) ** (i2 / head_dim)
    if isinstance(scaling, LinearRopeScaling):
        if not scaling.factor > 0:
            raise ValueError(f"rope linear scaling: factor must be > 0, got {scaling.factor!r}")
        inv = inv / scaling.factor
    elif isinstance(scaling, Llama3RopeScaling):
        s = scaling
        if not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor and s.original_max_position > 0):
            raise ValueError(f"rope llama3 scaling: need factor > 0, 0 < low_freq_factor < high_freq_factor, "
                             f"original_max_position > 0; got {s}")
        wavelen = 2 * math.pi / inv
        low_wl = s.original_max_position / s.low_freq_factor
        high_wl = s.original_max_position / s.high_freq_factor
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * inv / s.factor + smooth * inv
        inv = np.where(wavelen < high_wl, inv, np.where(wavelen > low_wl, inv / s.factor, mid))
    elif isinstance(scaling, YarnRopeScaling):
        s = scaling
        if not (s.factor > 0 and s.original_max_position > 0 and s.beta_fast > 0 and s.beta_slow > 0):
            raise ValueError(f"rope yarn scaling: factor, original_max_position, beta_fast, beta_slow must be > 0; got {s}")
        low = _yarn_correction_dim(s.beta_fast, head_dim, theta, s.original_max_position)
        high = _yarn_correction_dim(s.beta_slow, head_dim, theta, s.original_max_position)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # the published formula's guard against a zero-width ramp
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        # ramp 0: keep the original (extrapolated) frequency; ramp 1: interpolate by `factor`.
        inv = inv / s.factor * ramp + inv * (1.0 - ramp)
    return inv.astype(np.float32)


def longrope_inv_freqs(head_dim: int, theta: float, scaling) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) inverse frequencies ``[head_dim // 2]`` float32 of a LongRoPE scaling:
    ``1 / (factor_i * theta ** (2i / head_dim))``.

    >>> s, l = longrope_inv_freqs(4, 10000.0, LongRopeScaling((1.0, 2.0), (4.0, 8.0), 8))
    >>> (l / s).tolist()
    [0.25, 0.25]
    """
    s = _as_scaling(scaling)
    if not isinstance(s, LongRopeScaling):
        raise ValueError(f"longrope_inv_freqs needs a LongRopeScaling, got {type(s).__name__}")
    rope_inv_freq(head_dim, theta)  # validates head_dim and theta
    if not (isinstance(s.original_max_position, (int, np.integer)) and s.original_max_position > 0):
        raise ValueError(f"rope longrope scaling: original_max_position must be a positive int, got "
                         f"{s.original_max_position!r}")
    base = 1.0 / float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for name in ("short_factor", "long_factor"):
        f = np.asarray(getattr(s, name), dtype=np.float64)
        if f.shape != (head_dim // 2,) or not np.all(f > 0):
            raise ValueError(f"rope longrope scaling: {name} must hold head_dim / 2 = {head_dim // 2} "
                             f"positive numbers, got {len(f)}")
    return tuple((base / np.asarray(f, np.float64)).astype(np.float32) for f in (s.short_factor, s.long_factor))


def rope_table_magnitude(scaling) -> float:
    """The factor on the table's cos and sin: YaRN's attention factor (or mscale ratio),
    LongRoPE's attention factor, 1 otherwise."""
    scaling = _as_scaling(scaling)
    if isinstance(scaling, YarnRopeScaling):
        if scaling.attention_factor is not None:
            return float(scaling.attention_factor)
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    if isinstance(scaling, LongRopeScaling):
        return float(scaling.attention_factor)
    return 1.0


def rope_freqs_cis(head_dim: int, max_seq_len: int, theta: float, scaling=None) -> np.ndarray:
    """RoPE table ``[2 * max_seq_len, head_dim]`` float32: row p = ``[cos(p f0), sin(p f0), cos(p f1), ...]``.

    ``scaling``: None, :class:`LinearRopeScaling`, :class:`Llama3RopeScaling`, :class:`YarnRopeScaling`,
    :class:`LongRopeScaling` or an HF-style dict with ``rope_type`` ``"linear"``/``"llama3"``/``"yarn"``/
    ``"longrope"``. YaRN and LongRoPE multiply cos and sin by their attention factor; LongRoPE
    rows below ``original_max_position`` use the short factors, the rest the long ones.

    >>> rope_freqs_cis(4, 2, 10000.0).shape
    (4, 4)
    """
    if not isinstance(max_seq_len, (int, np.integer)) or max_seq_len <= 0:
        raise ValueError(f"rope: max_seq_len must be a positive int, got {max_seq_len!r}")
    scaling = _as_scaling(scaling)
    t = np.arange(2 * max_seq_len, dtype=np.float32)
    if isinstance(scaling, LongRopeScaling):
        short, long = longrope_inv_freqs(head_dim, theta, scaling)
        inv = np.where((t < scaling.original_max_position)[:, None], short[None], long[None])
        ang = (t[:, None] * inv).astype(np.float64)
    else:
        inv = rope_inv_freq(head_dim, theta, scaling)
        # The angle is a float32 product, as in MAX and HF: at large t its rounding shows in cos/sin.
        ang = np.outer(t, inv).astype(np.float64)
    mag = rope_table_magnitude(scaling)
    out = np.empty((t.size, head_dim), dtype=np.float64)
    out[:, 0::2] = np.cos(ang) * mag
    out[:, 1::2] = np.sin(ang) * mag
    return out.astype(np.float32)


def apply_rope(x: np.ndarray, freqs_cis: np.ndarray, positions: np.ndarray, *, interleaved: bool) -> np.ndarray:
    """Rotate ``x [tokens, heads, D]`` by the table rows at ``positions [tokens]``; float64 result.

    ``interleaved=True`` pairs ``(x[2i], x[2i+1])``, False pairs ``(x[i], x[i + D/2])``.

    >>> f = rope_freqs_cis(2, 4, 10000.0)
    >>> apply_rope(np.array([[[1.0, 0.0]]]), f, np.array([0]), interleaved=True).tolist()
    [[[1.0, 0.0]]]
    """
    x = np.asarray(x, dtype=np.float64)
    freqs = np.asarray(freqs_cis, dtype=np.float64)
    pos = np.asarray(positions)
    if x.ndim != 3:
        raise ValueError(f"rope: x must be [tokens, heads, head_dim], got shape {x.shape}")
    d = x.shape[2]
    if freqs.ndim != 2 or freqs.shape[1] != d or d % 2:
        raise ValueError(f"rope: freqs_cis must be [max_positions, {d}] with even head_dim, got {freqs.shape}")
    if pos.shape != (x.shape[0],) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"rope: positions must be integer [{x.shape[0]}], got {pos.dtype} {pos.shape}")
    if pos.size and (pos.min() < 0 or pos.max() >= freqs.shape[0]):
        raise ValueError(f"rope: positions must lie in [0, {freqs.shape[0]}), got range "
                         f"[{pos.min()}, {pos.max()}]")
    rows = freqs[pos.astype(np.int64)][:, None, :]
    cos, sin = rows[..., 0::2], rows[..., 1::2]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2 :]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2 :] = ra, rb
    return out


def rms_norm_heads(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Per-head RMSNorm over the last axis: ``x * rsqrt(mean(x^2) + eps) * weight``; float64."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}], got {w.shape}")
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _ragged(input_row_offsets, cache_lengths, op: str):
    offs = np.asarray(input_row_offsets)
    cl = np.asarray(cache_lengths)
    if offs.ndim != 1 or offs.size < 1 or not np.issubdtype(offs.dtype, np.integer):
        raise ValueError(f"{op}: input_row_offsets must be an integer [batch+1] array, got {offs.dtype} {offs.shape}")
    offs = offs.astype(np.int64)
    if offs[0] != 0 or np.any(np.diff(offs) < 0):
        raise ValueError(f"{op}: input_row_offsets must start at 0 and not decrease, got {offs.tolist()}")
    if cl.shape != (offs.size - 1,) or not np.issubdtype(cl.dtype, np.integer):
        raise ValueError(f"{op}: cache_lengths must be an integer [{offs.size - 1}] array "
                         f"(batch from input_row_offsets), got {cl.dtype} {cl.shape}")
    cl = cl.astype(np.int64)
    if np.any(cl < 0):
        raise ValueError(f"{op}: cache_lengths must be >= 0, got {cl.tolist()}")
    return offs, cl


def token_positions(input_row_offsets: np.ndarray, cache_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each packed row: its sequence index and its absolute position (both int64 ``[tokens]``).

    >>> [a.tolist() for a in token_positions(np.array([0, 2, 3]), np.array([5, 0]))]
    [[0, 0, 1], [5, 6, 0]]
    """
    offs, cl = _ragged(input_row_offsets, cache_lengths, "token_positions")
    counts = np.diff(offs)
    seq = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    pos = cl[seq] + np.arange(offs[-1], dtype=np.int64) - offs[seq]
    return seq, pos


def _check_blocks(blocks: np.ndarray, layer_idx, op: str) -> None:
    if blocks.ndim != 6 or blocks.shape[1] != 2:
        raise ValueError(f"{op}: blocks must be [pages, 2, layers, page_size, n_kv_heads, head_dim], got {blocks.shape}")
    if not (isinstance(layer_idx, (int, np.integer)) and 0 <= layer_idx < blocks.shape[2]):
        raise ValueError(f"{op}: layer_idx must be an int in [0, {blocks.shape[2]}), got {layer_idx!r}")


def _page_slots(lookup_table, seq, pos, blocks, op: str):
    lut = np.asarray(lookup_table)
    if lut.ndim != 2 or not np.issubdtype(lut.dtype, np.integer):
        raise ValueError(f"{op}: lookup_table must be an integer [batch, max_pages] array, got {lut.dtype} {lut.shape}")
    page_size = blocks.shape[3]
    col = pos // page_size
    if col.size and col.max() >= lut.shape[1]:
        raise ValueError(f"{op}: position {int(pos.max())} needs lookup_table column {int(col.max())}, "
                         f"but it has {lut.shape[1]} columns (page_size {page_size})")
    pages = lut.astype(np.int64)[seq, col]
    if pages.size and (pages.min() < 0 or pages.max() >= blocks.shape[0]):
        raise ValueError(f"{op}: lookup_table page id {int(pages.max())} outside blocks' {blocks.shape[0]} pages")
    return pages, pos % page_size


def _store(blocks, values, which, layer_idx, input_row_offsets, cache_lengths, lookup_table, op):
    _check_blocks(blocks, layer_idx, op)
    if which not in (0, 1):
        raise ValueError(f"{op}: which must be 0 (K) or 1 (V), got {which!r}")
    values = np.asarray(values)
    seq, pos = token_positions(input_row_offsets, cache_lengths)
    if values.shape != (seq.size, *blocks.shape[4:]):
        raise ValueError(f"{op}: values must be [tokens={seq.size}, n_kv_heads={blocks.shape[4]}, "
                         f"head_dim={blocks.shape[5]}], got {values.shape}")
    pages, slots = _page_slots(lookup_table, seq, pos, blocks, op)
    blocks[pages, which, layer_idx, slots] = values.astype(blocks.dtype)
    return blocks


def kv_cache_store(blocks: np.ndarray, k_or_v: np.ndarray, which: int, layer_idx: int,
                   input_row_offsets: np.ndarray, cache_lengths: np.ndarray,
                   lookup_table: np.ndarray) -> np.ndarray:
    """Copy of ``blocks`` with ``k_or_v [tokens, NKV, D]`` written at each token's page slot.

    ``which`` 0 writes K, 1 writes V; only layer ``layer_idx`` changes. Values are cast to
    ``blocks.dtype``.
    """
    blocks = np.asarray(blocks)
    return _store(blocks.copy(), k_or_v, which, layer_idx, input_row_offsets, cache_lengths,
                  lookup_table, "kv_cache_store")


def rope_split_store(qkv: np.ndarray, freqs_cis: np.ndarray, input_row_offsets: np.ndarray,
                     cache_lengths: np.ndarray, lookup_table: np.ndarray, blocks: np.ndarray, *,
                     layer_idx: int, n_heads: int, n_kv_heads: int, head_dim: int, interleaved: bool,
                     q_norm_weight: np.ndarray | None = None, k_norm_weight: np.ndarray | None = None,
                     eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Split ``qkv [tokens, (NH + 2 NKV) D]``, optional per-head RMSNorm of q / k, RoPE on q and k,
    store roped k and raw v. Returns ``(q_roped [tokens, NH*D] float64, new_blocks)``.
    """
    qkv = np.asarray(qkv, dtype=np.float64)
    blocks = np.asarray(blocks)
    for name, v in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"rope_split_store: {name} must be a positive int, got {v!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"rope_split_store: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}")
    width = (n_heads + 2 * n_kv_heads) * head_dim
    if qkv.ndim != 2 or qkv.shape[1] != width:
        raise ValueError(f"rope_split_store: qkv must be [tokens, {width}] = [tokens, (NH + 2*NKV) * D], got {qkv.shape}")
    _check_blocks(blocks, layer_idx, "rope_split_store")
    if blocks.shape[4:] != (n_kv_heads, head_dim):
        raise ValueError(f"rope_split_store: blocks hold [n_kv_heads, head_dim] = {list(blocks.shape[4:])}, "
                         f"op says [{n_kv_heads}, {head_dim}]")
    t = qkv.shape[0]
    nq, nk = n_heads * head_dim, n_kv_heads * head_dim
    q = qkv[:, :nq].reshape(t, n_heads, head_dim)
    k = qkv[:, nq:nq + nk].reshape(t, n_kv_heads, head_dim)
    v = qkv[:, nq + nk:].reshape(t, n_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = rms_norm_heads(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm_heads(k, k_norm_weight, eps)
    seq, pos = token_positions(input_row_offsets, cache_lengths)
    if seq.size != t:
        raise ValueError(f"rope_split_store: input_row_offsets[-1] = {seq.size} but qkv has {t} rows")
    q = apply_rope(q, freqs_cis, pos, interleaved=interleaved)
    k = apply_rope(k, freqs_cis, pos, interleaved=interleaved)
    new = blocks.copy()
    _store(new, k, 0, layer_idx, input_row_offsets, cache_lengths, lookup_table, "rope_split_store")
    _store(new, v, 1, layer_idx, input_row_offsets, cache_lengths, lookup_table, "rope_split_store")
    return q.reshape(t, nq), new


def _mask_variant(variant) -> str:
    name = getattr(variant, "name", variant)
    if isinstance(name, str):
        name = name.lower().removesuffix("_mask")
    if name not in MASK_VARIANTS:
        raise ValueError(f"flash_attention_ragged: unknown mask_variant {variant!r}; expected one of {MASK_VARIANTS}")
    return name


def attention_mask(variant, q_pos: np.ndarray, k_pos: np.ndarray, window: int | None = None) -> np.ndarray:
    """Boolean ``[len(q_pos), len(k_pos)]``: True where the query at q_pos may read the key at k_pos."""
    variant = _mask_variant(variant)
    qp, kp = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
    if variant in _WINDOWED and not (isinstance(window, (int, np.integer)) and window >= 1):
        raise ValueError(f"flash_attention_ragged: mask_variant {variant!r} needs an int window >= 1, got {window!r}")
    if variant == "null":
        return np.ones((qp.shape[0], kp.shape[1]), dtype=bool)
    if variant == "causal":
        return kp <= qp
    if variant == "sliding_window_causal":
        return (kp <= qp) & (qp - kp < window)
    if variant == "sliding_window_noncausal":
        return qp - kp < window
    return (kp <= qp) & (kp // window == qp // window)


def _masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to mask; rows with nothing allowed give zeros."""
    s = np.where(mask, scores, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mask, np.exp(s - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    return np.divide(p, denom, out=np.zeros_like(p), where=denom > 0)


def flash_attention_ragged(q: np.ndarray, blocks: np.ndarray, *, layer_idx: int,
                           input_row_offsets: np.ndarray, cache_lengths: np.ndarray,
                           lookup_table: np.ndarray, mask_variant, window: int | None = None,
                           scale: float, softcap: float | None = None) -> np.ndarray:
    """Attention of the packed new tokens ``q [tokens, NH, D]`` over each sequence's keys/values
    ``0 .. cache_len + new_len - 1`` read from the paged cache (which already holds the new tokens).

    GQA: query head h reads KV head ``h // (NH / NKV)``. Masks use absolute positions. With
    ``softcap`` (Gemma 2's attn_logit_softcapping) the scaled scores s become
    ``softcap * tanh(s / softcap)`` before the mask and softmax. Returns float64 ``[tokens, NH, D]``.
    """
    if softcap is not None and not (isinstance(softcap, (int, float, np.floating)) and softcap > 0):
        raise ValueError(f"flash_attention_ragged: softcap must be None or a float > 0, got {softcap!r}")
    q = np.asarray(q, dtype=np.float64)
    blocks = np.asarray(blocks)
    _check_blocks(blocks, layer_idx, "flash_attention_ragged")
    variant = _mask_variant(mask_variant)
    nkv, d = blocks.shape[4:]
    if q.ndim != 3 or q.shape[2] != d or q.shape[1] % nkv:
        raise ValueError(f"flash_attention_ragged: q must be [tokens, NH, {d}] with NH a multiple of "
                         f"n_kv_heads {nkv}, got {q.shape}")
    offs, cl = _ragged(input_row_offsets, cache_lengths, "flash_attention_ragged")
    if offs[-1] != q.shape[0]:
        raise ValueError(f"flash_attention_ragged: input_row_offsets[-1] = {offs[-1]} but q has {q.shape[0]} rows")
    if variant in _WINDOWED:
        attention_mask(variant, np.zeros(0), np.zeros(0), window)  # validates window early
    nh = q.shape[1]
    group = nh // nkv
    out = np.zeros_like(q)
    for b in range(cl.size):
        n = int(offs[b + 1] - offs[b])
        if n == 0:
            continue
        total = int(cl[b]) + n
        kp = np.arange(total, dtype=np.int64)
        pages, slots = _page_slots(lookup_table, np.full(total, b), kp, blocks, "flash_attention_ragged")
        k = blocks[pages, 0, layer_idx, slots].astype(np.float64)  # [total, NKV, D]
        v = blocks[pages, 1, layer_idx, slots].astype(np.float64)
        qb = q[offs[b]:offs[b + 1]].reshape(n, nkv, group, d)
        scores = np.einsum("nhgd,lhd->hgnl", qb, k) * scale
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        mask = attention_mask(variant, int(cl[b]) + np.arange(n), kp, window)
        p = _masked_softmax(scores, mask)
        out[offs[b]:offs[b + 1]] = np.einsum("hgnl,lhd->nhgd", p, v).reshape(n, nh, d)
    return out
