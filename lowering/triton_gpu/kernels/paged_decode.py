"""Decode attention over the paged KV cache: split-K partitions, then a reduce when split.

Each program owns (group of HEADS adjacent KV heads, partition of the context, sequence) and
processes every query head of those KV heads together: HEADS x up to Q_PER_SEQ new tokens
(speculative / few-token decode; token i sits at position cache_len + i and sees the keys up to
itself) x the G = NH/NKV heads of each GQA group form the M side of the dot, so each K/V tile
is read from memory once. With HEADS > 1 a tile row is one (key, KV head) pair, the HEADS head
slices of a key are adjacent in the cache row (HEADS * D contiguous elements), and scores of a
query row against another head's keys are masked: wasted dot work, which decode has to spare,
for longer contiguous reads and HEADS times fewer programs.

The grid is 1-D. ORDER 0 numbers programs KV-head group fastest, so the programs running at
once read neighbouring head slices of the same cache rows (a cache row holds all NKV heads of
one token); ORDER 1 is the older sequence-fastest numbering, kept for comparison.

Keys are read one of three ways (constexprs of a config, see paged_decode_config.py):
  * gather (PAGE_SIZE % BLOCK_N != 0, or PAGED_TILES=0): one lookup-table load per tile row;
  * page tiles (PAGE_SIZE % BLOCK_N == 0): one lookup per block and a dense [BLOCK_N * HEADS,
    D] tile, which the pipeliner turns into cp.async copies several blocks deep;
  * TMA (page tiles + TMA=1, HEADS=1): the same tile through a device-side tensor descriptor over
    the cache viewed as 2-D [num_pages * 2 * num_layers * PAGE_SIZE, NKV * D] (Triton puts the
    descriptor in its global scratch: a launcher passes 128 bytes per program).
Rows of a page past the cache length may hold anything (NaN included): scores of keys outside
[start, end) are masked to -inf and their value rows zeroed, so they never reach the output.

With num_parts == 1 the program normalizes and writes the output itself (no reduce). Otherwise
partials (unnormalized accumulator, running max in log2 units and sum) go to fp32 scratch
`o_part [T*NH, num_parts, D]`, `ml_part [T*NH, num_parts, 2]`; empty partitions write
(0, -1e30, 0), so merging them needs no lengths. MERGE=0: the reduce kernel merges them, one
program per output row, launched (with PDL) while the decode kernel still runs. MERGE=1: each
program then takes a ticket from its (sequence, KV-head group)'s counter in `count_ptr` (int32,
zero before the launch) and the program that takes the last one merges that group's partials
and writes the output, leaving the counter zero for the next launch. No second launch, but a
serial tail (the ticket's and the partials' round trips to L2) after the group's last
partition: the tuner picks the form per bucket (paged_decode_config.CANDIDATES).

SOFTCAP > 0 (a constexpr; 0.0 compiles to the uncapped kernel) caps the scaled scores to
SOFTCAP * tanh(s / SOFTCAP) before the mask (Gemma 2; paged.capped_scores_log2); the reduce
only merges partials and is shared.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg
from graphir.lowering.triton_gpu.kernels.paged import (capped_scores_log2, check_attention_args,
                                                       check_softcap, key_range, mask_allows,
                                                       mask_id)
from graphir.lowering.triton_gpu.kernels.spec import (KernelSpec, cdiv, torch_global_scratch,
                                                      triton_dtype)
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

BLOCK_P = 16


@triton.jit
def attend_blocks(q, qp, hl, b, kvh0, start, end, lut_ptr, blocks_ptr, max_pages, layer_idx,
                  num_layers, num_pages, window, scale, NKV: tl.constexpr, D: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEADS: tl.constexpr, PAGED_TILES: tl.constexpr,
                  TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online softmax of the query tile q [BLOCK_M, D] (row r: position qp[r], local KV head
    hl[r]) over keys start..end-1 of KV heads kvh0..kvh0+HEADS-1 of sequence b.

    A block is BLOCK_N keys x HEADS heads: K/V tile row c holds key n0 + c // HEADS of head
    kvh0 + c % HEADS, so each key's HEADS head slices (adjacent in the cache row) are read
    together; scores of a query row against another head's keys are masked out. With page tiles
    (PAGE_SIZE % BLOCK_N == 0) blocks start at multiples of BLOCK_N, lie in one page (one
    lookup) and are dense; otherwise every row looks its page up. SOFTCAP > 0 caps the scaled
    scores to SOFTCAP * tanh(s / SOFTCAP) (Gemma 2) before the mask.

    Returns (acc, m, l) in fp32: the unnormalized output [BLOCK_M, D], the running max in log2
    units and the running sum, so callers can normalize now or merge partitions later.
    """
    d = tl.arange(0, D)
    c = tl.arange(0, BLOCK_N * HEADS)
    t = c // HEADS
    hk = c % HEADS
    col = t * (NKV * D) + hk * D     # of the tile rows, from the block's first key and head
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    lut_row = lut_ptr + tl.cast(b, tl.int64) * max_pages
    layer_stride: tl.constexpr = PAGE_SIZE * NKV * D
    kv_stride = tl.cast(num_layers, tl.int64) * layer_stride
    if TMA:
        tl.static_assert(HEADS == 1)
        # TMA coordinates are 32-bit: caches of 2**31 rows or more are refused by the host
        # wrapper; the clamp keeps the descriptor inside the buffer whatever the arguments.
        rows = tl.minimum(tl.cast(num_pages, tl.int64) * (2 * PAGE_SIZE) * num_layers,
                          2**31 - 1).to(tl.int32)
        desc = tl.make_tensor_descriptor(blocks_ptr, shape=[rows, NKV * D],
                                         strides=[NKV * D, 1], block_shape=[BLOCK_N, D])
    first = start
    if PAGED_TILES:
        tl.static_assert(PAGE_SIZE % BLOCK_N == 0)
        first = (start // BLOCK_N) * BLOCK_N
    for n0 in range(first, end, BLOCK_N):
        kp = n0 + t
        kmask = (kp >= start) & (kp < end)
        if PAGED_TILES:
            # A bad page id reads some other page, never memory outside the cache.
            page = tl.minimum(tl.maximum(tl.load(lut_row + n0 // PAGE_SIZE), 0), num_pages - 1)
            if TMA:
                row = (page * 2 * num_layers + layer_idx) * PAGE_SIZE + n0 % PAGE_SIZE
                k = desc.load([row, kvh0 * D])
            else:
                base = (page.to(tl.int64) * (2 * kv_stride) + layer_idx.to(tl.int64)
                        * layer_stride + (n0 % PAGE_SIZE) * (NKV * D) + kvh0 * D)
                offs = base + col[:, None] + d[None, :]
                # The whole tile lies in an allocated page: no mask needed to stay in bounds.
                k = tl.load(blocks_ptr + offs)
        else:
            page = tl.load(lut_row + kp // PAGE_SIZE, mask=kmask, other=0)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
            offs = (page.to(tl.int64) * (2 * kv_stride) + layer_idx.to(tl.int64)
                    * layer_stride + (kp % PAGE_SIZE) * (NKV * D) + (kvh0 + hk) * D)
            offs = offs[:, None] + d[None, :]
            k = tl.load(blocks_ptr + offs, mask=kmask[:, None], other=0.0)
        if SOFTCAP > 0:
            # On the natural scale, in fp32, then in log2 units (see capped_scores_log2).
            s = capped_scores_log2(tl.dot(q, tl.trans(k)), scale, SOFTCAP)
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = mask_allows(qp, kp, window, MASK) & kmask[None, :]
        if HEADS > 1:
            ok = ok & (hk[None, :] == hl[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = desc.load([row + num_layers * PAGE_SIZE, kvh0 * D])
            v = tl.where(kmask[:, None], v, 0.0)
        else:
            # Rows past the sequence may hold anything (NaN too): zero them.
            v = tl.load(blocks_ptr + kv_stride + offs, mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _group_rows(offs_ptr, b, kvg, ROWS: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr,
                Q_PER_SEQ: tl.constexpr, HEADS: tl.constexpr, r0=0):
    """Rows r0 .. r0 + ROWS of sequence b's KV-head group kvg: row r is local KV head
    r // (Q_PER_SEQ G), then new token i, then the head's GQA group member. Returns (hl, i,
    which rows are real (rmask), their q/out rows (head_row), the sequence's new tokens)."""
    G: tl.constexpr = NH // NKV
    QG: tl.constexpr = Q_PER_SEQ * G
    seq_start = tl.load(offs_ptr + b)
    seq_len = tl.minimum(tl.load(offs_ptr + b + 1) - seq_start, Q_PER_SEQ)
    r = r0 + tl.arange(0, ROWS)
    hl = r // QG
    i = (r % QG) // G
    rmask = (hl < HEADS) & (i < seq_len)
    head_row = (seq_start + i).to(tl.int64) * NH + (kvg * HEADS + hl) * G + r % G
    return hl, i, rmask, head_row, seq_len


@triton.jit
def _decode_partition(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, max_pages, layer_idx, num_layers,
        num_pages, window, scale, part_size, num_parts,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, Q_PER_SEQ: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HEADS: tl.constexpr, PAGED_TILES: tl.constexpr,
        TMA: tl.constexpr, ORDER: tl.constexpr, SOFTCAP: tl.constexpr):
    """This program's (KV-head group, partition, sequence) attended: (acc, m, l) as
    attend_blocks returns them, the rows' q/out rows (head_row), which rows are real (rmask),
    the partition and the KV-head group (unit within the sequence) and the sequence."""
    pid = tl.program_id(0)
    NKVG: tl.constexpr = NKV // HEADS
    if ORDER == 0:
        kvg = pid % NKVG
        part = (pid // NKVG) % num_parts
        b = pid // (NKVG * num_parts)
    else:
        n_seq = tl.num_programs(0) // (NKVG * num_parts)
        b = pid % n_seq
        kvg = (pid // n_seq) % NKVG
        part = pid // (n_seq * NKVG)
    hl, i, rmask, head_row, seq_len = _group_rows(offs_ptr, b, kvg, BLOCK_M, NH, NKV, Q_PER_SEQ,
                                                  HEADS)
    # Keys clamped into what the lookup-table row addresses (defence in depth: the host checks
    # first, valid metadata is unchanged): no column past the row, no 2**31-key loop. Two
    # scalar ops a program; the page ids are clamped in attend_blocks.
    cache_len = tl.minimum(tl.maximum(tl.load(cache_len_ptr + b), 0), max_pages * PAGE_SIZE)
    kv_len = tl.minimum(cache_len + seq_len, max_pages * PAGE_SIZE)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + head_row[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    qp = cache_len + i
    lo, hi = key_range(cache_len, kv_len - 1, kv_len, window, MASK)
    p_start = tl.maximum(part * part_size, lo)
    # A sequence without new tokens this step reads nothing.
    p_end = tl.where(seq_len > 0, tl.minimum(part * part_size + part_size, hi), p_start)
    acc, m_i, l_i = attend_blocks(q, qp, hl, b, kvg * HEADS, p_start, p_end, lut_ptr,
                                  blocks_ptr, max_pages, layer_idx, num_layers, num_pages,
                                  window, scale, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N,
                                  HEADS, PAGED_TILES, TMA, SOFTCAP)
    return acc, m_i, l_i, head_row, rmask, part, kvg, b


@triton.jit
def _store_partition(out_ptr, o_part_ptr, ml_part_ptr, acc, m_i, l_i, head_row, rmask, part,
                     num_parts, D: tl.constexpr):
    """A partition's result: the normalized output when it is the only one, else its
    unnormalized accumulator and (max, sum) in the partials scratch."""
    d = tl.arange(0, D)
    if num_parts == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + head_row[:, None] * D + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        slot = head_row * num_parts + part
        tl.store(o_part_ptr + slot[:, None] * D + d[None, :], acc, mask=rmask[:, None])
        tl.store(ml_part_ptr + slot * 2, m_i, mask=rmask)
        tl.store(ml_part_ptr + slot * 2 + 1, l_i, mask=rmask)


@triton.jit
def _merge_if_last(offs_ptr, out_ptr, o_part_ptr, ml_part_ptr, count_ptr, b, kvg, num_parts,
                   NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
                   Q_PER_SEQ: tl.constexpr, HEADS: tl.constexpr, MERGE_ROWS: tl.constexpr,
                   MERGE_CHUNK: tl.constexpr, MERGE_UNROLL: tl.constexpr):
    """After a partition's partials are stored: a ticket from the group's counter; the program
    that takes the last one merges the group's num_parts partials into its output rows (HEADS x
    Q_PER_SEQ x G, padded to MERGE_ROWS, MERGE_CHUNK rows at a time) and zeroes the counter."""
    # Every thread's partial stores come before the ticket (one thread takes it, with release
    # semantics at GPU scope); the last taker's acquire makes every group member's stores
    # visible to it, and its threads read them after the ticket's broadcast (a CTA barrier).
    tl.debug_barrier()
    unit = b * (NKV // HEADS) + kvg
    ticket = tl.atomic_add(count_ptr + unit, 1, sem="acq_rel", scope="gpu")
    if ticket == num_parts - 1:
        tl.atomic_xchg(count_ptr + unit, 0, sem="relaxed", scope="gpu")
        d = tl.arange(0, D)
        for r0 in tl.static_range(0, MERGE_ROWS, MERGE_CHUNK):
            _, _, rmask, head_row, _ = _group_rows(offs_ptr, b, kvg, MERGE_CHUNK, NH, NKV,
                                                   Q_PER_SEQ, HEADS, r0)
            # One pass of online rescaling over the partitions, MERGE_UNROLL of them unrolled
            # so that their loads are in flight together (nothing in the loop writes memory).
            # Loads .cg: from L2, where the other programs' stores are (never a stale L1 line).
            m_run = tl.full((MERGE_CHUNK,), -1.0e30, tl.float32)
            l_run = tl.zeros((MERGE_CHUNK,), tl.float32)
            out = tl.zeros((MERGE_CHUNK, D), tl.float32)
            for p in tl.range(0, num_parts, loop_unroll_factor=MERGE_UNROLL):
                slot = head_row * num_parts + p
                m = tl.load(ml_part_ptr + slot * 2, mask=rmask, other=-1.0e30,
                            cache_modifier=".cg")
                l = tl.load(ml_part_ptr + slot * 2 + 1, mask=rmask, other=0.0,
                            cache_modifier=".cg")
                o = tl.load(o_part_ptr + slot[:, None] * D + d[None, :], mask=rmask[:, None],
                            other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_run, m)
                alpha = tl.exp2(m_run - m_new)
                w = tl.exp2(m - m_new)
                l_run = l_run * alpha + l * w
                out = out * alpha[:, None] + o * w[:, None]
                m_run = m_new
            out = out / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
            tl.store(out_ptr + head_row[:, None] * D + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def paged_decode_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, o_part_ptr, ml_part_ptr,
        count_ptr, max_pages, layer_idx, num_layers, num_pages, window, scale, part_size,
        num_parts, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, MASK: tl.constexpr, Q_PER_SEQ: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
        PAGED_TILES: tl.constexpr, TMA: tl.constexpr, ORDER: tl.constexpr,
        MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
        MERGE_UNROLL: tl.constexpr, SOFTCAP: tl.constexpr):
    pdl_wait()
    acc, m_i, l_i, head_row, rmask, part, kvg, b = _decode_partition(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, max_pages, layer_idx, num_layers,
        num_pages, window, scale, part_size, num_parts, NH, NKV, D, PAGE_SIZE, MASK, Q_PER_SEQ,
        BLOCK_M, BLOCK_N, HEADS, PAGED_TILES, TMA, ORDER, SOFTCAP)
    _store_partition(out_ptr, o_part_ptr, ml_part_ptr, acc, m_i, l_i, head_row, rmask, part,
                     num_parts, D)
    if MERGE:
        if num_parts > 1:
            _merge_if_last(offs_ptr, out_ptr, o_part_ptr, ml_part_ptr, count_ptr, b, kvg,
                           num_parts, NH, NKV, D, Q_PER_SEQ, HEADS, MERGE_ROWS, MERGE_CHUNK,
                           MERGE_UNROLL)


@triton.jit
def paged_decode_reduce_kernel(o_part_ptr, ml_part_ptr, out_ptr, num_parts, D: tl.constexpr,
                               BLOCK_P: tl.constexpr):
    pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    m_run = tl.max(tl.full((BLOCK_P,), -1.0e30, tl.float32), 0)
    l_run = tl.sum(tl.zeros((BLOCK_P,), tl.float32), 0)
    acc = tl.zeros((D,), tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < num_parts
        slot = row * num_parts + p
        m = tl.load(ml_part_ptr + slot * 2, mask=pm, other=-1.0e30)
        l = tl.load(ml_part_ptr + slot * 2 + 1, mask=pm, other=0.0)
        o = tl.load(o_part_ptr + slot[:, None] * D + d[None, :], mask=pm[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new)
        l_run = l_run * alpha + tl.sum(l * w, 0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def paged_decode(q, input_row_offsets, cache_lengths, lookup_table, blocks, layer_idx: int,
                 mask="CAUSAL", window: int = 0, scale: float | None = None,
                 max_kv_len: int | None = None, q_per_seq: int = 1, config: dict | None = None,
                 num_parts: int | None = None, softcap: float | None = None):
    """Decode attention on torch tensors; q [T, NH, D] with <= q_per_seq rows per sequence.

    Args:
        q: queries [T, NH, D], the new tokens of every sequence in order.
        input_row_offsets: [batch + 1] start row of each sequence in q (uint32 or int).
        cache_lengths: [batch] tokens cached before this step's new tokens.
        lookup_table: [batch, max_pages] page ids.
        blocks: the cache [num_pages, 2, num_layers, page_size, NKV, D].
        layer_idx: which layer of the cache to read.
        mask: mask variant name or number; window: its window (sliding / chunked masks).
        scale: softmax scale (default head_dim ** -0.5).
        max_kv_len: the split rule's context length (default: the longest cache + new tokens).
        q_per_seq: the most new tokens of any sequence the kernel is built for.
        config: a kernel config (paged_decode_config.CANDIDATES entry; default_config when None).
        num_parts: force this many partitions instead of the split rule.
        softcap: cap the scaled scores to softcap * tanh(s / softcap) (Gemma 2); None: no cap.

    Returns:
        The attention output [T, NH * D] in q's dtype.

    Example:
        >>> out = paged_decode(q, offs, clen, lut, blocks, 0)    # doctest: +SKIP
    """
    import torch

    T, NH, D = q.shape
    num_layers, page_size, NKV, m = check_attention_args("paged_decode", q, blocks, mask, window)
    offs = input_row_offsets.to(torch.int64)
    lens = offs[1:] - offs[:-1]
    batch = lens.shape[0]
    if batch and int(lens.max()) > q_per_seq:
        raise ValueError(f"paged_decode: a sequence has {int(lens.max())} new tokens, more "
                         f"than q_per_seq={q_per_seq}")
    conf = cfg.resolve(config, NH, NKV, D, page_size, q_per_seq)
    if max_kv_len is None:
        max_kv_len = int((cache_lengths.to(torch.int64) + lens).max()) if batch else 1
    nparts, part = cfg.split(batch, NKV, max_kv_len, conf)
    if num_parts is not None:
        if num_parts < 1:
            raise ValueError(f"paged_decode: num_parts must be >= 1, got {num_parts}")
        bn = conf["BLOCK_N"]
        part = cdiv(cdiv(max(max_kv_len, 1), num_parts), bn) * bn
        nparts = cdiv(max(max_kv_len, 1), part)
    out = q.new_empty((T, NH * D))
    if T == 0:
        return out
    units = batch * (NKV // conf["HEADS"])
    if nparts > 1:
        o_part = torch.empty((T * NH, nparts, D), dtype=torch.float32, device=q.device)
        ml_part = torch.empty((T * NH, nparts, 2), dtype=torch.float32, device=q.device)
    else:
        o_part = ml_part = torch.empty(1, dtype=torch.float32, device=q.device)
    merges = nparts > 1 and conf["MERGE"]
    count = torch.zeros(units if merges else 1, dtype=torch.int32, device=q.device)
    if conf["PAGED_TILES"] and conf["TMA"] and blocks.numel() // (NKV * D) >= 2**31:
        raise ValueError(f"paged_decode: a cache of {blocks.numel() // (NKV * D)} rows is too "
                         "large for the TMA config (2**31 rows at most)")
    if conf["TMA"] and q.device.type == "cuda":
        torch_global_scratch(q.device)
    as_i32 = lambda x: x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else x
    paged_decode_kernel[(units * nparts,)](
        q.contiguous(), as_i32(input_row_offsets), as_i32(cache_lengths), as_i32(lookup_table),
        blocks, out, o_part, ml_part, count, lookup_table.shape[1], layer_idx, num_layers,
        blocks.shape[0], max(window, 1), float(D ** -0.5 if scale is None else scale), part,
        nparts, **cfg.constexprs(conf, NH, NKV, D, page_size, m, q_per_seq),
        SOFTCAP=check_softcap(softcap),
        num_warps=conf["num_warps"], num_stages=conf["num_stages"])
    if nparts > 1 and not merges:
        paged_decode_reduce_kernel[(T * NH,)](o_part, ml_part, out, nparts, D=D,
                                              BLOCK_P=BLOCK_P, num_warps=4)
    return out


def aot_specs(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
              dtype: str = "bfloat16", mask="CAUSAL", q_per_seq: int = 1,
              config: dict | None = None, softcap: float | None = None) -> list[KernelSpec]:
    """The decode kernel (for q_per_seq new tokens per sequence at most) and the reduce.
    With `softcap` the decode kernel caps its scores ("_softcap" in its name, SOFTCAP among its
    constexprs) and keeps the config of its uncapped twin; the reduce is shared.

    Launch: (num_parts, part_size) = paged_decode_config.split(batch, n_kv_heads, max_kv_len,
    config); decode grid batch * (n_kv_heads / HEADS) * num_parts; when num_parts > 1 it takes
    scratch o_part T*NH*num_parts*D fp32, ml_part T*NH*num_parts*2 and, for a MERGE config,
    count: batch * n_kv_heads int32, zero when allocated (each launch leaves it zero), and
    merges the partials itself; otherwise the reduce follows over T * n_heads rows.
    """
    t = triton_dtype(dtype)
    m = mask_id(mask)
    conf = cfg.resolve(config, n_heads, n_kv_heads, head_dim, page_size, q_per_seq)
    sig = {"q_ptr": f"*{t}", "offs_ptr": "*i32", "cache_len_ptr": "*i32", "lut_ptr": "*i32",
           "blocks_ptr": f"*{t}", "out_ptr": f"*{t}", "o_part_ptr": "*fp32",
           "ml_part_ptr": "*fp32", "count_ptr": "*i32", "max_pages": "i32", "layer_idx": "i32",
           "num_layers": "i32", "num_pages": "i32", "window": "i32", "scale": "fp32",
           "part_size": "i32", "num_parts": "i32"}
    consts = dict(cfg.constexprs(conf, n_heads, n_kv_heads, head_dim, page_size, m, q_per_seq),
                  SOFTCAP=check_softcap(softcap))
    sig.update({n: "constexpr" for n in consts})
    # Named by the query tile and the heads per program: kernels for one token and for a few
    # that share its tile height are the same name (the spec key tells them apart).
    tall = cfg.block_m(n_heads, n_kv_heads, q_per_seq) > cfg.block_m(n_heads, n_kv_heads, 1)
    qs = (f"_q{q_per_seq}" if tall else "") + (f"_h{conf['HEADS']}" if conf["HEADS"] > 1 else "")
    units = n_kv_heads // conf["HEADS"]
    main = KernelSpec(
        name=f"paged_decode_partial_{t}_mask{m}{qs}{'_softcap' if softcap else ''}",
        fn=paged_decode_kernel, signature=sig,
        constexprs=consts, num_warps=conf["num_warps"], num_stages=conf["num_stages"],
        grid=lambda batch, max_kv_len: (
            batch * units * cfg.split(batch, n_kv_heads, max_kv_len, conf)[0], 1, 1),
        grid_args=("batch", "max_kv_len"),
        divisible_by_16=("q_ptr", "blocks_ptr", "out_ptr", "o_part_ptr", "ml_part_ptr"),
        notes="part_size, num_parts = paged_decode_config.split(...); window >= 1; "
              "o_part/ml_part/count may be null when num_parts == 1",
        extra={"config": cfg.public(conf)})
    rsig = {"o_part_ptr": "*fp32", "ml_part_ptr": "*fp32", "out_ptr": f"*{t}",
            "num_parts": "i32", "D": "constexpr", "BLOCK_P": "constexpr"}
    reduce = KernelSpec(
        name=f"paged_decode_reduce_{t}", fn=paged_decode_reduce_kernel, signature=rsig,
        constexprs={"D": head_dim, "BLOCK_P": BLOCK_P}, num_warps=4, num_stages=1,
        grid=lambda T: (T * n_heads, 1, 1), grid_args=("T",),
        divisible_by_16=("o_part_ptr", "ml_part_ptr", "out_ptr"))
    return [main, reduce]
