"""Float64 numpy reference math for multi-head latent attention (DeepSeek MLA).

The latent paged cache holds one "head" per token: ``[c_kv (kv_lora_rank) | k_pe (rope_dim)]``,
the RMS-normed compressed KV then the roped shared key. Its blocks are
``[pages, kinds, layers, page_size, 1, kv_lora_rank + rope_dim]`` with ``kinds`` 1 (a latent-only
cache) or 2 (the ordinary K/V layout; the latent lives in slot 0 and slot 1 is unused).

Two equivalent ways to attend (shared/MAX_SEMANTICS.md, MLA):

* prefill: decompress per head ``k_nope = c_kv @ w_k_h^T``, ``v = c_kv @ w_uv_h`` and run ordinary
  attention with head dim ``nope + rope``; keys are decompressed ``buffer_size`` at a time with an
  online softmax, as a fixed-size decompression buffer forces;
* decode: absorb ``w_uk`` into the query (``q_lat = q_nope @ w_uk_h``), attend in latent space over
  the 576-wide cache rows with values the first ``kv_lora_rank`` columns, then apply ``w_uv``.

Both use the causal mask on absolute positions (new token i of sequence b sits at
``cache_lengths[b] + i``), so either serves a batch of any shape.
"""
from __future__ import annotations

import numpy as np

from .attention_math import rms_norm_heads, token_positions
from .rope_math import apply_rope

__all__ = ["check_latent_blocks", "gather_latent", "mla_cache_store", "mla_prefill",
           "mla_decode", "mla_prefill_plan", "check_prefill_metadata", "max_new_tokens",
           "mla_attention"]


def check_latent_blocks(blocks: np.ndarray, layer_idx: int, width: int, op: str) -> None:
    """ValueError unless blocks are a latent cache of rows ``width`` wide with layer layer_idx."""
    if blocks.ndim != 6 or blocks.shape[1] not in (1, 2) or blocks.shape[4] != 1 \
            or blocks.shape[5] != width:
        raise ValueError(f"{op}: blocks must be [pages, 1 or 2, layers, page_size, 1, {width}] "
                         f"(one latent head of kv_lora_rank + qk_rope_head_dim), got {blocks.shape}")
    if not (isinstance(layer_idx, (int, np.integer)) and 0 <= layer_idx < blocks.shape[2]):
        raise ValueError(f"{op}: layer_idx must be an int in [0, {blocks.shape[2]}), got {layer_idx!r}")


def _pages(lookup_table, seq: np.ndarray, pos: np.ndarray, blocks, op: str):
    lut = np.asarray(lookup_table)
    if lut.ndim != 2 or not np.issubdtype(lut.dtype, np.integer):
        raise ValueError(f"{op}: lookup_table must be an integer [batch, max_pages] array, got "
                         f"{lut.dtype} {lut.shape}")
    page_size = blocks.shape[3]
    col = pos // page_size
    if col.size and (seq.max() >= lut.shape[0] or col.max() >= lut.shape[1]):
        raise ValueError(f"{op}: lookup_table {lut.shape} has no entry for sequence "
                         f"{int(seq.max())}, position {int(pos.max())} (page_size {page_size})")
    pages = lut.astype(np.int64)[seq, col]
    if pages.size and pages.max() >= blocks.shape[0]:
        raise ValueError(f"{op}: lookup_table page id {int(pages.max())} outside blocks' "
                         f"{blocks.shape[0]} pages")
    return pages, pos % page_size


def gather_latent(blocks: np.ndarray, layer_idx: int, lookup_table: np.ndarray, seq: int,
                  length: int, op: str = "gather_latent") -> np.ndarray:
    """Cache rows ``[length, kv_lora_rank + rope_dim]`` (float64) of positions 0..length-1 of seq."""
    pos = np.arange(length, dtype=np.int64)
    pages, slots = _pages(lookup_table, np.full(length, seq, np.int64), pos, blocks, op)
    return blocks[pages, 0, layer_idx, slots, 0].astype(np.float64)


