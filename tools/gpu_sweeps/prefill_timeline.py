"""Where a persistent prefill program's time goes, tile by tile: the shipped DYN + QTMA kernel
(flash_attention_persistent.py) with SM clock stamps at its phase boundaries.

    python3 tools/gpu_sweeps/prefill_timeline.py [SHAPE ...]    (tools/gpu_sweeps/attention.py's
                                                                 shape names; default c2k w4k c4k)

Each consumer warpgroup stamps, per tile: taking it from the loader, its query rows there, key
block 0 there, S_0 done, block 0's softmax done, the key loop done, the last P V done, the output
stored; and sums, over the loop, the cycles it waited for K, for V, for S and for P V. The
loader warp is the shipped one, unstamped. Stamps are %clock64 (one counter an SM); a stamp
after arithmetic may be taken before the arithmetic ends (only the waits order them), so the
block-0 softmax share is approximate. The probe's output is checked against SDPA and its time
against the shipped kernel's in the same run, so what the stamps cost is in the table.

A measuring tool, not a kernel the plan ever runs: the phases' helpers are the shipped ones."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as A  # noqa: E402

from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc  # noqa: E402
from graphir.lowering.triton_gpu.kernels.flash_attention_persistent import (  # noqa: E402
    _wsp_loader, _wsp_shared)
from graphir.lowering.triton_gpu.kernels.flash_attention_tiles import (  # noqa: E402
    _take_tile, _tile)
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (  # noqa: E402
    CONSUMER_REGS, LOADER_REGS, _softmax, _ws_last_pv, _ws_release, _ws_start,
    warpgroup_p_layout)
from graphir.lowering.triton_gpu.kernels.flash_attention_epilogue import (  # noqa: E402
    _ws_store, _ws_store_tma)

REGS = gl.constexpr(CONSUMER_REGS)
TILES = 48  # tiles stamped a program (later ones run unstamped)
EV = 16     # int64 slots a (program, consumer warpgroup, tile)
# consumer slots
C_PREV, C_TAKE, C_Q, C_K0, C_S0, C_P0, C_LOOP, C_PV, C_STORE, C_NB, C_KW, C_VW, C_SW, C_OW, C_T = \
    range(15)


@gluon.jit
def _clock():
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _probe_blocks(q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, it, p, o, m_i, l_i,
                  qp, qk_scale, s0, start, end, full_lo, full_hi, n_blocks, window,
                  MASK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """flash_attention_wgmma._ws_blocks (PINGPONG off) with its four waits timed."""
    dtype: gl.constexpr = q.dtype
    s_layout: gl.constexpr = s0.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o.type.layout)
    p_layout: gl.constexpr = p.type.layout
    z = _clock()
    kw = (z - z).to(gl.int32)
    vw = kw
    sw = kw
    ow = kw
    for j in range(1, n_blocks):
        g = it + j
        n0 = start + j * BLOCK_N
        slot = g % STAGES
        prev = (g - 1) % STAGES
        a = _clock()
        mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
        kw += (_clock() - a).to(gl.int32)
        s = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), s0, use_acc=False,
                          is_async=True)
        a = _clock()
        mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
        vw += (_clock() - a).to(gl.int32)
        o = warpgroup_mma(p, v_ring.index(prev), o, is_async=True)
        a = _clock()
        s = warpgroup_mma_wait(1, deps=[s])
        sw += (_clock() - a).to(gl.int32)
        masked = (n0 < full_lo) | (n0 + BLOCK_N > full_hi)
        p_next, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, n0, end, window, qk_scale, masked,
                                           s_layout, MASK, BLOCK_N)
        a = _clock()
        o, _, p = warpgroup_mma_wait(
            0, deps=[o, p, gl.convert_layout(p_next.to(dtype), p_layout)])
        ow += (_clock() - a).to(gl.int32)
        _ws_release(k_empty, slot)
        mbarrier.arrive(v_empty.index(prev))
        o = o * gl.convert_layout(alpha, row_o)[:, None]
    return p, o, m_i, l_i, kw, vw, sw, ow


@gluon.jit
def _probe_consumer(q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty,
                    v_empty, fixed, out_ptr, odesc, n_m, n_b, max_pages, window, scale, tile_ids,
                    tile_ready, tile_empty, probe, WG: gl.constexpr, NH: gl.constexpr,
                    NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
                    MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, NT: gl.constexpr, NE: gl.constexpr,
                    OTMA: gl.constexpr):
    ROWS: gl.constexpr = BLOCK_M // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    it = 0
    nfix = 0
    nq = 0
    total = n_m * NH * n_b
    row = (gl.program_id(0) * 2 + WG).to(gl.int64) * (NT * NE)
    n = 0
    prev_end = _clock()
    t, pid_m, h, seq_start, seq_len, cache_len = _take_tile(tile_ids, tile_ready, tile_empty, n)
    while (t >= 0) & (t < total):
        c0 = _clock()
        pid_m, h, b, kv_len, q_lo, start, end, full_lo, full_hi, n_blocks = _tile(
            pid_m, h, 0, seq_len, cache_len, max_pages, window, PAGE_SIZE, MASK, BLOCK_M, BLOCK_N)
        if n_blocks > 0:
            q_slot = nq % 2
            mbarrier.wait(q_ready.index(q_slot), (nq // 2) & 1)
            if nq > 0:
                tma.store_wait(0)
                _ws_release(q_empty, 1 - q_slot)
            c1 = _clock()
            q = q_smem.index(q_slot).slice(WG * ROWS, ROWS)
            qk_scale, qp, m_i, l_i, o, s0 = _ws_start(q_lo, scale, WG, D, BLOCK_N)
            first = it % STAGES
            mbarrier.wait(k_ready.index(first), (it // STAGES) & 1)
            c2 = _clock()
            s = warpgroup_mma(q, k_ring.index(first).permute((1, 0)), s0, use_acc=False,
                              is_async=True)
            s = warpgroup_mma_wait(0, deps=[s])
            c3 = _clock()
            _ws_release(k_empty, first)
            masked = (start < full_lo) | (start + BLOCK_N > full_hi)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qp, start, end, window, qk_scale, masked,
                                          s_layout, MASK, BLOCK_N)
            p = gl.convert_layout(p.to(q.dtype), warpgroup_p_layout(D))
            c4 = _clock()
            p, o, m_i, l_i, kw, vw, sw, ow = _probe_blocks(
                q, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, it, p, o, m_i, l_i, qp,
                qk_scale, s0, start, end, full_lo, full_hi, n_blocks, window, MASK, BLOCK_N,
                STAGES)
            c5 = _clock()
            o = _ws_last_pv(p, o, v_ring, v_ready, v_empty, fixed, it + n_blocks - 1, nfix & 1,
                            start + (n_blocks - 1) * BLOCK_N, kv_len, WG, D, BLOCK_N, STAGES, 1)
            c6 = _clock()
            nfix += (start + n_blocks * BLOCK_N > kv_len).to(gl.int32)
            it += n_blocks
            if OTMA and (pid_m * BLOCK_M + (WG + 1) * ROWS <= seq_len):
                _ws_store_tma(odesc, q, o, l_i, seq_start + pid_m * BLOCK_M + WG * ROWS, h, D)
            else:
                _ws_store(out_ptr, o, l_i, seq_start, seq_len, pid_m, h, WG, NH, D, BLOCK_M)
            nq += 1
            c7 = _clock()
            if n < NT:
                base = probe + row + n * NE
                gl.store(base + 0, prev_end)
                gl.store(base + 1, c0)
                gl.store(base + 2, c1)
                gl.store(base + 3, c2)
                gl.store(base + 4, c3)
                gl.store(base + 5, c4)
                gl.store(base + 6, c5)
                gl.store(base + 7, c6)
                gl.store(base + 8, c7)
                gl.store(base + 9, n_blocks.to(gl.int64))
                gl.store(base + 10, kw.to(gl.int64))
                gl.store(base + 11, vw.to(gl.int64))
                gl.store(base + 12, sw.to(gl.int64))
                gl.store(base + 13, ow.to(gl.int64))
                gl.store(base + 14, t.to(gl.int64))
            prev_end = c7
        n += 1
        t, pid_m, h, seq_start, seq_len, cache_len = _take_tile(tile_ids, tile_ready, tile_empty,
                                                                n)
    tma.store_wait(0)


@gluon.jit
def probe_kernel(q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages,
                 layer_idx, num_layers, num_pages, window, scale, T, n_m, n_b, sched_ptr, probe,
                 NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr, PAGE_SIZE: gl.constexpr,
                 MASK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, NT: gl.constexpr, NE: gl.constexpr,
                 OTMA: gl.constexpr):
    """flash_prefill_wsp_kernel with DYN and QTMA (the shipped form at B4 x 2048), stamped;
    OTMA: the output through the query slots as it ships, else by the consumers' stores."""
    DYN: gl.constexpr = 1
    QTMA: gl.constexpr = 1
    (q_smem, qdesc, odesc, desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fixed,
     tile_ids, tile_ready, tile_empty, q_ready, q_empty) = _wsp_shared(
        q_ptr, out_ptr, blocks_ptr, T, num_pages, num_layers, NH, NKV, D, PAGE_SIZE, BLOCK_M,
        BLOCK_N, STAGES, QTMA)
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize(
        [(_probe_consumer, (q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty,
                            v_empty, fixed, out_ptr, odesc, n_m, n_b, max_pages, window, scale,
                            tile_ids, tile_ready, tile_empty, probe, WG0, NH, NKV, D, PAGE_SIZE,
                            MASK, BLOCK_M, BLOCK_N, STAGES, NT, NE, OTMA)),
         (_probe_consumer, (q_smem, q_ready, q_empty, k_ring, v_ring, k_ready, v_ready, k_empty,
                            v_empty, fixed, out_ptr, odesc, n_m, n_b, max_pages, window, scale,
                            tile_ids, tile_ready, tile_empty, probe, WG1, NH, NKV, D, PAGE_SIZE,
                            MASK, BLOCK_M, BLOCK_N, STAGES, NT, NE, OTMA)),
         (_wsp_loader, (desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, offs_ptr,
                        cache_len_ptr, lut_ptr, n_m, n_b, T, max_pages, window, layer_idx,
                        num_layers, num_pages, sched_ptr, tile_ids, tile_ready, tile_empty,
                        qdesc, q_smem, q_ready, q_empty, NH, NKV, D, PAGE_SIZE, MASK, BLOCK_M,
                        BLOCK_N, STAGES, DYN, QTMA))],
        [4, 1], [REGS, LOADER_REGS])


