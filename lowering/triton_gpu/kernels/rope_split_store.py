"""The fused split + (q/k RMSNorm) + RoPE(q, k) + paged store(k, v) kernel.

Input qkv `[T, (NH + 2*NKV) * D]` laid out [q | k | v]. Outputs: q_roped `[T, NH*D]`; rope(k)
and raw v written to the paged cache at position cache_lengths[b] + i of layer `layer_idx`.

Bandwidth-bound: every byte of qkv is read once and written once. A program owns BLOCK_T tokens
and walks their heads in chunks of [BLOCK_T, HB, D] (~4096 elements, 32 per thread with
4 warps, i.e. four 16-byte loads in flight per thread; a decode chunk holds all query heads of a
token). Rows are loaded contiguously and the interleaved pairs are separated in registers
(reshape + split), so global accesses are 16-byte vectors; the half-split pairing loads the two
halves as two contiguous tiles (8-16 bytes per access, depending on the tile). The sequence
of each token comes from a binary search over input_row_offsets (log2(batch) cached loads).
Three specializations: a program per head chunk for a few tokens (decode_heads: there the
time is the chain of dependent loads, not bytes; SPLIT_ELEMS below), BLOCK_T=1 for
decode-sized T (one program per token keeps every SM busy) and BLOCK_T=2 for prefill (fewer
programs amortize the search and the rope table rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.paged import find_sequence, slot_offsets
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, next_pow2, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

# Elements per [BLOCK_T, heads, D] chunk. Swept on an H100 (tools/tune_rope_split_store.py):
# 2 tokens x 8 heads x 128 with 4 warps reached 83% of copy bandwidth, 4 x 8 x 128 only ~63%.
TILE_ELEMS = 2048
# A few tokens (a small decode batch) are a chain of dependent loads, not bytes: one program a
# token walks its head chunks one after another (the positions, then the rope row and the
# cache slot, then each chunk's load and store), so there each chunk gets its own program
# (grid axis 1) of SPLIT_ELEMS elements while the grid stays one wave: tokens x chunks <=
# SPLIT_PROGRAMS (below any Hopper part's SM count), which also lets PDL launch the next kernel
# early (pdl.py).
SPLIT_ELEMS = 1024
SPLIT_PROGRAMS = 128


@triton.jit
def _load_pairs(ptr, base, hmask, D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Load [BT, HB, D] rows at ptr+base[:, :, None] as fp32 (first, second) pair halves."""
    if INTERLEAVED:
        d = tl.arange(0, D)
        x = tl.load(ptr + base[:, :, None] + d[None, None, :], mask=hmask[:, :, None], other=0.0)
        x = tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1], D // 2, 2))
        a, b = tl.split(x)
    else:
        f = tl.arange(0, D // 2)
        a = tl.load(ptr + base[:, :, None] + f[None, None, :], mask=hmask[:, :, None], other=0.0)
        b = tl.load(ptr + base[:, :, None] + (f + D // 2)[None, None, :], mask=hmask[:, :, None],
                    other=0.0)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _store_pairs(ptr, base, hmask, a, b, D: tl.constexpr, INTERLEAVED: tl.constexpr):
    if INTERLEAVED:
        d = tl.arange(0, D)
        x = tl.reshape(tl.join(a, b), (a.shape[0], a.shape[1], D))
        tl.store(ptr + base[:, :, None] + d[None, None, :], x.to(ptr.dtype.element_ty),
                 mask=hmask[:, :, None])
    else:
        f = tl.arange(0, D // 2)
        tl.store(ptr + base[:, :, None] + f[None, None, :], a.to(ptr.dtype.element_ty),
                 mask=hmask[:, :, None])
        tl.store(ptr + base[:, :, None] + (f + D // 2)[None, None, :],
                 b.to(ptr.dtype.element_ty), mask=hmask[:, :, None])


@triton.jit
def _norm_rope(a, b, cos, sin, wa, wb, eps, D: tl.constexpr, USE_QK_NORM: tl.constexpr):
    if USE_QK_NORM:
        inv = tl.rsqrt(tl.sum(a * a + b * b, axis=2) / D + eps)
        a = a * inv[:, :, None] * wa[None, None, :]
        b = b * inv[:, :, None] * wb[None, None, :]
    return a * cos - b * sin, a * sin + b * cos


@triton.jit
def _weight_pairs(w_ptr, D: tl.constexpr, INTERLEAVED: tl.constexpr):
    if INTERLEAVED:
        w = tl.reshape(tl.load(w_ptr + tl.arange(0, D)).to(tl.float32), (D // 2, 2))
        wa, wb = tl.split(w)
    else:
        f = tl.arange(0, D // 2)
        wa = tl.load(w_ptr + f).to(tl.float32)
        wb = tl.load(w_ptr + D // 2 + f).to(tl.float32)
    return wa, wb


@triton.jit
def _token_rope(offs_ptr, cache_len_ptr, freqs_ptr, t, batch, rope_rows, D: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """(sequence, position, cos, sin `[BLOCK_T, 1, D / 2]`) of tokens t. The freqs_cis row is
    read once per token for all heads; its index is clamped into the table (the host checks
    positions first, valid ones are unchanged), as the cache slot is in slot_offsets: bad
    metadata stays inside the buffers."""
    b = find_sequence(offs_ptr, t, batch)
    pos = tl.load(cache_len_ptr + b) + t - tl.load(offs_ptr + b)
    fpos = tl.minimum(tl.maximum(pos, 0), rope_rows - 1)
    fr = tl.load(freqs_ptr + fpos.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :])
    cos, sin = tl.split(tl.reshape(fr.to(tl.float32), (BLOCK_T, D // 2, 2)))
    return b, pos, cos[:, None, :], sin[:, None, :]


@triton.jit
def rope_split_store_kernel(
        qkv_ptr, offs_ptr, cache_len_ptr, lut_ptr, freqs_ptr, blocks_ptr, q_out_ptr,
        q_norm_ptr, k_norm_ptr, T, batch, max_pages, layer_idx, num_layers, eps, num_pages,
        rope_rows, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        INTERLEAVED: tl.constexpr, USE_QK_NORM: tl.constexpr, BLOCK_T: tl.constexpr,
        HB_Q: tl.constexpr, HB_KV: tl.constexpr, SPLIT_HEADS: tl.constexpr = False):
    pdl_wait()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    t = tl.minimum(t, T - 1)
    if SPLIT_HEADS:
        # One head chunk per program (grid axis 1 walks the q chunks, then the k/v chunks):
        # more independent programs in flight than a loop over chunks inside one program. The
        # chunk's loads go out first, so they overlap the metadata's dependent loads (offsets,
        # then the cache length, then the rope row and the page id).
        c = tl.program_id(1)
        n_q = (NH + HB_Q - 1) // HB_Q
        row = t.to(tl.int64) * ((NH + 2 * NKV) * D)
        if c < n_q:
            # (names of their own in each branch: Triton merges same-named values of both)
            qa, qb, qh, qm = _q_load(qkv_ptr, row, tmask, c * HB_Q, NH, D, INTERLEAVED, HB_Q)
            _, _, qcos, qsin = _token_rope(offs_ptr, cache_len_ptr, freqs_ptr, t, batch,
                                           rope_rows, D, BLOCK_T)
            _q_finish(q_out_ptr, q_norm_ptr, qa, qb, qh, qm, t, qcos, qsin, eps, NH, D,
                      INTERLEAVED, USE_QK_NORM)
        else:
            ka, kb, kv, kh, km = _kv_load(qkv_ptr, row, tmask, (c - n_q) * HB_KV, NH, NKV, D,
                                          INTERLEAVED, HB_KV)
            kseq, kpos, kcos, ksin = _token_rope(offs_ptr, cache_len_ptr, freqs_ptr, t, batch,
                                                 rope_rows, D, BLOCK_T)
            k_base = slot_offsets(lut_ptr, kseq, kpos, max_pages, layer_idx, num_layers, tmask,
                                  0, PAGE_SIZE, NKV, D, num_pages)
            v_base = slot_offsets(lut_ptr, kseq, kpos, max_pages, layer_idx, num_layers, tmask,
                                  1, PAGE_SIZE, NKV, D, num_pages)
            _kv_finish(blocks_ptr, k_norm_ptr, ka, kb, kv, kh, km, k_base, v_base, kcos, ksin,
                       eps, D, INTERLEAVED, USE_QK_NORM)
    else:
        b, pos, cos, sin = _token_rope(offs_ptr, cache_len_ptr, freqs_ptr, t, batch, rope_rows,
                                       D, BLOCK_T)
        k_base = slot_offsets(lut_ptr, b, pos, max_pages, layer_idx, num_layers, tmask, 0,
                              PAGE_SIZE, NKV, D, num_pages)
        v_base = slot_offsets(lut_ptr, b, pos, max_pages, layer_idx, num_layers, tmask, 1,
                              PAGE_SIZE, NKV, D, num_pages)
        row = t.to(tl.int64) * ((NH + 2 * NKV) * D)
        for h0 in range(0, NH, HB_Q):
            a, bb, h, m = _q_load(qkv_ptr, row, tmask, h0, NH, D, INTERLEAVED, HB_Q)
            _q_finish(q_out_ptr, q_norm_ptr, a, bb, h, m, t, cos, sin, eps, NH, D,
                      INTERLEAVED, USE_QK_NORM)
        for h0 in range(0, NKV, HB_KV):
            a, bb, v, h, m = _kv_load(qkv_ptr, row, tmask, h0, NH, NKV, D, INTERLEAVED, HB_KV)
            _kv_finish(blocks_ptr, k_norm_ptr, a, bb, v, h, m, k_base, v_base, cos, sin, eps,
                       D, INTERLEAVED, USE_QK_NORM)


@triton.jit
def _q_load(qkv_ptr, row, tmask, h0, NH: tl.constexpr, D: tl.constexpr,
            INTERLEAVED: tl.constexpr, HB_Q: tl.constexpr):
    """The pair halves of q heads h0 .. h0 + HB_Q of each token, the heads and their mask."""
    h = h0 + tl.arange(0, HB_Q)
    m = tmask[:, None] & (h < NH)[None, :]
    a, bb = _load_pairs(qkv_ptr, row[:, None] + h[None, :] * D, m, D, INTERLEAVED)
    return a, bb, h, m


@triton.jit
def _q_finish(q_out_ptr, q_norm_ptr, a, bb, h, m, t, cos, sin, eps, NH: tl.constexpr,
              D: tl.constexpr, INTERLEAVED: tl.constexpr, USE_QK_NORM: tl.constexpr):
    """(q RMSNorm,) rope and the store of a chunk _q_load gave."""
    a, bb = _chunk_rope(q_norm_ptr, a, bb, cos, sin, eps, D, INTERLEAVED, USE_QK_NORM)
    _store_pairs(q_out_ptr, t.to(tl.int64)[:, None] * (NH * D) + h[None, :] * D, m, a, bb,
                 D, INTERLEAVED)


@triton.jit
def _chunk_rope(norm_ptr, a, bb, cos, sin, eps, D: tl.constexpr, INTERLEAVED: tl.constexpr,
                USE_QK_NORM: tl.constexpr):
    """A chunk's pair halves (RMS-normed with the weight at norm_ptr, when asked) rotated."""
    wa = cos
    wb = cos
    if USE_QK_NORM:
        wa, wb = _weight_pairs(norm_ptr, D, INTERLEAVED)
    return _norm_rope(a, bb, cos, sin, wa, wb, eps, D, USE_QK_NORM)


@triton.jit
def _kv_load(qkv_ptr, row, tmask, h0, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
             INTERLEAVED: tl.constexpr, HB_KV: tl.constexpr):
    """k's pair halves and v of kv heads h0 .. h0 + HB_KV of each token, the heads, the mask."""
    h = h0 + tl.arange(0, HB_KV)
    m = tmask[:, None] & (h < NKV)[None, :]
    # Both loads go out before the first store: the compiler cannot prove the cache and
    # qkv do not alias, so a load after a store would wait for it.
    a, bb = _load_pairs(qkv_ptr, row[:, None] + (NH + h)[None, :] * D, m, D, INTERLEAVED)
    d = tl.arange(0, D)
    v = tl.load(qkv_ptr + (row[:, None] + (NH + NKV + h)[None, :] * D)[:, :, None]
                + d[None, None, :], mask=m[:, :, None])
    return a, bb, v, h, m


@triton.jit
def _kv_finish(blocks_ptr, k_norm_ptr, a, bb, v, h, m, k_base, v_base, cos, sin, eps,
               D: tl.constexpr, INTERLEAVED: tl.constexpr, USE_QK_NORM: tl.constexpr):
    """(k RMSNorm,) rope of k and the paged stores of a chunk _kv_load gave."""
    a, bb = _chunk_rope(k_norm_ptr, a, bb, cos, sin, eps, D, INTERLEAVED, USE_QK_NORM)
    _store_pairs(blocks_ptr, k_base[:, None] + h[None, :] * D, m, a, bb, D, INTERLEAVED)
    d = tl.arange(0, D)
    tl.store(blocks_ptr + (v_base[:, None] + h[None, :] * D)[:, :, None] + d[None, None, :],
             v.to(blocks_ptr.dtype.element_ty), mask=m[:, :, None])


def block_sizes(NH: int, NKV: int, D: int, T: int | None = None, block_t: int | None = None,
                elems: int = TILE_ELEMS) -> tuple[int, int, int]:
    """(BLOCK_T, HB_Q, HB_KV): decode-sized T (<= 1024) gets one token per program."""
    bt = block_t or (1 if T is None or T <= 1024 else 2)
    hb = max(1, elems // (D * bt))
    return bt, min(next_pow2(NH), hb), min(next_pow2(NKV), hb)


def head_chunks(NH: int, NKV: int, hbq: int, hbkv: int) -> int:
    """Programs a token of the head-split grid: its q chunks, then its k/v chunks."""
    return cdiv(NH, hbq) + cdiv(NKV, hbkv)


def _check(qkv, NH, NKV, D):
    if D < 2 or D & (D - 1):
        raise ValueError(f"rope_split_store: head_dim must be a power of two, got {D}")
    if qkv.ndim != 2 or qkv.shape[1] != (NH + 2 * NKV) * D:
        raise ValueError(f"rope_split_store: qkv must be [T, {(NH + 2 * NKV) * D}], got "
                         f"{tuple(qkv.shape)}")


def rope_split_store(qkv, input_row_offsets, cache_lengths, lookup_table, freqs_cis, blocks,
                     layer_idx: int, n_heads: int, interleaved: bool = True,
                     q_norm_weight=None, k_norm_weight=None, eps: float = 1e-6,
                     block_t: int | None = None, head_block: int | None = None,
                     split_heads: bool = False, num_warps: int = 4):
    """Fused split/RoPE/store on torch tensors; writes K/V into `blocks` and returns q_roped.

    blocks: [num_pages, 2, num_layers, page_size, n_kv_heads, head_dim]; lookup_table
    [batch, max_pages] and offsets/cache lengths uint32 or int32.
    """
    import torch

    num_pages, two, num_layers, page_size, NKV, D = blocks.shape
    NH = n_heads
    _check(qkv, NH, NKV, D)
    if two != 2 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"rope_split_store: bad blocks shape {tuple(blocks.shape)} or "
                         f"layer_idx {layer_idx}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rope_split_store: give both q_norm_weight and k_norm_weight or neither")
    T = qkv.shape[0]
    batch = input_row_offsets.shape[0] - 1
    q_out = qkv.new_empty((T, NH * D))
    if T == 0:
        return q_out
    as_i32 = lambda x: x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else x
    bt, hbq, hbkv = block_sizes(NH, NKV, D, T, block_t)
    if head_block is not None:  # tests: force several head chunks per program
        hbq = hbkv = head_block
    use_norm = q_norm_weight is not None
    n_chunks = head_chunks(NH, NKV, hbq, hbkv) if split_heads else 1
    rope_split_store_kernel[(cdiv(T, bt), n_chunks)](
        qkv.contiguous(), as_i32(input_row_offsets), as_i32(cache_lengths),
        as_i32(lookup_table), freqs_cis.contiguous(), blocks, q_out,
        q_norm_weight if use_norm else freqs_cis, k_norm_weight if use_norm else freqs_cis,
        T, batch, lookup_table.shape[1], layer_idx, num_layers, float(eps), num_pages,
        freqs_cis.shape[0],
        NH=NH, NKV=NKV, D=D, PAGE_SIZE=page_size, INTERLEAVED=interleaved,
        USE_QK_NORM=use_norm, BLOCK_T=bt, HB_Q=hbq, HB_KV=hbkv, SPLIT_HEADS=split_heads,
        num_warps=num_warps)
    return q_out


def aot_specs(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
              dtype: str = "bfloat16", interleaved: bool = True, use_qk_norm: bool = False,
              freqs_dtype: str = "float32", norm_dtype: str | None = None) -> list[KernelSpec]:
    """The specializations, in the order the lowering tries them: a few tokens with a program
    per head chunk (`decode_heads`, grid (T, chunks); for T x chunks <= SPLIT_PROGRAMS), decode
    (BLOCK_T=1, T <= 1024) and prefill (BLOCK_T=2)."""
    t = triton_dtype(dtype)
    tf = triton_dtype(freqs_dtype)
    tn = triton_dtype(norm_dtype or dtype)
    sig = {"qkv_ptr": f"*{t}", "offs_ptr": "*i32", "cache_len_ptr": "*i32", "lut_ptr": "*i32",
           "freqs_ptr": f"*{tf}", "blocks_ptr": f"*{t}", "q_out_ptr": f"*{t}",
           "q_norm_ptr": f"*{tn}", "k_norm_ptr": f"*{tn}", "T": "i32", "batch": "i32",
           "max_pages": "i32", "layer_idx": "i32", "num_layers": "i32", "eps": "fp32",
           "num_pages": "i32", "rope_rows": "i32"}
    names = ["NH", "NKV", "D", "PAGE_SIZE", "INTERLEAVED", "USE_QK_NORM", "BLOCK_T", "HB_Q",
             "HB_KV", "SPLIT_HEADS"]
    sig.update({n: "constexpr" for n in names})
    specs = []
    for label, bt, elems, split in (("decode_heads", 1, SPLIT_ELEMS, True),
                                    ("decode", 1, TILE_ELEMS, False),
                                    ("prefill", 2, TILE_ELEMS, False)):
        _, hbq, hbkv = block_sizes(n_heads, n_kv_heads, head_dim, block_t=bt, elems=elems)
        chunks = head_chunks(n_heads, n_kv_heads, hbq, hbkv) if split else 1
        vals = [n_heads, n_kv_heads, head_dim, page_size, interleaved, use_qk_norm, bt, hbq,
                hbkv, split]
        specs.append(KernelSpec(
            name=f"rope_split_store_{t}_{label}", fn=rope_split_store_kernel, signature=sig,
            constexprs=dict(zip(names, vals)), num_warps=4, num_stages=1,
            grid=(lambda bt_, c_: lambda T: (cdiv(T, bt_), c_, 1))(bt, chunks),
            grid_args=("T",), divisible_by_16=("qkv_ptr", "freqs_ptr", "blocks_ptr", "q_out_ptr"),
            notes=f"T x {chunks} <= {SPLIT_PROGRAMS}, decode: T <= 1024, prefill otherwise; "
                  "layer_idx < num_layers"))
    return specs
