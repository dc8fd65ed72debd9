"""Programmatic dependent launch (PDL): what a launch gap costs between dependent kernels in a
CUDA graph, and what griddepcontrol saves. Each kernel adds 1 to its input, so a chain of N
launches must end at x + N (checked before timing: a launch that overtook its predecessor's
writes shows up as a wrong count). Kernels: one program (launch-bound), a 4 MB pass over 256
programs, and a split (64 programs of 64 KB) + reduce (one program) pair like split-K decode.
    python3 tools/gpu_sweeps/pdl.py
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from graphir.tools.gpu_timing import graph_ms


@triton.jit
def _inc(x, y, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n) + 1.0, mask=offs < n)


@triton.jit
def _split(x, part, n_per, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n_per, BLOCK):
        acc += tl.load(x + pid * n_per + i + tl.arange(0, BLOCK))
    tl.store(part + pid, tl.sum(acc))


@triton.jit
def _reduce(part, x, NP: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    s = tl.sum(tl.load(part + tl.arange(0, NP)))
    # Written back into x's first element so the next split depends on this reduce.
    tl.store(x, tl.load(x) + 0.0 * s + 1.0)


def launches(case, pdl, x, y):
    """The chain's calls: for "inc" x -> y then y -> x (each reads what the last wrote), for
    "split" a split + reduce pair (the reduce writes x[0], which the next split reads)."""
    if case == "split":
        part = torch.empty(64, device="cuda", dtype=torch.float32)
        n_per = x.numel() // 64

        def pair():
            _split[(64,)](x, part, n_per, BLOCK=1024, PDL=pdl, launch_pdl=pdl, num_warps=4)
            _reduce[(1,)](part, x, NP=64, PDL=pdl, launch_pdl=pdl, num_warps=1)
        return [pair]
    n = x.numel()
    block = 1024 if n <= 1024 else 4096
    grid = (triton.cdiv(n, block),)
    return [lambda a=a, b=b: _inc[grid](a, b, n, BLOCK=block, PDL=pdl, launch_pdl=pdl,
                                        num_warps=4) for a, b in ((x, y), (y, x))]


def per_call_us(case, pdl, numel, n_calls=200):
    x = torch.randint(-1000, 1000, (numel,), device="cuda").float()  # sums stay exact
    want = x.clone()
    y = torch.empty_like(x)
    fns = launches(case, pdl, x, y)
    for i in range(n_calls):  # compile + correctness: every launch saw its predecessor's writes
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    if case == "split":
        want[0] += n_calls
    else:
        want += n_calls
    if not torch.equal(x, want):
        sys.exit(f"FAILED: {case} pdl={pdl}: the chain lost an ordering")
    return graph_ms(fns, calls=n_calls) * 1e3


def main() -> None:
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))
    rows = [("one program, 1024 floats", "inc", 1024), ("4 MB over 256 programs", "inc", 1 << 20),
            ("32 MB over 2048 programs", "inc", 1 << 23),
            ("split 64 x 64 KB + reduce (a pair)", "split", 1 << 20)]
    print("| kernel chain | us per call, plain | with PDL | saved |")
    print("| --- | --- | --- | --- |")
    for name, case, numel in rows:
        plain = per_call_us(case, False, numel)
        pdl = per_call_us(case, True, numel)
        print(f"| {name} | {plain:.2f} | {pdl:.2f} | {plain - pdl:.2f} |")


if __name__ == "__main__":
    main()