TWIN = "m128n128w4s2tmawspersistdynqtma"  # the shipped config the probe stamps
SIGNATURE = dict(q_ptr="*bf16", offs_ptr="*i32", cache_len_ptr="*i32", lut_ptr="*i32",
                 blocks_ptr="*bf16", out_ptr="*bf16", max_pages="i32", layer_idx="i32",
                 num_layers="i32", num_pages="i32", window="i32", scale="fp32", T="i32",
                 n_m="i32", n_b="i32", sched_ptr="*i32", probe="*i64")


def constexprs(shape, stages: int = 2, otma: int = 1) -> dict:
    name, B, S, D, mask, window = shape
    from graphir.lowering.triton_gpu.kernels.paged import mask_id
    return dict(NH=A.NH, NKV=A.NKV, D=D, PAGE_SIZE=A.PAGE, MASK=mask_id(mask), BLOCK_M=128,
                BLOCK_N=128, STAGES=stages, NT=TILES, NE=EV, OTMA=otma)


def run_probe(shape, reps: int = 3):
    """(output, probe array [programs, 2, TILES, EV], programs) of the stamped kernel's last of
    `reps` launches."""
    for _ in range(reps):
        _ONCE.get("probe", torch.zeros(1)).zero_()
        out = run_probe_once(shape)
    torch.cuda.synchronize()
    programs = _ONCE["programs"]
    return out, _ONCE["probe"].view(programs, 2, TILES, EV).cpu().numpy(), programs