def mla_cache_store(blocks: np.ndarray, kv_latent: np.ndarray, norm_weight: np.ndarray,
                    freqs_cis: np.ndarray, input_row_offsets: np.ndarray,
                    cache_lengths: np.ndarray, lookup_table: np.ndarray, *, layer_idx: int,
                    kv_lora_rank: int, interleaved: bool, eps: float) -> np.ndarray:
    """Copy of ``blocks`` with each token's ``[rms_norm(c_kv) * w | rope(k_pe)]`` stored.

    ``kv_latent [tokens, kv_lora_rank + rope_dim]`` is the kv_a projection output.
    """
    blocks = np.asarray(blocks)
    kv = np.asarray(kv_latent, dtype=np.float64)
    width = blocks.shape[-1] if blocks.ndim == 6 else -1
    check_latent_blocks(blocks, layer_idx, width, "mla_cache_store")
    if kv.ndim != 2 or kv.shape[1] != width or not 0 < kv_lora_rank < width:
        raise ValueError(f"mla_cache_store: kv_latent must be [tokens, {width}] with 0 < "
                         f"kv_lora_rank ({kv_lora_rank}) < {width}, got {kv.shape}")
    seq, pos = token_positions(input_row_offsets, cache_lengths)
    if seq.size != kv.shape[0]:
        raise ValueError(f"mla_cache_store: input_row_offsets[-1] = {seq.size} but kv_latent has "
                         f"{kv.shape[0]} rows")
    c = rms_norm_heads(kv[:, :kv_lora_rank], norm_weight, eps)
    k_pe = apply_rope(kv[:, None, kv_lora_rank:], freqs_cis, pos, interleaved=interleaved)[:, 0]
    pages, slots = _pages(lookup_table, seq, pos, blocks, "mla_cache_store")
    new = blocks.copy()
    new[pages, 0, layer_idx, slots, 0] = np.concatenate([c, k_pe], axis=1).astype(blocks.dtype)
    return new


def _sequences(q, blocks, layer_idx, input_row_offsets, cache_lengths, op):
    seq, pos = token_positions(input_row_offsets, cache_lengths)
    if seq.size != q.shape[0]:
        raise ValueError(f"{op}: input_row_offsets[-1] = {seq.size} but q has {q.shape[0]} rows")
    offs = np.asarray(input_row_offsets).astype(np.int64)
    cl = np.asarray(cache_lengths).astype(np.int64)
    for b in range(cl.size):
        n = int(offs[b + 1] - offs[b])
        if n:
            yield b, slice(int(offs[b]), int(offs[b + 1])), int(cl[b]), n


def _check_q(q, n_heads, qk_dim, op):
    if q.ndim != 3 or q.shape[1:] != (n_heads, qk_dim):
        raise ValueError(f"{op}: q must be [tokens, {n_heads}, {qk_dim}], got {q.shape}")


def _chunk_starts(base: int, length: int, buffer_size: int) -> list[int]:
    """Key positions where a sequence whose K/V rows start at buffer row `base` crosses into
    the next buffer of `buffer_size` rows (its keys are decompressed a buffer at a time)."""
    first = (-base) % buffer_size
    return [0] + list(range(first or buffer_size, length, buffer_size))


