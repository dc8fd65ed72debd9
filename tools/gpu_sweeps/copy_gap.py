"""How long a CUDA graph's host-to-device copy node and the gap to the kernel after it take, by
the copy's size: torch alone, no graphir. A graph of [copy n bytes from pinned memory] ->
[the B64 qkv matmul, 64 x 4096 @ 6144 x 4096 bf16], replayed under torch.profiler with a
synchronize after each replay (--queued: back to back); medians of 20 replays. The decode
step's graph starts the same way (its metadata upload, runtime/cuda/slot_graphs.py), so this
is the floor for its start.
With --kernel the copy is a Triton kernel (4 KB a program) reading the pinned host memory through its
device mapping (unified addressing: the host pointer is valid on the device), on the SMs
instead of the copy engine.
    python3 tools/gpu_sweeps/copy_gap.py [source offset in bytes] [--queued] [--kernel]
"""
import statistics
import sys

import torch

import triton
import triton.language as tl

SIZES = (4096, 8192, 9216, 9472, 10240, 12288, 16384, 24576, 32768)


@triton.jit
def _upload(src, dst, n, BLOCK: tl.constexpr):
    # one block of words a program, every load issued at once: one PCIe round trip
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + o, tl.load(src + o, mask=o < n), mask=o < n)


def _copy(dev, host, kernel: bool):
    if kernel:      # int32 words: the sizes here are multiples of 4
        n = dev.numel() // 4
        _upload[(triton.cdiv(n, 1024),)](host.view(torch.int32), dev.view(torch.int32), n,
                                         BLOCK=1024, num_warps=4)
    else:
        dev.copy_(host, non_blocking=True)


def probe(nbytes: int, offset: int, sync: bool, stream, kernel: bool = False):
    """(copy us, gap us from the copy's end to the kernel's start), medians of 20 replays."""
    host = torch.empty(nbytes + 8192, dtype=torch.uint8, pin_memory=True).fill_(1)
    host = host[offset:offset + nbytes]
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for _ in range(2):  # cuBLAS picks and warms its kernel outside the capture
            _copy(dev, host, kernel)
            x @ w.T
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=stream):
            _copy(dev, host, kernel)
            x @ w.T
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    host.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), host), "the upload copied wrong bytes"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            g.replay()
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.device_time_total > 0), key=lambda e: e.time_range.start)
    first = "_upload" if kernel else "Memcpy"
    pairs = [(a, b) for a, b in zip(evs, evs[1:]) if first in a.name and first not in b.name]
    copy = statistics.median(a.time_range.end - a.time_range.start for a, _ in pairs)
    gap = statistics.median(b.time_range.start - a.time_range.end for a, b in pairs)
    return copy, gap


def main(argv: list[str]) -> None:
    sync, kernel = "--queued" not in argv, "--kernel" in argv
    args = [a for a in argv if not a.startswith("--")]
    offset = int(args[0]) if args else 0
    stream = torch.cuda.Stream()
    for n in SIZES:
        copy, gap = probe(n, offset, sync, stream, kernel)
        print(f"{'kernel ' if kernel else ''}{'sync' if sync else 'queued'} offset {offset:5d} {n:7d} B: copy {copy:.2f} us, "
              f"gap to the kernel {gap:.2f} us", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
