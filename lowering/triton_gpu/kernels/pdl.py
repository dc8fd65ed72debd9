"""Programmatic dependent launch (PDL): the prelude every Triton kernel starts with.

A kernel launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start while the
kernel before it in the stream is still running: its launch and setup overlap that kernel's
tail instead of following it (0.3 us a launch, 0.9 us a split-K pair in a CUDA graph on an
H200: tools/gpu_sweeps/pdl.py). Correctness then rests on `griddepcontrol.wait`, which blocks
until every prerequisite grid has finished and its writes are visible, so it must come before
the kernel's first global load or store. `pdl_wait` issues it, then (one-wave grids) lets the
next kernel launch: it waits the same way before touching memory, so the chain stays ordered.

A kernel launched without the attribute finds no prerequisite grid in flight and passes the
wait at once, so the prelude costs nothing there. The offline compiler (aot.compile_kernel)
marks a cubin `launch_pdl` only when its PTX issues the wait before any global memory access;
every other kernel (Gluon kernels, library calls) is launched the ordinary way, fully
serialized. The Triton interpreter has no inline assembly: there the prelude is empty.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

PDL_ON = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def pdl_wait():
    """Wait for the kernels this one depends on; when the grid fits on the SMs at once, let
    the next kernel launch now. A grid of more programs leaves that to its programs' exits:
    the next kernel's programs, resident early, then wait on SMs that the rest of this grid
    needed (H200: a 256-program decode at B64 x 4096 lost 25%, the B64 decode step 7%, while
    the one-wave split-K decode at B1 x 1024 gained 15%; tools/gpu_sweeps/pdl.py)."""
    if PDL_ON:
        gdc_wait()
        _launch_dependents_if_one_wave()


@triton.jit
def _launch_dependents_if_one_wave():
    """griddepcontrol.launch_dependents when the grid (%nctaid) has no more programs than the
    device has SM identifiers (%nsmid), in one asm block: tl.num_programs and a branch around
    the trigger break Triton's warp-specialization pass (matmul_tma's loop)."""
    tl.inline_asm_elementwise(
        "{ .reg .u32 x, y, z, n; .reg .u64 g, t; .reg .pred p;"
        " mov.u32 x, %nctaid.x; mov.u32 y, %nctaid.y; mov.u32 z, %nctaid.z;"
        " mov.u32 n, %nsmid; mul.wide.u32 g, x, y; cvt.u64.u32 t, z; mul.lo.u64 g, g, t;"
        " cvt.u64.u32 t, n; setp.le.u64 p, g, t; @p griddepcontrol.launch_dependents;"
        " mov.u32 $0, 0; }",
        "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# PTX instructions that touch global memory (or generic addresses, which may be global): loads,
# stores, atomics and reductions, async and bulk (TMA) copies, prefetches. Shared, local and
# parameter accesses are the kernel's own and may precede the wait.
_GLOBAL_ACCESS = re.compile(
    r"^\s*(?:@!?%\w+\s+)?(?:(?:ld|st|atom|red|prefetch|prefetchu)"
    r"(?!\.(?:param|shared|local|const)\b)(?:\.|\s)|cp\.|multimem\.)", re.M)


def waits_before_memory(ptx: str) -> bool:
    """Whether PTX issues `griddepcontrol.wait` before its first global memory access: only
    then may the kernel be launched with programmatic stream serialization."""
    at = ptx.find("griddepcontrol.wait")
    if at < 0:
        return False
    return _GLOBAL_ACCESS.search(ptx, 0, at) is None
