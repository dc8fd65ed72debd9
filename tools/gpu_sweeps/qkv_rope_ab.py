"""The one-token qkv GEMV with rope_split_store in its epilogue (lowerings/qkv_rope.py) against
the two kernels, in the layer's decode step: both builds (qkv_rope.FUSE on, off) loaded in one
process and checked against torch eager, then synchronized wall per step in alternated rounds
and each kernel's time. B64 runs the two-kernel form either way (a control).
    python3 tools/gpu_sweeps/qkv_rope_ab.py [rounds]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import alternated_walls, compile_switched, kernel_times, load_variants  # noqa: E402
from graphir.lowering.triton_gpu.kernels import gemv_rope_store as grs  # noqa: E402
from graphir.lowering.triton_gpu.lowerings import qkv_rope  # noqa: E402


def _build(g, v):
    """v: (fuse, where the fused kernel's metadata loads go: gemv_rope_store.META)."""
    fuse, meta = v
    old, grs.META = grs.META, meta
    try:
        return compile_switched(qkv_rope, "FUSE")(g, fuse)
    finally:
        grs.META = old
from graphir.tools.gpu_timing import event_ms  # noqa: E402


def main(rounds: int) -> None:
    for case in ("decode B1 ctx4096",):
        variants = {"two kernels": (False, grs.META), **{f"fused, meta {m}": (True, m)
                                                          for m in (1, 3)}}
        fns, errs, outs = load_variants(case, variants, _build)
        wall = alternated_walls(fns, rounds)
        b = outs["two kernels"].float()
        diff = max(((a.float() - b).norm() / b.norm()).item() for a in outs.values())
        print(f"\n{torch.cuda.get_device_name()}; {case}; {rounds} alternated rounds of 100 "
              f"synchronized steps; most rel diff to the two kernels {diff:.1e}")
        for n, fn in fns.items():
            ks, span = kernel_times(fn)
            print(f"{n:14s} wall {statistics.median(wall[n]) * 1e3:6.1f} us  queued "
                  f"{event_ms(fn, calls=20) * 1e3:6.1f} us  span {span:5.1f} us  rel err "
                  f"{errs[n]:.1e}  walls {' '.join(f'{v * 1e3:.1f}' for v in wall[n])}")
            print("   " + ", ".join(f"{k} {t:.1f}" for k, t in ks))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
