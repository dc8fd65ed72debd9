"""Persistent form of the warp-specialized Gluon prefill kernel (flash_attention_wgmma.py).

One program per SM walks the query tiles in the longest-first order (paged.lpt_tile), striding
by the grid: tile t = program, program + grid, ... The loader warp runs ahead into the next
tile while the consumer warpgroups finish the current one, so a tile's first K/V loads, its
query load and its page lookups overlap the previous tile's last products and output stores,
and the TMA descriptor, the shared memory and the mbarriers are set up once per SM instead of
once per tile. What it is for: short or causal prefill (B4 x 2048 causal ran 0.82x SDPA with
one program per tile, where the per-program setup and the tail of each program are a larger
share of the work; FlashAttention-3 takes its tiles the same way).

Ring bookkeeping across tiles: the loader and both consumers count key blocks from the
program's first tile on (`it`), so slot and parity are those of the global block index; each
works out every tile's key-block range with the same pure function (`_tile`), so they agree.
Every K and V slot a block fills is released once (the last block's V too, unlike the one-tile
kernel, which may leave it). The V-tail fix waits in the parity of the fixes done so far.

A tuner config (`..persist`, flash_attention_configs.py): flash_attention.aot_specs turns a
one-tile spec into this form (`as_persistent`): the one-tile kernel's arguments plus n_m (query
tiles of the longest sequence) and n_b (sequences), a 1-D grid of min(tiles, NUM_SMS) programs
(the plan writes that grid and those two arguments: lowerings/attention.py). Gluon has no
interpreter: Triton's runs the persistent Triton kernel below in its place (same arguments,
grid and tile order); the Gluon kernel is compiled offline for sm_90 in CI
(tests/lowering/triton_gpu/test_flash_attention_aot.py) and checked on the GPU by
tests/gpu/test_flash_wgmma_gpu.py.
"""

from __future__ import annotations

from dataclasses import replace

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared

from graphir.lowering.triton_gpu.kernels.flash_attention import flash_prefill_kernel, prefill_tile
from graphir.lowering.triton_gpu.kernels.flash_attention_deep import _ws_attend_deep
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
    LOADER_REGS, _key_blocks, _kv_descriptor, _ws_attend, _ws_load_tile, _ws_rings, _ws_store,
    flash_prefill_ws_kernel)
from graphir.lowering.triton_gpu.kernels.paged import L2_GROUP_BYTES, lpt_tile, sequence_rows
from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, KernelSpec, cdiv
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