def report(shape, arr, programs):
    """The phase table of one shape from the probe array."""
    cons = arr                            # [prog, wg, tile, ev]
    nb = cons[..., C_NB]
    ok = nb > 0
    d = lambda a, b: (cons[..., b] - cons[..., a]).astype(np.float64)
    phases = [("take (wait for the loader's tile)", d(C_PREV, C_TAKE)),
              ("query rows there", d(C_TAKE, C_Q)),
              ("key block 0 there", d(C_Q, C_K0)),
              ("S_0 (alone)", d(C_K0, C_S0)),
              ("block 0 softmax", d(C_S0, C_P0)),
              ("key loop (blocks 1..n-1)", d(C_P0, C_LOOP)),
              ("last P V", d(C_LOOP, C_PV)),
              ("store issued", d(C_PV, C_STORE))]
    # The first tile's "take" includes the program's start: left out of the sums.
    first = np.zeros_like(ok)
    first[:, :, 0] = True
    use = ok & ~first
    total = sum(v[use].sum() for _, v in phases)
    blocks = nb[use].sum()
    loop_blocks = (nb[use] - 1).sum()
    per_block = d(C_P0, C_LOOP)[use].sum() / max(loop_blocks, 1)
    lines = [f"### {shape[0]} (B{shape[1]} x {shape[2]}, {shape[4]}"
             + (f" {shape[5]}" if shape[5] else "") + f"): {programs} programs, "
             f"{int(use.sum())} warpgroup-tiles stamped, {blocks / use.sum():.1f} key blocks a "
             "tile", "",
             "| phase | cycles a tile (mean) | share of the stamped time | in key-loop blocks |",
             "| --- | --- | --- | --- |"]
    for label, v in phases:
        m = v[use].mean()
        lines.append(f"| {label} | {m:.0f} | {100 * v[use].sum() / total:.1f}% | "
                     f"{m / per_block:.2f} |")
    lines.append(f"| key loop, a block | {per_block:.0f} | | 1.00 |")
    for label, ev in (("waits in the loop: K", C_KW), ("V", C_VW), ("S", C_SW), ("P V", C_OW)):
        v = cons[..., ev].astype(np.float64)[use]
        lines.append(f"| {label} (a block) | {v.sum() / max(loop_blocks, 1):.0f} | | |")
    # Tile period over what the loop rate would give: the tile step in blocks.
    step = (total - per_block * blocks) / use.sum() / per_block
    both_wg = ok[:, 0] & ok[:, 1]
    skew = np.abs(cons[:, 0, :, C_LOOP] - cons[:, 1, :, C_LOOP]).astype(np.float64)[both_wg].mean()
    lines.append(f"\nTile step (a tile's stamped time beyond n x the loop's block): "
                 f"{step:.2f} blocks. The two warpgroups' loop ends differ by "
                 f"{skew:.0f} cycles a tile on average.")
    return "\n".join(lines)


