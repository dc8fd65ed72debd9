"""Float64 numpy reference math for the attention kernel ops.

Ragged-batch positions, the paged KV-cache store, the fused split + RoPE + store, and ragged flash
attention over the paged cache (the RoPE tables and rotation are rope_math.py's). The op library
wraps these as the references of its OpDefs; nothing here knows about graphs.

Conventions (see shared/MAX_SEMANTICS.md): packed rows with ``input_row_offsets`` prefix sums; new
token ``i`` of sequence ``b`` sits at absolute position ``cache_lengths[b] + i``; the paged cache
``blocks[page, kv, layer, slot, head, :]`` holds token ``p`` of sequence ``b`` at page
``lookup_table[b, p // page_size]`` and slot ``p % page_size``.
"""

from __future__ import annotations

import numpy as np

from .rope_math import apply_rope

__all__ = [
    "MASK_VARIANTS",
    "attention_mask",
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
    """Softmax over the last axis restricted to mask; rows with nothing allowed give zeros,
    rows with a NaN (or an inf that meets another) give NaN, as torch's softmax does: a bad
    input is never turned into a quiet zero."""
    s = np.where(mask, scores, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mask, np.exp(s - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):   # NaN / NaN is the answer for a row with a NaN
        return np.divide(p, denom, out=np.zeros_like(p), where=denom != 0)


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
