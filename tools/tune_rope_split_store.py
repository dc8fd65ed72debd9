"""Sweep rope_split_store launch configurations on the GPU (correctness vs torch first, then
GB/s vs the device copy bandwidth). Run on the GPU machine: python tools/tune_rope_split_store.py"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import (D, DEV, NH, NKV, PAGE, event_ms, freqs_table, paged_batch,  # noqa: E402
                       torch_positions, torch_rope_store)
from graphir.lowering.triton_gpu.kernels import rope_split_store as rss  # noqa: E402


def main() -> int:
    import numpy as np

    batch, new = 8, 2048
    offs, clen, lut, pages = paged_batch(batch, 0, new, 1)
    T = int(offs[-1])
    qkv = torch.randn(T, (NH + 2 * NKV) * D, device=DEV).to(torch.bfloat16)
    freqs = freqs_table()
    o, c, lt = (torch.from_numpy(a.astype(np.int32)).to(DEV) for a in (offs, clen, lut))
    pos, page, slot, _ = torch_positions(offs, clen, lut)
    ref_blocks = torch.zeros(pages, 2, 1, PAGE, NKV, D, device=DEV, dtype=torch.bfloat16)
    q_ref = torch_rope_store(qkv, freqs, pos, page, slot, ref_blocks)
    x = torch.empty(1 << 28, device=DEV, dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / event_ms(lambda: y.copy_(x)) / 1e6
    nbytes = T * ((NH + 2 * NKV) * D * 2 + NH * D * 2 + 2 * NKV * D * 2 + D * 4)
    rows = []
    for bt, hb, warps, split in itertools.product((1, 2, 4), (4, 8, 16), (4, 8), (False, True)):
        if bt * hb * D > 16384:
            continue
        blocks = torch.full_like(ref_blocks, float("nan"))
        run = lambda: rss.rope_split_store(qkv, o, c, lt, freqs, blocks, 0, NH,  # noqa: E731
                                           interleaved=False, block_t=bt, head_block=hb,
                                           split_heads=split, num_warps=warps)
        q = run()
        used = blocks[page, :, 0, slot]
        want = ref_blocks[page, :, 0, slot].float()
        rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
        ok = max(rel(q, q_ref.float()), rel(used, want)) < 1e-2  # NaN (unwritten) fails too
        ms = event_ms(run)
        rows.append((nbytes / ms / 1e6, bt, hb, warps, split, ok, ms))
    rows.sort(reverse=True)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s, T={T}")
    print("GB/s   %copy  BLOCK_T HB warps split ok      us")
    for gbs, bt, hb, warps, split, ok, ms in rows[:15]:
        print(f"{gbs:6.0f} {100 * gbs / copy_gbs:5.1f}% {bt:7d} {hb:3d} {warps:5d} {str(split):5s} "
              f"{str(ok):5s} {ms * 1e3:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
