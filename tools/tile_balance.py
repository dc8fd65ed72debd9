"""How evenly the persistent prefill kernels share their tiles out (a model, no GPU needed).

The persistent kernels (lowering/triton_gpu/kernels/flash_attention_persistent.py) walk the
tiles in the longest-first order of `paged.lpt_tile`. Either each program takes every grid-th
tile (the stride) or, with a DYN config, the next tile from a counter (greedy): the loader warp
takes it as it starts the current tile's loads, so that the atomic's latency hides under them.
This counts each program's key blocks both ways, for sequences of equal length
without a cached prefix, the order taken from the kernels' own `lpt_tile` run under Triton's
interpreter; a program's time is taken as its key blocks (each block the same work). The
busiest program bounds the launch: "busiest / mean" is the work the kernel waits for past a
perfect share.

    python -m graphir.tools.tile_balance [--sms 132] [--block 128]
"""
from __future__ import annotations

import argparse
import heapq
import os

import numpy as np

os.environ.setdefault("TRITON_INTERPRET", "1")  # the order is computed on the CPU
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from graphir.lowering.triton_gpu.kernels.paged import L2_GROUP_BYTES, lpt_tile  # noqa: E402

# (name, sequences, tokens each, head dim, mask: "causal", "none" or a sliding window's width)
# at 32 query heads and 8 KV heads.
SHAPES = [("B4 x 4096 causal", 4, 4096, 128, "causal"),
          ("B1 x 16384 causal", 1, 16384, 128, "causal"),
          ("B4 x 2048 causal", 4, 2048, 128, "causal"),
          ("B1 x 4096 causal", 1, 4096, 128, "causal"),
          ("B8 x 1024 causal", 8, 1024, 128, "causal"),
          ("B4 x 4096 causal, d64", 4, 4096, 64, "causal"),
          ("B4 x 4096 window 1024", 4, 4096, 128, 1024),
          ("B4 x 4096 no mask", 4, 4096, 128, "none")]


@triton.jit
def _probe(out_ptr, n_m, total, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pid_m, h, b = lpt_tile(t, n_m, NH, NKV, D, BLOCK_M, L2_GROUP_BYTES)
    ok = t < total
    tl.store(out_ptr + 3 * t, pid_m, mask=ok)
    tl.store(out_ptr + 3 * t + 1, h, mask=ok)
    tl.store(out_ptr + 3 * t + 2, b, mask=ok)


def tile_order(n_m: int, n_b: int, nh: int, nkv: int, d: int, block_m: int) -> np.ndarray:
    """(query tile, head, sequence) of every tile number, as the kernels number them."""
    total = n_m * nh * n_b
    out = torch.zeros(3 * total, dtype=torch.int32)
    block = 1024
    _probe[(triton.cdiv(total, block),)](out, n_m, total, nh, nkv, d, block_m, block)
    return out.view(total, 3).numpy()


def key_blocks(order: np.ndarray, seq: int, mask, block_m: int, block_n: int):
    """Key blocks of each tile of `order` for sequences of `seq` new tokens, no prefix, under
    `mask`: "causal", "none", or an int, a causal sliding window of that many keys."""
    if mask == "none":
        return np.full(len(order), -(-seq // block_n))
    first_row = order[:, 0] * block_m
    last_row = np.minimum(first_row + block_m, seq) - 1
    first_key = 0 if mask == "causal" else np.maximum(0, first_row - int(mask) + 1)
    return last_row // block_n - first_key // block_n + 1


def busiest_over_mean(work: np.ndarray, programs: int) -> tuple[float, float]:
    """(stride, greedy): the busiest program's work over the mean, each way (greedy: each
    program takes its next tile when it starts the current one, its first tile its own)."""
    programs = min(programs, len(work))
    mean = work.sum() / programs
    stride = max(work[p::programs].sum() for p in range(programs))
    end = [int(w) for w in work[:programs]]
    starts = [(0, p) for p in range(programs)]  # (when the current tile started, program)
    for w in work[programs:]:
        _, p = heapq.heappop(starts)
        heapq.heappush(starts, (end[p], p))
        end[p] += int(w)
    return stride / mean, max(end) / mean


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132, help="programs (one per SM)")
    ap.add_argument("--block", type=int, default=128, help="query and key block size")
    a = ap.parse_args(argv)
    print(f"{'shape':26} {'tiles':>6} {'stride':>8} {'greedy':>8}   (busiest program / mean)")
    for name, n_b, seq, d, mask in SHAPES:
        n_m = -(-seq // a.block)
        order = tile_order(n_m, n_b, 32, 8, d, a.block)
        work = key_blocks(order, seq, mask, a.block, a.block)
        stride, greedy = busiest_over_mean(work, a.sms)
        print(f"{name:26} {len(work):6d} {stride:8.3f} {greedy:8.3f}")


if __name__ == "__main__":
    main()
