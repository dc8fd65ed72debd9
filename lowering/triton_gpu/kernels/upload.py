"""The per-call metadata upload as a kernel: staged bytes from pinned host memory to the device.

A decode step's CUDA graph starts by bringing the call's host inputs (row offsets, cache
lengths, the page table) from a pinned staging slot to the device. As a copy node the copy
engine took 1.2 us and the first kernel started 5 us after it (an H200, 9 KB,
tools/gpu_sweeps/copy_gap.py); read by the SMs through the slot's device mapping (pinned
memory is device-addressable under unified addressing) the same bytes took 2.0 us with 0.3 us
to the next kernel. In the layer on an H100 that is 7 us less device time a step at B64 x 4096
(1.2 us at B1) when steps are queued ahead; a synchronized step's wall time did not move
(59.7 against 59.5 us at B1): there the graph launch's own latency decides when the first
kernel starts (BENCHMARKS.md, twenty-fifth session).

The kernel lets the next one launch at once (griddepcontrol.launch_dependents): a kernel that
waits before touching memory just waits on its SM, and the one-row qkv GEMV, which reads only
x and weights before its wait (matmul_skinny's LATE_WAIT; x came as a device tensor, the
runtime checks), streams its weight while the upload runs.

Each program copies one block of 4-byte words with all its loads issued at once (one PCIe
round trip); program 0 also copies the 0-3 bytes past the last whole word, so nothing past
`nbytes` is read or written.

Every cuda artifact carries one compiled copy under UPLOAD_KEY (lowering/triton_gpu/
backend.py); the runtime launches it where a slot graph captures its upload
(runtime/cuda/upload_kernel.py, slot_graphs.py), which holds the parameter list and the grid
rule. Both addresses must be 4-byte aligned (the launcher checks).
"""
from __future__ import annotations

import triton
import triton.language as tl

from graphir.runtime.cuda.upload_kernel import PARAMS, UPLOAD_KEY, programs

from .pdl import pdl_trigger
from .spec import KernelSpec

__all__ = ["UPLOAD_KEY", "upload_spec", "upload_staged"]
WORDS = 1024  # 4 KB a program


@triton.jit
def upload_staged(src, dst, nbytes, WORDS: tl.constexpr):
    pdl_trigger()
    pid = tl.program_id(0)
    nw = nbytes // 4
    o = pid * WORDS + tl.arange(0, WORDS)
    m = o < nw
    w = tl.load(src.to(tl.pointer_type(tl.int32)) + o, mask=m)
    tl.store(dst.to(tl.pointer_type(tl.int32)) + o, w, mask=m)
    t = nw * 4 + tl.arange(0, 4)
    mt = (t < nbytes) & (pid == 0)
    tl.store(dst + t, tl.load(src + t, mask=mt), mask=mt)


def grid(nbytes: int) -> tuple[int, int, int]:
    return (programs(nbytes, WORDS), 1, 1)


def upload_spec() -> KernelSpec:
    return KernelSpec(
        name="upload_staged", fn=upload_staged,
        signature={**dict(PARAMS), "WORDS": "constexpr"}, constexprs={"WORDS": WORDS},
        num_warps=4, num_stages=1, grid=grid, grid_args=("nbytes",),
        notes="the slot graphs' metadata upload (runtime/cuda/slot_graphs.py)")