def mla_prefill(q: np.ndarray, blocks: np.ndarray, w_k: np.ndarray, w_uv: np.ndarray, *,
                layer_idx: int, input_row_offsets: np.ndarray, cache_lengths: np.ndarray,
                lookup_table: np.ndarray, qk_rope_head_dim: int, scale: float,
                buffer_size: int, buffer_row_offsets: np.ndarray | None = None) -> np.ndarray:
    """Decompressed-K/V attention; ``q [tokens, NH, nope + rope]`` (roped), ``w_k [NH*nope, R]``,
    ``w_uv [NH, R, v]``. Returns float64 ``[tokens, NH, v]``.

    Keys are decompressed `buffer_size` rows at a time: with ``buffer_row_offsets`` (the prefill
    plan) the buffers tile the whole batch's K/V rows, as MAX's kernels do; without it each
    sequence's keys start a fresh buffer. Only rounding depends on it."""
    q = np.asarray(q, dtype=np.float64)
    w_uv = np.asarray(w_uv, dtype=np.float64)
    if w_uv.ndim != 3:
        raise ValueError(f"mla_prefill: w_uv must be [NH, kv_lora_rank, v_head_dim], got {w_uv.shape}")
    nh, r, _ = w_uv.shape
    rope = qk_rope_head_dim
    nope = q.shape[-1] - rope
    _check_q(q, nh, nope + rope, "mla_prefill")
    w_k = np.asarray(w_k, dtype=np.float64)
    if w_k.shape != (nh * nope, r):
        raise ValueError(f"mla_prefill: w_k must be [{nh * nope}, {r}], got {w_k.shape}")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, np.integer)) or buffer_size <= 0:
        raise ValueError(f"mla_prefill: buffer_size must be a positive int, got {buffer_size!r}")
    check_latent_blocks(blocks, layer_idx, r + rope, "mla_prefill")
    w_k = w_k.reshape(nh, nope, r)
    out = np.zeros((q.shape[0], nh, w_uv.shape[2]))
    for b, rows, cl, n in _sequences(q, blocks, layer_idx, input_row_offsets, cache_lengths,
                                     "mla_prefill"):
        latent = gather_latent(blocks, layer_idx, lookup_table, b, cl + n, "mla_prefill")
        qb, qp = q[rows], cl + np.arange(n)
        m = np.full((nh, n, 1), -np.inf)
        den = np.zeros((nh, n, 1))
        acc = np.zeros((nh, n, w_uv.shape[2]))
        base = 0 if buffer_row_offsets is None else int(buffer_row_offsets[b])
        starts = _chunk_starts(base, cl + n, buffer_size)
        for s, e in zip(starts, starts[1:] + [cl + n]):  # one decompression buffer at a time
            c, k_pe = latent[s:e, :r], latent[s:e, r:]
            k_nope = np.einsum("lr,hdr->hld", c, w_k)
            v = np.einsum("lr,hrv->hlv", c, w_uv)
            scores = (np.einsum("nhd,hld->hnl", qb[..., :nope], k_nope)
                      + np.einsum("nhd,ld->hnl", qb[..., nope:], k_pe)) * scale
            allowed = (s + np.arange(c.shape[0]))[None, :] <= qp[:, None]
            scores = np.where(allowed, scores, -np.inf)
            m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
            m_safe = np.where(np.isfinite(m_new), m_new, 0.0)
            p = np.where(allowed, np.exp(scores - m_safe), 0.0)
            corr = np.where(np.isfinite(m), np.exp(m - m_safe), 0.0)
            den = den * corr + p.sum(axis=-1, keepdims=True)
            acc = acc * corr + np.einsum("hnl,hlv->hnv", p, v)
            m = m_new
        out[rows] = (acc / den).transpose(1, 0, 2)
    return out


def mla_decode(q: np.ndarray, blocks: np.ndarray, w_uk: np.ndarray, w_uv: np.ndarray, *,
               layer_idx: int, input_row_offsets: np.ndarray, cache_lengths: np.ndarray,
               lookup_table: np.ndarray, qk_rope_head_dim: int, scale: float) -> np.ndarray:
    """Absorbed attention in latent space; ``q [tokens, NH, nope + rope]`` (roped),
    ``w_uk [NH, nope, R]``, ``w_uv [NH, R, v]``. Returns float64 ``[tokens, NH, v]``."""
    q = np.asarray(q, dtype=np.float64)
    w_uk = np.asarray(w_uk, dtype=np.float64)
    w_uv = np.asarray(w_uv, dtype=np.float64)
    if w_uk.ndim != 3 or w_uv.ndim != 3 or w_uk.shape[0] != w_uv.shape[0] \
            or w_uk.shape[2] != w_uv.shape[1]:
        raise ValueError(f"mla_decode: w_uk must be [NH, nope, R] and w_uv [NH, R, v], got "
                         f"{w_uk.shape} and {w_uv.shape}")
    nh, nope, r = w_uk.shape
    rope = qk_rope_head_dim
    _check_q(q, nh, nope + rope, "mla_decode")
    check_latent_blocks(blocks, layer_idx, r + rope, "mla_decode")
    q_lat = np.concatenate([np.einsum("nhd,hdr->nhr", q[..., :nope], w_uk), q[..., nope:]], axis=2)
    out = np.zeros((q.shape[0], nh, w_uv.shape[2]))
    for b, rows, cl, n in _sequences(q, blocks, layer_idx, input_row_offsets, cache_lengths,
                                     "mla_decode"):
        latent = gather_latent(blocks, layer_idx, lookup_table, b, cl + n, "mla_decode")
        scores = np.einsum("nhw,lw->hnl", q_lat[rows], latent) * scale
        allowed = np.arange(cl + n)[None, :] <= (cl + np.arange(n))[:, None]
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        o_lat = np.einsum("hnl,lr->nhr", p, latent[:, :r])
        out[rows] = np.einsum("nhr,hrv->nhv", o_lat, w_uv)
    return out


