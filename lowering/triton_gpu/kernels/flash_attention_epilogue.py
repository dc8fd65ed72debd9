"""How a warp-specialized prefill consumer warpgroup's 64 finished output rows leave: divided by
their row sums, then either stored row by row into `[T, NH*D]` (rows past the sequence
dropped) or, when all lie in the sequence, staged in shared memory and stored by one TMA copy
(the persistent and chained kernels, flash_attention_persistent.py and
flash_attention_chain.py)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma


@gluon.jit
def _normalized(o, l_i):
    """O divided by its row sums l (in the accumulator's layout); a row that saw no key (l = 0)
    stays as it is."""
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o.type.layout))
    return o / gl.where(l_o == 0.0, 1.0, l_o)[:, None]


@gluon.jit
def _ws_store(out_ptr, o, l_i, seq_start, seq_len, pid_m, h, WG: gl.constexpr,
              NH: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr):
    """A consumer warpgroup's 64 output rows, normalized, rows past the sequence dropped."""
    ROWS: gl.constexpr = 64
    o_layout: gl.constexpr = o.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    out = _normalized(o, l_i)
    r = pid_m * BLOCK_M + WG * ROWS + gl.arange(0, ROWS, layout=row_o)
    # The head's columns in int32 (a value per tile: not hoisted out of a persistent kernel's
    # tile loop as 64-bit constants, which made the chained consumer spill them).
    cols = h * D + gl.arange(0, D, layout=col_o)
    o_rows = (seq_start + r).to(gl.int64) * (NH * D)
    gl.store(out_ptr + o_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(r < seq_len)[:, None])


@gluon.jit
def _ws_store_tma(odesc, o_smem, o, l_i, row0, h, D: gl.constexpr):
    """A consumer warpgroup's 64 normalized output rows, all in the sequence, written into
    o_smem (the shared memory of its query rows) and stored by TMA from there: one bulk copy
    instead of 32 scattered 4-byte stores a thread, which took ~0.9 key-block times a tile and
    held the next tile's start up by ~0.45 more (tools/gpu_sweeps/prefill_timeline.py). The
    caller waits for the copy to read o_smem before that memory is reused."""
    o_smem.store(_normalized(o, l_i).to(o_smem.dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(odesc, [row0, h * D], o_smem)
