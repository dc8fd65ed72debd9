"""How long a CUDA graph's host-to-device copy node and the gap to the kernel after it take, by
the copy's size: torch alone, no graphir. A graph of [copy n bytes from pinned memory] ->
[the B64 qkv matmul, 64 x 4096 @ 6144 x 4096 bf16], replayed under torch.profiler with a
synchronize after each replay (--queued: back to back); medians of 20 replays. The decode
step's graph starts the same way (its metadata upload, runtime/cuda/slot_graphs.py), so this
is the floor for its start.
    python3 tools/gpu_sweeps/copy_gap.py [source offset in bytes] [--queued]
"""
import statistics
import sys

import torch

SIZES = (4096, 8192, 9216, 9472, 10240, 12288, 16384, 24576, 32768)


def probe(nbytes: int, offset: int, sync: bool, stream) -> tuple[float, float]:
    """(copy us, gap us from the copy's end to the kernel's start), medians of 20 replays."""
    host = torch.empty(nbytes + 8192, dtype=torch.uint8, pin_memory=True).fill_(1)
    host = host[offset:offset + nbytes]
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for _ in range(2):  # cuBLAS picks and warms its kernel outside the capture
            dev.copy_(host, non_blocking=True)
            x @ w.T
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=stream):
            dev.copy_(host, non_blocking=True)
            x @ w.T
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            g.replay()
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.device_time_total > 0), key=lambda e: e.time_range.start)
    pairs = [(a, b) for a, b in zip(evs, evs[1:]) if "Memcpy" in a.name and "Memcpy" not in b.name]
    copy = statistics.median(a.time_range.end - a.time_range.start for a, _ in pairs)
    gap = statistics.median(b.time_range.start - a.time_range.end for a, b in pairs)
    return copy, gap


def main(argv: list[str]) -> None:
    sync = "--queued" not in argv
    args = [a for a in argv if a != "--queued"]
    offset = int(args[0]) if args else 0
    stream = torch.cuda.Stream()
    for n in SIZES:
        copy, gap = probe(n, offset, sync, stream)
        print(f"{'sync' if sync else 'queued'} offset {offset:5d} {n:7d} B: copy {copy:.2f} us, "
              f"gap to the kernel {gap:.2f} us", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
