"""The layer's decode step with its one-row projections preloading their weights before the PDL
wait (matmul_skinny.gemv_kernel's PRELOAD_K) against the shipped GEMVs, in the layer: the
preload can only pay where the kernel ahead leaves bandwidth idle (the B1 step's paged decode
before o_proj, the upload before the qkv GEMV), which a standalone sweep never shows.

Each variant is compiled from the shipped table with the m1 entries of both projections
(N 6144 and 4096, K 4096) replaced, loaded in one process and checked against torch eager;
then wall per step (synchronized) in alternated rounds, device time per step queued back to
back, and one profiled run per variant (each kernel's time and the step span, synchronized).
    python3 tools/gpu_sweeps/gemv_preload_ab.py [rounds] [qkv_config/o_config ...]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import alternated_walls, load_variants, step_events  # noqa: E402
from graphir.tools.gpu_timing import enqueue_ms, event_ms  # noqa: E402

CASE = "decode B1 ctx4096"
QKV, O = "N=6144,K=4096", "N=4096,K=4096"
VARIANTS = ("gemv2x256_w2_s1_pre1024/gemv2x1024_w1_s1_pre1024",
            "gemv2x256_w2_s1_pre2048/gemv2x1024_w1_s1_pre2048",
            "gemv2x256_w2_s1_pre512/gemv2x1024_w1_s1_pre2048",
            "gemv2x256_w2_s1/gemv2x1024_w1_s1_pre2048",
            "gemv2x256_w2_s1_pre1024/gemv2x1024_w1_s1")


def _profile(fn, steps: int = 30) -> tuple[list[tuple[str, float]], float]:
    """[(kernel, median us)] in step order and the median step span (first kernel start to
    last kernel end, the upload excluded), steps synchronized as a serving loop runs them."""
    events = step_events(fn, steps, sync=True)
    per = len(events[0])
    durs, spans = [[] for _ in range(per)], []
    for step in events:
        ks = [e for e in step if "Memcpy" not in e.name and "upload_staged" not in e.name]
        spans.append(ks[-1].time_range.end - ks[0].time_range.start)
        for i, e in enumerate(step):
            durs[i].append(e.time_range.end - e.time_range.start)
    names = [e.name[:28] for e in events[0]]
    return [(n, statistics.median(d)) for n, d in zip(names, durs)], statistics.median(spans)


def main(rounds: int, pairs: tuple[str, ...]) -> None:
    variants = {"shipped": {}}
    for p in pairs:
        variants[p] = {(shape, "m1"): cfg for shape, cfg in zip((QKV, O), p.split("/"))}
    fns, errs, outs = load_variants(CASE, variants)
    same = {n: bool(torch.equal(o, outs["shipped"])) for n, o in outs.items()}
    wall = alternated_walls(fns, rounds)
    print(f"{torch.cuda.get_device_name()}; {CASE}; {rounds} rounds, alternated; wall and "
          f"enqueue ms a step, device us (steps synchronized)")
    for n, fn in fns.items():
        kernels, span = _profile(fn)
        print(f"{n:50s} wall {statistics.median(wall[n]):.4f} (rounds "
              f"{' '.join(f'{v:.4f}' for v in wall[n])}) queued {event_ms(fn, calls=20):.4f} "
              f"enqueue {enqueue_ms(fn):.4f} rel err {errs[n]:.1e} bits equal to shipped "
              f"{same[n]}")
        print(f"{'':50s} span {span:.1f} us: " + ", ".join(f"{k} {t:.1f}" for k, t in kernels))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, tuple(sys.argv[2:]) or VARIANTS)
