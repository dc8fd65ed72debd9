"""Shared Triton helpers: token -> sequence search, paged KV-cache addressing, attention masks,
online softmax over paged keys.

Cache layout: blocks[num_pages, 2, num_layers, PAGE_SIZE, NKV, D]; token p of sequence b for
layer l lives at blocks[lut[b, p // PAGE_SIZE], kv, l, p % PAGE_SIZE, head, :]. Offsets are
int64: a cache of a few GiB exceeds 2**31 elements.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Mask variants, numbered like MHAMaskVariant's members in graphir.
MASK_NULL = 0
MASK_CAUSAL = 1
MASK_SLIDING_WINDOW_CAUSAL = 2
MASK_SLIDING_WINDOW_NONCAUSAL = 3
MASK_CHUNKED_CAUSAL = 4
MASK_NAMES = {"NULL": MASK_NULL, "CAUSAL": MASK_CAUSAL,
              "SLIDING_WINDOW_CAUSAL": MASK_SLIDING_WINDOW_CAUSAL,
              "SLIDING_WINDOW_NONCAUSAL": MASK_SLIDING_WINDOW_NONCAUSAL,
              "CHUNKED_CAUSAL": MASK_CHUNKED_CAUSAL}


def mask_id(mask) -> int:
    """Mask number from a name ('CAUSAL', ...) or an int."""
    if isinstance(mask, int):
        if mask not in MASK_NAMES.values():
            raise ValueError(f"unknown mask variant number {mask}")
        return mask
    name = getattr(mask, "name", mask)
    if name not in MASK_NAMES:
        raise ValueError(f"unknown mask variant {mask!r}; expected one of {sorted(MASK_NAMES)}")
    return MASK_NAMES[name]


def check_attention_args(who: str, q, blocks, mask, window: int) -> tuple[int, int, int, int]:
    """(num_layers, page_size, n_kv_heads, mask number) of q [T, NH, D] attending over blocks
    [num_pages, 2, num_layers, page_size, NKV, D]; ValueErrors start with `who`."""
    T, NH, D = q.shape
    num_pages, two, num_layers, page_size, NKV, Dc = blocks.shape
    if Dc != D or NH % NKV or two != 2:
        raise ValueError(f"{who}: q {tuple(q.shape)} does not match blocks "
                         f"{tuple(blocks.shape)} (head_dim, NH % NKV == 0)")
    if D < 16 or D & (D - 1):
        raise ValueError(f"{who}: head_dim must be a power of two >= 16, got {D}")
    m = mask_id(mask)
    if m >= 2 and window <= 0:
        raise ValueError(f"{who}: mask {mask} needs window > 0, got {window}")
    return num_layers, page_size, NKV, m


def check_softcap(softcap) -> float:
    """The SOFTCAP constexpr of a softcap attribute: 0.0 for None (no cap), else a float > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or \
            not softcap > 0:
        raise ValueError(f"attention: softcap must be None or a float > 0, got {softcap!r}")
    return float(softcap)


# Bytes of K and V that the heads of one group of the longest-first tile order may hold in L2
# (the H200's is 50 MB, in two halves; an order with all heads of four 4096-token sequences in
# flight at once, 64 MB, lost 11% against the grid's own order without a mask).
L2_GROUP_BYTES = tl.constexpr(8 << 20)


@triton.jit
def sequence_rows(offs_ptr, b, T):
    """(first row, row count) of sequence b in the packed rows, clamped into [0, T) and never
    negative (defence in depth: the runtime checks the offsets on the host first; valid ones
    are unchanged), so bad offsets move no q / out access outside the buffers."""
    seq_start = tl.minimum(tl.maximum(tl.load(offs_ptr + b), 0), T)
    seq_len = tl.minimum(tl.maximum(tl.load(offs_ptr + b + 1), seq_start), T) - seq_start
    return seq_start, seq_len


@triton.jit
def tile_order(NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               LPT: tl.constexpr, GROUP_BYTES: tl.constexpr = L2_GROUP_BYTES):
    """(query tile, head, sequence) of a prefill program on the grid (query tiles, heads,
    sequences). The grid's own order takes a head's query tiles side by side, last tile first.
    LPT renumbers the programs longest-first (lpt_tile): a bijection of the grid's programs."""
    n_m = tl.num_programs(0)
    if LPT:
        lin = tl.program_id(0) + n_m * (tl.program_id(1) + NH * tl.program_id(2))
        pid_m, h, b = lpt_tile(lin, n_m, NH, NKV, D, BLOCK_M, GROUP_BYTES)
    else:
        pid_m = n_m - 1 - tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
    return pid_m, h, b


