"""Programmatic dependent launch (PDL): the prelude every Triton kernel starts with.

A kernel launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start while the
kernel before it in the stream is still running: its launch and setup overlap that kernel's
tail instead of following it (0.3 us a launch, 0.9 us a split-K pair in a CUDA graph on an
H200: tools/gpu_sweeps/pdl.py). Correctness then rests on `griddepcontrol.wait`, which blocks
until every prerequisite grid has finished and its writes are visible, so it must come before
the kernel's first global load or store. `pdl_wait` issues it, then lets the next kernel launch
(it waits the same way before touching memory, so the chain stays ordered).

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
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

PDL_ON = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def pdl_wait():
    """Wait for the kernels this one depends on, then let the next one launch."""
    if PDL_ON:
        gdc_wait()
        gdc_launch_dependents()


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
