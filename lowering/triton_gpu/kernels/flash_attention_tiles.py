"""A persistent prefill program's tiles: what each reads from memory, its key blocks, and the
ring through which a DYN config's loader warp hands the tiles and their facts to the consumer
warpgroups (flash_attention_persistent.py; the chained consumers, flash_attention_chain.py,
take them the same way)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import _key_blocks_at, _ws_release
from graphir.lowering.triton_gpu.kernels.paged import L2_GROUP_BYTES, lpt_tile, sequence_rows


@gluon.jit
def _tile_facts(offs_ptr, cache_len_ptr, t, n_m, T, NH: gl.constexpr, NKV: gl.constexpr,
                D: gl.constexpr, BLOCK_M: gl.constexpr):
    """Tile t of the longest-first order: its (query tile, head, sequence) and what it reads
    from memory, (first row, rows, cached length) of its sequence, the rows clamped as in
    flash_prefill_kernel."""
    pid_m, h, b = lpt_tile(t, n_m, NH, NKV, D, BLOCK_M, L2_GROUP_BYTES)
    seq_start, seq_len = sequence_rows(offs_ptr, b, T)
    return pid_m, h, b, seq_start, seq_len, gl.load(cache_len_ptr + b)


@gluon.jit
def _tile(pid_m, h, b, seq_len, cache_len, max_pages, window, PAGE_SIZE: gl.constexpr,
          MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """A tile given its _tile_facts: (pid_m, h, b, kv_len, q_lo, start, end, full_lo,
    full_hi, n_blocks), n_blocks 0 for a tile past its sequence's rows (no memory read).
    (Integer arithmetic only: lpt_tile's divisions are the loader's, in _tile_facts.)"""
    kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _key_blocks_at(
        cache_len, pid_m, seq_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
    n_blocks = gl.where(pid_m * BLOCK_M < seq_len, n_blocks, 0)
    return pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks


# Slots of the DYN tile ring: the loader may post this many tiles ahead of the consumers.
TILE_SLOTS = gl.constexpr(4)
# int32 facts a slot: the tile, its sequence's first row, rows and cached length, its query
# tile and head (so the consumers run no lpt_tile: its divisions were on their path at each
# tile's start, within the ~0.35 key-block times from taking a tile to starting it;
# tools/gpu_sweeps/prefill_timeline.py), two spare.
FACTS = gl.constexpr(8)


@gluon.jit
def _post_tile(tile_ids, tile_ready, tile_empty, n, t, pid_m, h, seq_start, seq_len,
               cache_len):
    """The loader hands tile t, its n-th, and its facts to both consumer warpgroups (in a slot
    they have released: a fresh barrier has completed the phase of parity 1)."""
    slot = n % TILE_SLOTS
    mbarrier.wait(tile_empty.index(slot), ((n // TILE_SLOTS) & 1) ^ 1)
    i = gl.arange(0, FACTS, layout=gl.BlockedLayout([FACTS], [32], [1], [0]))
    facts = gl.where(i == 0, t, gl.where(i == 1, seq_start, gl.where(i == 2, seq_len, gl.where(
        i == 3, cache_len, gl.where(i == 4, pid_m, h)))))
    tile_ids.index(slot).store(facts)
    _ws_release(tile_ready, slot)


@gluon.jit
def _take_tile(tile_ids, tile_ready, tile_empty, n):
    """A consumer warpgroup's n-th tile from the loader and its facts: (t, pid_m, h,
    seq_start, seq_len, cache_len); then the slot is released."""
    slot = n % TILE_SLOTS
    mbarrier.wait(tile_ready.index(slot), (n // TILE_SLOTS) & 1)
    lay: gl.constexpr = gl.BlockedLayout([FACTS], [32], [4], [0])
    facts = tile_ids.index(slot).load(lay)
    i = gl.arange(0, FACTS, layout=lay)
    t = gl.sum(gl.where(i == 0, facts, 0), 0)
    seq_start = gl.sum(gl.where(i == 1, facts, 0), 0)
    seq_len = gl.sum(gl.where(i == 2, facts, 0), 0)
    cache_len = gl.sum(gl.where(i == 3, facts, 0), 0)
    pid_m = gl.sum(gl.where(i == 4, facts, 0), 0)
    h = gl.sum(gl.where(i == 5, facts, 0), 0)
    _ws_release(tile_empty, slot)
    return t, pid_m, h, seq_start, seq_len, cache_len
