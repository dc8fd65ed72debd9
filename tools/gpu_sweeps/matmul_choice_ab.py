"""One matmul of the layer's step on other configs than the shipped table's, in the layer: a
tile that wins alone (gemv_m1.py, matmul.py: the same kernel back to back) may not win between
the step's other kernels, which PDL overlaps with it. Each variant is the layer compiled from
the shipped table with the entry (shape key, bucket) replaced, loaded in one process and
checked against torch eager; then wall per synchronized step in alternated rounds, device time
per step queued back to back, host enqueue, and each kernel's time and the step span
(synchronized steps, CUPTI).
    python3 tools/gpu_sweeps/matmul_choice_ab.py CASE SHAPE BUCKET [rounds] [config ...]
e.g. the B1 step's o_proj on two other GEMV tiles, five rounds:
    python3 tools/gpu_sweeps/matmul_choice_ab.py "decode B1 ctx4096" N=4096,K=4096 m1 5
        gemv2x256_w2_s1 gemv8x1024_w4_s1   (on the same line)
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import alternated_walls, kernel_times, load_variants  # noqa: E402
from graphir.tools.gpu_timing import enqueue_ms, event_ms  # noqa: E402


def main(case: str, shape: str, bucket: str, rounds: int, configs: tuple[str, ...]) -> None:
    variants = {"shipped": {}, **{c: {(shape, bucket): c} for c in configs}}
    fns, errs, _ = load_variants(case, variants)
    wall = alternated_walls(fns, rounds)
    print(f"{torch.cuda.get_device_name()}; {case}, matmul {shape} at {bucket}; {rounds} "
          f"rounds, alternated; ms a step (wall synchronized, queued, host enqueue), us a kernel")
    for n, fn in fns.items():
        kernels, span = kernel_times(fn)
        print(f"{n:28s} wall {statistics.median(wall[n]):.4f} (rounds "
              f"{' '.join(f'{v:.4f}' for v in wall[n])}) queued {event_ms(fn, calls=20):.4f} "
              f"enqueue {enqueue_ms(fn):.4f} rel err {errs[n]:.1e}")
        print(f"{'':28s} span {span:.1f}: " + ", ".join(f"{k} {t:.1f}" for k, t in kernels))


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) < 3:
        sys.exit(__doc__)
    main(a[0], a[1], a[2], int(a[3]) if len(a) > 3 else 5, tuple(a[4:]))
