"""How long a CUDA graph's host-to-device copy node and the gap to the kernel after it take, by
the copy's size: torch alone, no graphir. A graph of [copy n bytes from pinned memory] ->
[the B64 qkv matmul, 64 x 4096 @ 6144 x 4096 bf16], replayed with a synchronize each time under
torch.profiler; medians of 20 replays. The decode step's graph starts the same way (its
metadata upload, runtime/cuda/slot_graphs.py), so this is the floor for its start.
    python3 tools/gpu_sweeps/copy_gap.py [source offset in bytes]
"""
import statistics
import sys

import torch

torch.cuda.init()
s = torch.cuda.Stream()
OFF = int(sys.argv[1]) if len(sys.argv) > 1 else 0
for nbytes in (4096, 8192, 9216, 9472, 10240, 12288, 16384, 24576, 32768):
    host = torch.empty(nbytes + 8192, dtype=torch.uint8, pin_memory=True).fill_(1)[OFF:OFF + nbytes]
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        for _ in range(2):
            dev.copy_(host, non_blocking=True); y = x @ w.T
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            dev.copy_(host, non_blocking=True)
            y = x @ w.T
    for _ in range(10): g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            g.replay(); torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0), key=lambda e: e.time_range.start)
    gaps, cps = [], []
    for a, b in zip(evs, evs[1:]):
        if "Memcpy" in a.name and "Memcpy" not in b.name:
            gaps.append(b.time_range.start - a.time_range.end); cps.append(a.time_range.end - a.time_range.start)
    print(f"off {OFF:5d} {nbytes:7d} B: copy {statistics.median(cps):.2f} us, gap to kernel {statistics.median(gaps):.2f} us", flush=True)
