"""Where programmatic dependent launch moves the layer's decode step: each kernel of the step,
its device time and the gap before it, under torch.profiler (CUPTI), for one run of the layer of
tools/bench_gpu.py. Run it once with GRAPHIR_PDL=1 and once with 0 (the launch attribute is read
when the artifact loads) and compare the two tables: a kernel launched early starts before its
predecessor ends, so its own time includes the wait, and the step span is what counts. The
metadata upload (kernel or copy; GRAPHIR_UPLOAD_KERNEL=0 for the copy node) is listed with the
kernels.
    GRAPHIR_PDL=1 python3 tools/gpu_sweeps/pdl_layer.py "decode B64 ctx4096" [--sync]
With --sync each step is synchronized before the next is queued, as a serving loop (and the
wall column of bench_gpu.py) runs them; without, steps are queued back to back.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_gpu as bg  # noqa: E402

STEPS = 30


def main(case: str, sync: bool = False) -> None:
    gl = bg.GraphirLayer()
    batch, cached, new = bg.CASES[case]
    x, m, _, _, blocks = bg.layer_inputs(bg.LLAMA8B, batch, cached, new, seed=1)
    args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
    for _ in range(10):
        gl.model.execute(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            gl.model.execute(*args)
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    # The metadata upload (the step graph's upload kernel or copy node, or a copy before it)
    # is listed too: a gap between it and the first kernel is the step's as well.
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.device_time_total > 0),
                 key=lambda e: e.time_range.start)
    per = len(evs) // STEPS
    dur, gap = defaultdict(list), defaultdict(list)
    spans, full = [], []
    for s in range(STEPS):
        step = evs[s * per:(s + 1) * per]
        kernels = [e for e in step if "Memcpy" not in e.name and "upload_staged" not in e.name]
        spans.append(kernels[-1].time_range.end - kernels[0].time_range.start)
        full.append(step[-1].time_range.end - step[0].time_range.start)
        for i, e in enumerate(step):
            key = f"{i:2d} {e.name[:60]}"
            dur[key].append(e.time_range.end - e.time_range.start)
            if i:
                gap[key].append(e.time_range.start - step[i - 1].time_range.end)
    med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")  # noqa: E731
    print(f"GRAPHIR_PDL={os.environ.get('GRAPHIR_PDL', '1')} "
          f"GRAPHIR_SLOT_GRAPHS={os.environ.get('GRAPHIR_SLOT_GRAPHS', '1')} "
          f"GRAPHIR_UPLOAD_KERNEL={os.environ.get('GRAPHIR_UPLOAD_KERNEL', '1')} {case}"
          f"{' (synchronized steps)' if sync else ''}: "
          f"{per} events a step, step span median {med(spans):.1f} us (first kernel start to "
          f"last kernel end), {med(full):.1f} us from the first copy")
    print(f"{'kernel':64s} {'us':>8s} {'gap us':>8s}")
    for k in dur:
        print(f"{k:64s} {med(dur[k]):8.1f} {med(gap[k]):8.1f}")


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--sync"]
    main(argv[0] if argv else "decode B64 ctx4096", "--sync" in sys.argv[1:])