def mla_prefill_plan(input_row_offsets: np.ndarray, cache_lengths: np.ndarray):
    """``(buffer_row_offsets u32 [batch+1], cache_offsets u32 [batch], buffer_lengths i32 [1])``.

    Sequence b's decompressed K/V rows (cached then new tokens) occupy buffer rows
    ``[buffer_row_offsets[b], buffer_row_offsets[b+1])``; its new tokens start at row
    ``cache_offsets[b]`` of that range; ``buffer_lengths[0]`` is the total.

    >>> [a.tolist() for a in mla_prefill_plan(np.array([0, 2, 3]), np.array([5, 0]))]
    [[0, 7, 8], [5, 0], [8]]
    """
    token_positions(input_row_offsets, cache_lengths)  # validates
    offs = np.asarray(input_row_offsets).astype(np.int64)
    cl = np.asarray(cache_lengths).astype(np.int64)
    rows = np.concatenate([[0], np.cumsum(np.diff(offs) + cl)])
    return rows.astype(np.uint32), cl.astype(np.uint32), np.array([rows[-1]], dtype=np.int32)


def check_prefill_metadata(input_row_offsets, cache_lengths, buffer_row_offsets, cache_offsets,
                           buffer_lengths, op: str) -> None:
    """ValueError unless the prefill metadata is mla_prefill_plan of these offsets and lengths."""
    want = mla_prefill_plan(input_row_offsets, cache_lengths)
    for name, got, w in zip(("buffer_row_offsets", "cache_offsets", "buffer_lengths"),
                            (buffer_row_offsets, cache_offsets, buffer_lengths), want):
        if np.asarray(got).shape != w.shape or not np.array_equal(np.asarray(got).astype(np.int64),
                                                                    w.astype(np.int64)):
            raise ValueError(f"{op}: prefill metadata {name} = {np.asarray(got).tolist()} is not "
                             f"the plan of these input_row_offsets and cache_lengths "
                             f"({w.tolist()}); build it with create_mla_prefill_metadata")


def max_new_tokens(input_row_offsets) -> int:
    """The most new tokens any sequence of the batch brings (0 for an empty batch)."""
    offs = np.asarray(input_row_offsets).astype(np.int64)
    return int(np.diff(offs).max()) if offs.size > 1 else 0


def mla_attention(q: np.ndarray, blocks: np.ndarray, w_uk: np.ndarray, w_uv: np.ndarray, *,
                  absorb_max: int, buffer_size: int, buffer_row_offsets=None, **kw) -> np.ndarray:
    """MLA for a batch of any shape, computing one form: absorbed (mla_decode) when no sequence
    brings more than `absorb_max` new tokens, else decompressed (mla_prefill, w_k being w_uk's
    rows). Returns float64 ``[tokens, NH, v]``."""
    if max_new_tokens(kw["input_row_offsets"]) <= absorb_max:
        return mla_decode(q, blocks, w_uk, w_uv, **kw)
    w_uk = np.asarray(w_uk)
    return mla_prefill(q, blocks, w_uk.reshape(-1, w_uk.shape[-1]), w_uv, buffer_size=buffer_size,
                       buffer_row_offsets=buffer_row_offsets, **kw)
