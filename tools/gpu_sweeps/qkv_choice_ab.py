"""The B64 decode step with its qkv projection (M 64, N 6144, K 4096) on the shipped choice
(cuBLASLt) against Triton tiles, in the layer rather than alone: profiled on an H100 the
cuBLASLt kernel, the step graph's first kernel, started 6.2 us after the upload node where the
B1 step's Triton GEMV started 2.6 us after it, a start the standalone sweep (the same kernel
back to back) never sees. Each variant is compiled from the shipped table with that one entry
replaced, loaded in one process and checked against torch eager; then wall per step (with
synchronize) in alternated rounds, device time per step queued back to back, and one profiled
run per variant (the first kernel's start after the copy, its time, the step span).
    python3 tools/gpu_sweeps/qkv_choice_ab.py [rounds] [config ...]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import alternated_walls, load_variants, step_events  # noqa: E402
from graphir.tools.gpu_timing import event_ms  # noqa: E402

CASE, SHAPE, BUCKET = "decode B64 ctx4096", "N=6144,K=4096", "m64"
TRITON = ("t64x64x64_g1_w4_s6", "t64x32x128_g1_w4_s5", "t64x64x128_g1_w4_s4_k2")


def _profile(fn, steps: int = 20) -> tuple[float, float, float, str]:
    """(gap from the copy to the first kernel, the first kernel's time, step span) in us,
    medians over `steps` profiled steps, and the first kernel's name."""
    gaps, firsts, spans, name = [], [], [], ""
    for step in step_events(fn, steps):
        ks = [e for e in step if "Memcpy" not in e.name]
        cp = [e for e in step if "Memcpy" in e.name]
        if cp:
            gaps.append(ks[0].time_range.start - cp[0].time_range.end)
        firsts.append(ks[0].time_range.end - ks[0].time_range.start)
        spans.append(ks[-1].time_range.end - ks[0].time_range.start)
        name = ks[0].name[:40]
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return med(gaps), med(firsts), med(spans), name


def main(rounds: int, configs: tuple[str, ...]) -> None:
    variants = {"shipped": {}, **{c: {(SHAPE, BUCKET): c} for c in configs}}
    fns, errs, _ = load_variants(CASE, variants)
    wall = alternated_walls(fns, rounds)
    print(f"{torch.cuda.get_device_name()}; {CASE}, qkv {SHAPE} at {BUCKET}; {rounds} rounds, "
          f"alternated")
    print(f"{'qkv config':26s} {'wall ms':>8s} {'queued':>8s} {'gap us':>7s} {'qkv us':>7s} "
          f"{'span us':>8s} {'rel err':>8s}  first kernel")
    for n, fn in fns.items():
        gap, first, span, kname = _profile(fn)
        print(f"{n:26s} {statistics.median(wall[n]):8.4f} {event_ms(fn, calls=20):8.4f} "
              f"{gap:7.1f} {first:7.1f} {span:8.1f} {errs[n]:8.1e}  {kname}   walls "
              f"{' '.join(f'{v:.4f}' for v in wall[n])}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, tuple(sys.argv[2:]) or TRITON)
