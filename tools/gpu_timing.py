"""Timing and checking helpers shared by the GPU benchmark and sweep scripts (torch on CUDA).

Kernel times exclude host launch cost: `graph_ms` captures many calls into one CUDA graph and
times its replays between CUDA events, so a Python launcher's ~20 us per call never shows, for
graphir's kernels and for the peers alike. Inputs rotate among several copies (`rotate`) so that
data smaller than the L2 cache (60 MB on an H200) is not timed out of the cache. Whole steps
(host work included) use `wall_ms`: wall clock around call + synchronize.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

L2_BYTES = 64 << 20  # a little above the H100 (50 MB) and H200 (60 MB) L2 caches


def copies_to_beat_l2(nbytes: int, at_least: int = 1) -> int:
    """How many copies of an input of `nbytes` make the rotation larger than 4x the L2."""
    return max(at_least, min(64, -(-4 * L2_BYTES // max(nbytes, 1))))


def graph_ms(fns: Callable[[], object] | Sequence[Callable[[], object]], calls: int = 40,
             batches: int = 7, warmup: int = 3) -> float:
    """Median device time per call in ms: `calls` calls (cycling through `fns`) captured in one
    CUDA graph, replayed `batches` times between events; falls back to queued launches when a
    call cannot be captured (the fallback then includes launch gaps)."""
    fns = [fns] if callable(fns) else list(fns)
    for f in fns * warmup:
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            with torch.cuda.graph(g, stream=stream):
                for i in range(calls):
                    fns[i % len(fns)]()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (not capturable: time queued launches instead)
        torch.cuda.synchronize()
        return event_ms(fns, calls, batches)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def event_ms(fns, calls: int = 20, batches: int = 7, warmup: int = 3) -> float:
    """Median over batches of the mean time of `calls` calls queued back to back between two
    events (host launch gaps included when a call is shorter than its launch)."""
    fns = [fns] if callable(fns) else list(fns)
    for f in fns * warmup:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(calls):
            fns[i % len(fns)]()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def wall_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Median wall time of fn() + synchronize in ms (host work included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def enqueue_ms(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Median host time of fn() alone (no synchronize inside the timed region): what a serving
    loop pays on the CPU per call before the GPU work is queued."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; NaN anywhere gives inf (never passes)."""
    g, w = got.double(), want.double()
    if not torch.isfinite(g).all():
        return float("inf")
    return ((g - w).norm() / w.norm().clamp_min(1e-300)).item()


def copy_gbs(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) of a `nbytes` device copy.

    Timed with queued launches, not a captured graph: a copy captured into a CUDA graph becomes
    a memcpy node served by the copy engines (~2.8 TB/s on an H200), not the SM copy kernel
    (~4.3 TB/s) that eager copies and every kernel's own loads run at. At 1 GiB per call the
    launch gaps are negligible."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src), calls=10)
    return 2 * nbytes / ms / 1e6


def gemm_tflops(n: int = 8192) -> float:
    """cuBLAS bf16 rate on random data (n x n x n), TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = graph_ms(lambda: a @ b, calls=5, batches=5)
    return 2 * n ** 3 / ms / 1e9


def table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    """A plain aligned text table (the last thing a GPU script prints)."""
    rows = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