@triton.jit
def lpt_tile(lin, n_m, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
             BLOCK_M: tl.constexpr, GROUP_BYTES: tl.constexpr):
    """(query tile, head, sequence) of tile number `lin` of n_m query tiles x NH heads x the
    sequences, numbered longest-first: sequence slowest, then groups of heads whose K/V fit
    GROUP_BYTES (a whole number of KV heads), then the query tile, last first (under a causal
    mask it sees the most keys), head fastest; so the last wave holds short tiles and the heads
    running side by side share K/V in L2."""
    # A KV head's keys and values for the longest sequence's new tokens (a cached prefix adds
    # to it, which only makes a group a little too large); int64: no overflow.
    kv_head_bytes = n_m.to(tl.int64) * (BLOCK_M * D * 4)
    kv_heads = tl.minimum(tl.maximum(GROUP_BYTES // kv_head_bytes, 1), NKV).to(tl.int32)
    heads = kv_heads * (NH // NKV)
    r = lin % (n_m * NH)
    g = r // (n_m * heads)
    r = r % (n_m * heads)
    in_group = tl.minimum(heads, NH - g * heads)  # the last group may be short
    return n_m - 1 - r // in_group, g * heads + r % in_group, lin // (n_m * NH)


@triton.jit
def find_sequence(offs_ptr, t, batch):
    """Largest b in [0, batch) with offs[b] <= t, elementwise over the token ids t."""
    lo = tl.zeros_like(t)
    hi = tl.zeros_like(t) + (batch - 1)
    steps = 0
    while (1 << steps) < batch:
        steps += 1
    for _ in range(0, steps):
        active = lo < hi
        mid = (lo + hi + 1) // 2
        v = tl.load(offs_ptr + mid, mask=active, other=0)
        go = v <= t
        lo = tl.where(active & go, mid, lo)
        hi = tl.where(active & (~go), mid - 1, hi)
    return lo


@triton.jit
def slot_offsets(lut_ptr, b, pos, max_pages, layer_idx, num_layers, valid, KV: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, num_pages=None):
    """Element offset of (token pos of sequence b, head 0, dim 0) in the K (KV=0) or V blocks.

    With num_pages (every shipped kernel passes it) the position is clamped into the lookup
    table's row and a page id outside the cache replaced by page 0, once per token: bad
    metadata that bypassed the host checks reads or writes some other slot, never memory
    outside the table or the cache.
    Valid metadata is unchanged. None keeps the unclamped round-1 code (tools/gpu_sweeps).
    """
    if num_pages is not None:
        pos = tl.minimum(tl.maximum(pos, 0), max_pages * PAGE_SIZE - 1)
    page = tl.load(lut_ptr + tl.cast(b, tl.int64) * max_pages + pos // PAGE_SIZE, mask=valid, other=0)
    if num_pages is not None:
        # A bad id (negative or past the cache, compared unsigned) reads / writes page 0. This
        # select keeps the prefill rope_split_store at 32 registers; min(max(...)) took 40.
        page = tl.where(page.to(tl.uint32) < num_pages.to(tl.uint32), page, 0)
    slot = pos % PAGE_SIZE
    layer_stride = PAGE_SIZE * NKV * D
    kv_stride = tl.cast(num_layers, tl.int64) * layer_stride
    return (page.to(tl.int64) * (2 * kv_stride) + KV * kv_stride
            + tl.cast(layer_idx, tl.int64) * layer_stride + slot * (NKV * D))


@triton.jit
def mask_allows(qp, kp, window, MASK: tl.constexpr):
    """Boolean [M, N] tile: may query position qp[:, None] attend key position kp[None, :]."""
    q = qp[:, None]
    k = kp[None, :]
    if MASK == 0:
        ok = k >= 0
    elif MASK == 1:
        ok = k <= q
    elif MASK == 2:
        ok = (k <= q) & (q - k < window)
    elif MASK == 3:
        ok = q - k < window
    else:
        ok = (k <= q) & ((k // window) == (q // window))
    return ok


@triton.jit
def key_range(q_lo, q_hi, kv_len, window, MASK: tl.constexpr):
    """[start, end) of key positions that queries at positions q_lo..q_hi may see."""
    start = q_lo * 0
    end = kv_len
    if MASK == 1:
        end = tl.minimum(kv_len, q_hi + 1)
    elif MASK == 2:
        end = tl.minimum(kv_len, q_hi + 1)
        start = tl.maximum(q_lo - window + 1, 0)
    elif MASK == 3:
        start = tl.maximum(q_lo - window + 1, 0)
    elif MASK == 4:
        end = tl.minimum(kv_len, q_hi + 1)
        start = (q_lo // window) * window
    return start, end


@triton.jit
def capped_scores_log2(s, scale, SOFTCAP: tl.constexpr):
    """Raw scores s = q . k (fp32) -> SOFTCAP * tanh(s * scale / SOFTCAP) * log2(e): Gemma 2's
    logit soft-cap, in the log2 units of the exp2 softmax.

    The cap applies to the natural-scale scores s * scale, so log2(e) cannot be folded into the
    scale as the uncapped path does (tanh is not linear): it multiplies the capped value. Triton
    3.6 has no tl.tanh, and libdevice does not run in the interpreter, so tanh(x) = 2 / (1 +
    e^(-2x)) - 1 with e^(-2x) = exp2(-2 log2(e) x): for x -> -inf the exp2 goes to +inf and
    the quotient to 0 (tanh -> -1), for x -> +inf to 0 (tanh -> 1), never inf / inf. Near x = 0
    the absolute error stays ~1e-7 (what a softmax feels). This form (no |x|, no sign select;
    Triton divides fp32 with div.full.f32) keeps the capped 128-register prefill to a few
    spilled scalars; the sign-restored (1 - t) / (1 + t), t = e^(-2|x|), spilled 14 registers
    per edge block (sm_90 offline compile).
    """
    e = tl.exp2(s * (scale * (-2.0 * 1.4426950408889634 / SOFTCAP)))
    r = 1.0 / (1.0 + e)
    return r * (2.0 * SOFTCAP * 1.4426950408889634) - SOFTCAP * 1.4426950408889634


@triton.jit
def attend_paged_keys(q, qp, b, kvh, start, end, lut_ptr, blocks_ptr, max_pages, layer_idx,
                      num_layers, window, scale, NKV: tl.constexpr, D: tl.constexpr,
                      PAGE_SIZE: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Online softmax of the query tile q [BLOCK_M, D] (positions qp) over the cached keys
    start..end-1 of KV head kvh of sequence b, BLOCK_N keys per step.

    Returns (acc, m, l) in fp32: the unnormalized output [BLOCK_M, D], the running max in log2
    units and the running sum, so callers can normalize now or merge partitions later.
    """
    d = tl.arange(0, D)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    v_shift = tl.cast(num_layers, tl.int64) * (PAGE_SIZE * NKV * D)
    for n0 in range(start, end, BLOCK_N):
        kp = n0 + tl.arange(0, BLOCK_N)
        kmask = kp < end
        kbase = slot_offsets(lut_ptr, b, kp, max_pages, layer_idx, num_layers, kmask, 0,
                             PAGE_SIZE, NKV, D) + kvh * D
        k = tl.load(blocks_ptr + kbase[:, None] + d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = mask_allows(qp, kp, window, MASK) & kmask[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(blocks_ptr + (kbase + v_shift)[:, None] + d[None, :], mask=kmask[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def full_key_range(q_lo, q_hi, kv_len, window, MASK: tl.constexpr):
    """[lo, hi) of key positions that every query at positions q_lo..q_hi may see (lo >= hi
    when none is shared): key blocks inside it need no mask arithmetic."""
    lo = q_lo * 0
    hi = kv_len
    if MASK == 1:
        hi = q_lo + 1
    elif MASK == 2:
        lo = q_hi - window + 1
        hi = q_lo + 1
    elif MASK == 3:
        lo = q_hi - window + 1
    elif MASK == 4:
        lo = (q_hi // window) * window
        hi = q_lo + 1
    return tl.maximum(lo, 0), tl.minimum(hi, kv_len)


@triton.jit
def page_block_row(lut_ptr, b, n0, max_pages, layer_idx, num_layers, KV: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, num_pages=None, CHECK_PAGE: tl.constexpr = True):
    """Row of key n0 of sequence b in the cache viewed as 2-D [num_pages * 2 * num_layers *
    PAGE_SIZE, NKV * D] (int64): one lookup-table load for a block that stays in one page.

    With num_pages (every shipped kernel passes it) the lookup-table column is clamped, once
    per block, and with CHECK_PAGE a page id outside the cache is replaced by page 0: n0 >= 0
    keeps the block's slot a multiple of its size inside the page, so the whole block stays in
    the cache whatever the metadata. A TMA load needs no page check (CHECK_PAGE=False): the
    hardware bounds-checks each box against the descriptor, whose shape is the cache's, and
    zero-fills rows outside it (the check there spilled 24-40 more bytes in the sliding-window
    prefill). Valid metadata is unchanged. None keeps the unclamped round-1 code
    (tools/gpu_sweeps)."""
    if num_pages is not None:
        n0 = tl.maximum(n0, 0)
        page = tl.load(lut_ptr + tl.cast(b, tl.int64) * max_pages
                       + tl.minimum(n0 // PAGE_SIZE, max_pages - 1))
        if CHECK_PAGE:
            page = tl.where(page.to(tl.uint32) < num_pages.to(tl.uint32), page, 0)
    else:
        page = tl.load(lut_ptr + tl.cast(b, tl.int64) * max_pages + n0 // PAGE_SIZE)
    return ((page.to(tl.int64) * 2 + KV) * num_layers + layer_idx) * PAGE_SIZE + n0 % PAGE_SIZE
