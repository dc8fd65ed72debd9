"""Multi-head latent attention kernels, part 1: the latent cache store, the prefill plan and the
helpers the attention kernels (mla_decode.py, mla_prefill.py) share.

The latent cache is `blocks [num_pages, KINDS, num_layers, PAGE_SIZE, 1, W]` with W =
kv_lora_rank (R) + qk_rope_head_dim (ROPE), KINDS 1 (latent only) or 2 (the K/V layout, latent
in slot 0): token p of sequence b, layer l is row `((lut[b, p // PAGE_SIZE] * KINDS) *
num_layers + l) * PAGE_SIZE + p % PAGE_SIZE` of the cache seen as `[rows, W]`. Page ids are
clamped into the cache (a bad id reads another page, never memory outside it), positions into
the lookup table's row and the RoPE table, cache lengths into what the lookup table addresses
(once per token or program, never per element); the runtime has checked all of these on the
host before any kernel runs, so valid metadata is never changed.

Sizes that are not powers of two (tests use R = 16, ROPE = 6) are padded to the next power of
two >= 16 (dot operands) with masked loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


def pad(n: int, least: int = 16) -> int:
    """The padded tile extent of a size: the next power of two, at least `least`."""
    p = least
    while p < n:
        p *= 2
    return p


@triton.jit
def latent_rows(lut_ptr, b, pos, valid, max_pages, layer_idx, num_layers, num_pages,
                KINDS: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """int64 row of (sequence b, positions pos) in the latent cache seen as [rows, W]; the
    position is clamped into the lookup table's row, the page id into the cache."""
    pos = tl.minimum(tl.maximum(pos, 0), max_pages * PAGE_SIZE - 1)
    page = tl.load(lut_ptr + b.to(tl.int64) * max_pages + pos // PAGE_SIZE, mask=valid, other=0)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
    return ((page.to(tl.int64) * KINDS) * num_layers + layer_idx) * PAGE_SIZE + pos % PAGE_SIZE


@triton.jit
def latent_block_row(lut_ptr, b, n0, max_pages, layer_idx, num_layers, num_pages,
                     KINDS: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """int64 row of key n0 of sequence b in the latent cache seen as [rows, W], for a block
    start whose block lies in one page: one lookup, its column clamped into the table's row
    and the page id into the cache, so the block's rows stay in one page of the cache whatever
    the metadata."""
    col = tl.minimum(tl.maximum(n0, 0) // PAGE_SIZE, max_pages - 1)
    page = tl.load(lut_ptr + b.to(tl.int64) * max_pages + col)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
    return ((page.to(tl.int64) * KINDS) * num_layers + layer_idx) * PAGE_SIZE + n0 % PAGE_SIZE


@triton.jit
def tile_key_range(clen_ptr, b, tile, part, part_size, n_new, max_pages, NH: tl.constexpr,
                   BLOCK_M: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(cache_len, end, lo, hi) of the decode attention's program for row tile `tile` (BLOCK_M
    (token, head) rows, heads fastest) of a sequence with n_new new tokens, partition `part`:
    the cached length clamped into what the lookup table addresses (defence in depth, valid
    ones unchanged: no loop runs past the table, whatever the metadata), one past the tile's
    last row's position, and the keys [lo, hi) of the partition that its rows may see."""
    cache_len = tl.minimum(tl.maximum(tl.load(clen_ptr + b), 0), max_pages * PAGE_SIZE)
    last = tl.minimum(n_new - 1, (tile * BLOCK_M + BLOCK_M - 1) // NH)
    end = cache_len + last + 1
    lo = part * part_size
    return cache_len, end, lo, tl.minimum(lo + part_size, end)


@triton.jit
def find_sequence_scalar(offs_ptr, t, batch):
    """The sequence of packed row t: the largest b < batch with offs[b] <= t."""
    lo = 0
    hi = batch - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(offs_ptr + mid) <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def mla_cache_store_kernel(kv_ptr, w_ptr, freqs_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr,
                           batch, max_pages, layer_idx, num_layers, num_pages, eps, rope_rows,
                           R: tl.constexpr, ROPE: tl.constexpr, RP: tl.constexpr,
                           HP: tl.constexpr, KINDS: tl.constexpr, PAGE_SIZE: tl.constexpr,
                           INTERLEAVED: tl.constexpr):
    """One program per new token: [rms_norm(c_kv) * w | rope(k_pe)] into its cache row."""
    pdl_wait()
    W: tl.constexpr = R + ROPE
    t = tl.program_id(0)
    b = find_sequence_scalar(offs_ptr, t, batch)
    pos = tl.load(clen_ptr + b) + t - tl.load(offs_ptr + b)
    src = kv_ptr + t.to(tl.int64) * W
    r = tl.arange(0, RP)
    rm = r < R
    c = tl.load(src + r, mask=rm, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(c * c, 0) / R + eps)
    c = c * inv * tl.load(w_ptr + r, mask=rm, other=0.0).to(tl.float32)
    i = tl.arange(0, HP)
    im = i < ROPE // 2
    # The RoPE table row clamped into the table (the cache row is, in latent_rows).
    f = freqs_ptr + tl.minimum(tl.maximum(pos, 0), rope_rows - 1).to(tl.int64) * ROPE
    cos = tl.load(f + 2 * i, mask=im, other=0.0).to(tl.float32)
    sin = tl.load(f + 2 * i + 1, mask=im, other=0.0).to(tl.float32)
    if INTERLEAVED:
        ia, ib = 2 * i, 2 * i + 1
    else:
        ia, ib = i, i + ROPE // 2
    a = tl.load(src + R + ia, mask=im, other=0.0).to(tl.float32)
    bb = tl.load(src + R + ib, mask=im, other=0.0).to(tl.float32)
    row = latent_rows(lut_ptr, b, pos, True, max_pages, layer_idx, num_layers, num_pages, KINDS,
                      PAGE_SIZE)
    dst = blocks_ptr + row * W
    ty = blocks_ptr.dtype.element_ty
    tl.store(dst + r, c.to(ty), mask=rm)
    tl.store(dst + R + ia, (a * cos - bb * sin).to(ty), mask=im)
    tl.store(dst + R + ib, (a * sin + bb * cos).to(ty), mask=im)


@triton.jit
def mla_prefill_plan_kernel(offs_ptr, clen_ptr, rows_ptr, starts_ptr, total_ptr, batch,
                            BLOCK: tl.constexpr):
    """buffer_row_offsets = prefix sums of cached + new tokens, cache_offsets = cache lengths,
    buffer_lengths = the total (one program, BLOCK sequences per step)."""
    pdl_wait()
    carry = tl.sum(tl.zeros((BLOCK,), tl.int32), 0)
    tl.store(rows_ptr, carry)
    for b0 in range(0, batch, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < batch
        c = tl.load(clen_ptr + b, mask=m, other=0)
        n = tl.load(offs_ptr + b + 1, mask=m, other=0) - tl.load(offs_ptr + b, mask=m, other=0)
        tot = tl.where(m, n + c, 0)
        tl.store(rows_ptr + b + 1, tl.cumsum(tot, 0) + carry, mask=m)
        tl.store(starts_ptr + b, c, mask=m)
        carry += tl.sum(tot, 0)
    tl.store(total_ptr, carry)


PLAN_BLOCK = 1024


def cache_store_spec(dtype: str, cache_dtype: str, r: int, rope: int, kinds: int,
                     page_size: int, interleaved: bool, freqs_dtype: str = "float32") -> KernelSpec:
    t, tc, tf = triton_dtype(dtype), triton_dtype(cache_dtype), triton_dtype(freqs_dtype)
    consts = dict(R=r, ROPE=rope, RP=pad(r, 1), HP=pad(rope // 2, 1), KINDS=kinds,
                  PAGE_SIZE=page_size, INTERLEAVED=bool(interleaved))
    sig = {"kv_ptr": f"*{t}", "w_ptr": f"*{t}", "freqs_ptr": f"*{tf}", "offs_ptr": "*i32",
           "clen_ptr": "*i32", "lut_ptr": "*i32", "blocks_ptr": f"*{tc}", "batch": "i32",
           "max_pages": "i32", "layer_idx": "i32", "num_layers": "i32", "num_pages": "i32",
           "eps": "fp32", "rope_rows": "i32", **{k: "constexpr" for k in consts}}
    return KernelSpec(name=f"mla_cache_store_{tc}", fn=mla_cache_store_kernel, signature=sig,
                      constexprs=consts, num_warps=4 if r >= 256 else 1, num_stages=1,
                      grid=lambda T: (T, 1, 1), grid_args=("T",),
                      divisible_by_16=("kv_ptr", "blocks_ptr"))


def prefill_plan_spec() -> KernelSpec:
    sig = {"offs_ptr": "*i32", "clen_ptr": "*i32", "rows_ptr": "*i32", "starts_ptr": "*i32",
           "total_ptr": "*i32", "batch": "i32", "BLOCK": "constexpr"}
    return KernelSpec(name="mla_prefill_plan", fn=mla_prefill_plan_kernel, signature=sig,
                      constexprs={"BLOCK": PLAN_BLOCK}, num_warps=4, num_stages=1,
                      grid=lambda: (1, 1, 1), grid_args=())