@gluon.jit
def _tile(offs_ptr, cache_len_ptr, t, n_m, T, max_pages, window, NH: gl.constexpr,
          NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr, MASK: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t of the longest-first order: (pid_m, h, b, seq_start, seq_len, kv_len, q_lo, start,
    end, full_lo, full_hi, n_blocks), n_blocks 0 for a tile past its sequence's rows. Metadata
    clamped as in flash_prefill_kernel."""
    pid_m, h, b = lpt_tile(t, n_m, NH, NKV, D, BLOCK_M, L2_GROUP_BYTES)
    seq_start, seq_len = sequence_rows(offs_ptr, b, T)
    kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _key_blocks(
        cache_len_ptr, b, pid_m, seq_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
    n_blocks = gl.where(pid_m * BLOCK_M < seq_len, n_blocks, 0)
    return (pid_m, h, b, seq_start, seq_len, kv_len, q_lo, start, end, full_lo, full_hi,
            n_blocks)


@gluon.jit
def _wsp_loader(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, offs_ptr,
                cache_len_ptr, lut_ptr, n_m, n_b, T, max_pages, window, layer_idx, num_layers,
                num_pages, NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
                PAGE_SIZE: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    it = 0
    for t in range(gl.program_id(0), n_m * NH * n_b, gl.num_programs(0)):
        (pid_m, h, b, seq_start, seq_len, kv_len, q_lo, start, end, full_lo, full_hi,
         n_blocks) = _tile(offs_ptr, cache_len_ptr, t, n_m, T, max_pages, window, NH, NKV, D,
                           PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
        _ws_load_tile(desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, lut_ptr, b,
                      h // (NH // NKV), start, n_blocks, it, max_pages, layer_idx, num_layers,
                      num_pages, D, PAGE_SIZE, BLOCK_N, STAGES)
        it += n_blocks


@gluon.jit
def _wsp_consumer(q_ptr, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
                  out_ptr, offs_ptr, cache_len_ptr, n_m, n_b, T, max_pages, window, scale,
                  WG: gl.constexpr, NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
                  PAGE_SIZE: gl.constexpr, MASK: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, DEEP: gl.constexpr):
    ROWS: gl.constexpr = BLOCK_M // 2
    TPW_D: gl.constexpr = D // 8
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    q = q_smem.slice(WG * ROWS, ROWS)
    it = 0
    nfix = 0
    for t in range(gl.program_id(0), n_m * NH * n_b, gl.num_programs(0)):
        (pid_m, h, b, seq_start, seq_len, kv_len, q_lo, start, end, full_lo, full_hi,
         n_blocks) = _tile(offs_ptr, cache_len_ptr, t, n_m, T, max_pages, window, NH, NKV, D,
                           PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
        if n_blocks > 0:
            # This warpgroup's query rows (rows past the sequence zero). The previous tile's
            # products that read q have all been waited for.
            q.store(_q_rows(q_ptr, seq_start, seq_len, pid_m * BLOCK_M + WG * ROWS, h, NH, D,
                            ROWS, ld_layout))
            fence_async_shared()
            gl.thread_barrier()
            # (The turn barrier is not used without ping-pong: `fixed` stands in for it.)
            if DEEP:
                o, l_i = _ws_attend_deep(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                                         fixed, it, nfix & 1, q_lo, kv_len, start, end, full_lo,
                                         full_hi, n_blocks, window, scale, WG, D, MASK, BLOCK_N,
                                         STAGES)
            else:
                o, l_i = _ws_attend(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                                    fixed, fixed, it, nfix & 1, q_lo, kv_len, start, end,
                                    full_lo, full_hi, n_blocks, window, scale, WG, D, MASK,
                                    BLOCK_N, STAGES, 0, 1)
            nfix += (start + n_blocks * BLOCK_N > kv_len).to(gl.int32)
            it += n_blocks
            _ws_store(out_ptr, o, l_i, seq_start, seq_len, pid_m, h, WG, NH, D, BLOCK_M)


@gluon.jit
def _q_rows(q_ptr, seq_start, seq_len, row0, h, NH: gl.constexpr, D: gl.constexpr,
            ROWS: gl.constexpr, ld_layout: gl.constexpr):
    """Query rows [row0, row0 + ROWS) of the sequence in registers (one coalesced load; rows
    past the sequence zero)."""
    i = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
    dq = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    q_rows = (seq_start + i).to(gl.int64) * (NH * D) + h * D
    return gl.load(q_ptr + q_rows[:, None] + dq[None, :], mask=(i < seq_len)[:, None],
                   other=0.0)


@gluon.jit
def flash_prefill_wsp_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T, n_m, n_b,
        NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
        MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, DEEP: gl.constexpr = 0):
    """flash_prefill_ws_kernel's arguments plus n_m (query tiles of the longest sequence) and
    n_b (sequences); launched with num_warps=4 on a 1-D grid of at most one program per SM.
    DEEP gives the consumers the deeper pipeline of flash_attention_deep.py."""
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    kv_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_layout)
    desc = _kv_descriptor(blocks_ptr, num_pages, num_layers, NKV, D, PAGE_SIZE, BLOCK_N, kv_smem)
    k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed = _ws_rings(dtype, kv_smem, D,
                                                                          BLOCK_N, STAGES)
    fence_async_shared()
    gl.thread_barrier()
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize(
        [(_wsp_consumer, (q_ptr, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                          fixed, out_ptr, offs_ptr, cache_len_ptr, n_m, n_b, T, max_pages,
                          window, scale, WG0, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N,
                          STAGES, DEEP)),
         (_wsp_consumer, (q_ptr, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                          fixed, out_ptr, offs_ptr, cache_len_ptr, n_m, n_b, T, max_pages,
                          window, scale, WG1, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N,
                          STAGES, DEEP)),
         (_wsp_loader, (desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, offs_ptr,
                        cache_len_ptr, lut_ptr, n_m, n_b, T, max_pages, window, layer_idx,
                        num_layers, num_pages, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N,
                        STAGES))],
        [4, 1], [CONSUMER_REGS, LOADER_REGS])


@triton.jit
def flash_prefill_persistent_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T, n_m, n_b,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    """The Triton kernel's persistent form, at the Gluon kernel's arguments, grid and tile
    order: the twin Triton's interpreter runs in its place (Gluon has none), and a config of
    its own (a PERSISTENT config without WS)."""
    pdl_wait()
    for t in range(tl.program_id(0), n_m * NH * n_b, tl.num_programs(0)):
        pid_m, h, b = lpt_tile(t, n_m, NH, NKV, D, BLOCK_M, L2_GROUP_BYTES)
        prefill_tile(q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages,
                     layer_idx, num_layers, num_pages, window, scale, T, pid_m, h, b, NH, NKV,
                     D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, USE_TMA, SOFTCAP)


def grid_rule(BLOCK_M: int, NH: int, programs: int = NUM_SMS):
    """Grid of the persistent kernels: one program per SM, fewer when there are fewer tiles."""
    return lambda batch, max_seq_len: (
        min(max(1, cdiv(max_seq_len, BLOCK_M)) * NH * batch, programs), 1, 1)


def persistent_kernel(fn, constexprs: dict):
    """(kernel, constexprs) of the persistent form of a one-tile prefill kernel launched with
    `constexprs` (the persistent kernels always take the tiles longest first, never in turns)."""
    # (Compared by identity: hashing a jitted function hashes its source and what it calls.)
    if fn is flash_prefill_ws_kernel:
        kernel = flash_prefill_wsp_kernel
        # (DEEP is the persistent kernel's alone: the one-tile spec names it only when set.)
        constexprs = {**constexprs, "DEEP": constexprs.get("DEEP", 0)}
    elif fn is flash_prefill_kernel:
        kernel = flash_prefill_persistent_kernel
    else:
        raise ValueError(f"no persistent form of {fn}")
    return kernel, {k: v for k, v in constexprs.items() if k not in ("PINGPONG", "LPT")}


def as_persistent(spec: KernelSpec) -> KernelSpec:
    """The persistent form of a one-tile prefill spec (flash_attention.aot_specs builds it for
    a PERSISTENT config): its arguments plus n_m (query tiles of the longest sequence) and n_b
    (sequences) last, its grid one program per SM; the Gluon kernel's twin is the persistent
    Triton kernel at the same arguments."""
    fn, cx = persistent_kernel(spec.fn, spec.constexprs)
    runtime = {k: v for k, v in spec.signature.items() if v != "constexpr"}
    sig = {**runtime, "n_m": "i32", "n_b": "i32", **{k: "constexpr" for k in cx}}
    return replace(spec, fn=fn, signature=sig, constexprs=cx,
                   grid=grid_rule(cx["BLOCK_M"], cx["NH"]),
                   notes=spec.notes + "; persistent: n_m = cdiv(longest sequence, BLOCK_M), "
                         "n_b = sequences, a 1-D grid of at most one program per SM")