def main():
    names = sys.argv[1:] or ["c2k", "w4k", "c4k"]
    A.set_allocator()
    for name in names:
        shape = next(s for s in A.SHAPES if s[0] == name)
        got, arr, programs = run_probe(shape)
        want = A.reference(shape)[0]
        err = float((got.float() - want.float()).norm() / want.float().norm())
        # The probe's unstamped twin, and the shipped choice where that differs.
        tags = dict.fromkeys([TWIN, A.default_tag(shape)])
        ms = {tag: A.time_ms(A.ours(shape, fc.get(tag)), 20) for tag in tags}
        ms_probe = A.time_ms(lambda: run_probe_once(shape), 20)
        print(report(shape, arr, programs))
        print(f"rel err vs SDPA {err:.1e}; probe {ms_probe * 1e3:.0f} us; "
              + ", ".join(f"{tag} {v * 1e3:.0f} us" for tag, v in ms.items())
              + " (same run)\n", flush=True)


_ONCE: dict = {}


def run_probe_once(shape):
    """One launch of the probe (buffers kept between calls), for timing."""
    name, B, S, D, mask, window = shape
    if _ONCE.get("name") != name:
        p = A.problem(shape)
        lut, blocks = p["shuffled"]
        n_m = triton.cdiv(S, 128)
        programs = min(n_m * A.NH * B, 132)
        _ONCE.update(name=name, p=p, lut=lut, blocks=blocks, n_m=n_m, programs=programs,
                     probe=torch.zeros(programs * 2 * TILES * EV, dtype=torch.int64,
                                       device="cuda"),
                     sched=torch.zeros(2, dtype=torch.int32, device="cuda"),
                     out=p["q"].new_empty((p["q"].shape[0], A.NH * D)))
    o = _ONCE
    q = o["p"]["q"]
    probe_kernel[(o["programs"],)](
        q, o["p"]["offs"], o["p"]["clen"], o["lut"], o["blocks"], o["out"], o["lut"].shape[1], 0,
        o["blocks"].shape[2], o["blocks"].shape[0], max(window, 1), D ** -0.5, q.shape[0],
        o["n_m"], B, o["sched"], o["probe"], **constexprs(shape), num_warps=4)
    return o["out"]


if __name__ == "__main__":
    main()
