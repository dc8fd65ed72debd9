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

An experiment measured by tools/gpu_sweeps/attention_wgmma.py (variant `wsp...`), not a config
the tuner is offered: its grid (programs = SMs) and its two extra arguments (query tiles of the
longest sequence, sequences) differ from flash_attention.py's launch contract, so the Triton
twin the interpreter runs in a WS spec's place could not stand in for it. Gluon has no
interpreter: on the CPU it is checked by its offline sm_90 compile
(tests/lowering/triton_gpu/test_flash_attention_aot.py); on the GPU by the sweep's check.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared

from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
    CONSUMER_REGS, LOADER_REGS, _key_blocks, _kv_descriptor, _ws_attend, _ws_load_tile,
    _ws_rings, _ws_store, flash_prefill_ws_kernel)
from graphir.lowering.triton_gpu.kernels.paged import L2_GROUP_BYTES, lpt_tile, sequence_rows


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
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
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
            o, l_i = _ws_attend(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
                                fixed, it, nfix & 1, q_lo, kv_len, start, end, full_lo, full_hi,
                                n_blocks, window, scale, WG, D, MASK, BLOCK_N, STAGES, 0, 1)
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
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """flash_prefill_ws_kernel's arguments plus n_m (query tiles of the longest sequence) and
    n_b (sequences); launched with num_warps=4 on a 1-D grid of at most one program per SM."""
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
                          STAGES)),
         (_wsp_consumer, (q_ptr, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                          fixed, out_ptr, offs_ptr, cache_len_ptr, n_m, n_b, T, max_pages,
                          window, scale, WG1, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N,
                          STAGES)),
         (_wsp_loader, (desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, offs_ptr,
                        cache_len_ptr, lut_ptr, n_m, n_b, T, max_pages, window, layer_idx,
                        num_layers, num_pages, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N,
                        STAGES))],
        [4, 1], [CONSUMER_REGS, LOADER_REGS])


def aot_spec(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
             dtype: str = "bfloat16", mask="CAUSAL", block_n: int = 128, stages: int = 2):
    """The persistent kernel's spec, for its offline compile (the WS spec's signature plus n_m
    and n_b; a 1-D grid of `programs`)."""
    from dataclasses import replace

    from graphir.lowering.triton_gpu.kernels import flash_attention as fa
    from graphir.lowering.triton_gpu.kernels.flash_attention_configs import _ws

    (ws,) = fa.aot_specs(n_heads, n_kv_heads, head_dim, page_size, dtype, mask,
                         _ws(block_n, stages))
    if ws.fn is not flash_prefill_ws_kernel:
        raise ValueError(f"flash_attention_wsp: no warp-specialized kernel for head_dim "
                         f"{head_dim}, page {page_size}, {dtype}, mask {mask}")
    cx = {k: v for k, v in ws.constexprs.items() if k not in ("PINGPONG", "LPT")}
    runtime = {k: v for k, v in ws.signature.items() if v != "constexpr"}
    sig = {**runtime, "n_m": "i32", "n_b": "i32", **{k: "constexpr" for k in cx}}
    return replace(ws, name=ws.name + "_persistent", fn=flash_prefill_wsp_kernel, signature=sig, constexprs=cx,
                   grid=lambda programs: (programs, 1, 1), grid_args=("programs",),
                   extra={"config": ws.extra["config"]})


def flash_attention_wsp(q, input_row_offsets, cache_lengths, lookup_table, blocks,
                        layer_idx: int, mask="CAUSAL", window: int = 0,
                        scale: float | None = None, max_seq_len: int | None = None,
                        block_n: int = 128, stages: int = 2, num_programs: int | None = None):
    """The persistent kernel on torch tensors (q [T, NH, D] -> [T, NH*D]), at most one program
    per SM (`num_programs` overrides); pages must hold whole key blocks."""
    import torch
    import triton

    from graphir.lowering.triton_gpu.kernels import flash_attention as fa
    from graphir.lowering.triton_gpu.kernels.paged import check_attention_args, mask_id
    from graphir.lowering.triton_gpu.kernels.spec import cdiv

    T, NH, D = q.shape
    _, page_size, NKV, m = check_attention_args("flash_attention_wsp", q, blocks, mask, window)
    if page_size % block_n:
        raise ValueError(f"flash_attention_wsp: page size {page_size} does not hold whole key "
                         f"blocks of {block_n}")
    scale = float(D ** -0.5 if scale is None else scale)
    fa.check_scale(scale)
    batch = input_row_offsets.shape[0] - 1
    if max_seq_len is None:
        offs = input_row_offsets.to(torch.int64)
        max_seq_len = int((offs[1:] - offs[:-1]).max()) if batch else 0
    out = q.new_empty((T, NH * D))
    n_m = cdiv(max_seq_len, 128)
    tiles = n_m * NH * batch
    if T == 0 or tiles == 0:
        return out
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(q.device).multi_processor_count
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device=q.device))
    as_i32 = lambda x: x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else x
    flash_prefill_wsp_kernel[(min(tiles, num_programs),)](
        q.contiguous(), as_i32(input_row_offsets), as_i32(cache_lengths), as_i32(lookup_table),
        blocks, out, lookup_table.shape[1], layer_idx, blocks.shape[2], blocks.shape[0],
        max(window, 1), scale, T, n_m, batch, NH=NH, NKV=NKV, D=D, PAGE_SIZE=page_size,
        MASK=mask_id(m), BLOCK_M=128, BLOCK_N=block_n, STAGES=stages,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4)
    return out
