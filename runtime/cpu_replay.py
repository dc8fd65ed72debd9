"""A CPU model's call replayed: the kernel calls of one input signature with their memref
descriptors built once, only the caller's arrays' and the call's new outputs' pointers
written in before each kernel.

A decode loop calls `CpuModel.execute` with one signature (shapes, dtypes) step after step;
the general path (cpu_executor.CpuModel._run) rebuilds every kernel's descriptors from its
arrays each call: ~110 us of Python for the ten-kernel Q4_K attention layer, 5% of its decode
step. The first call of a signature runs the general path and is traced; the replay keeps
its calls, each argument classified by its memory:
- the start of a caller's input (a kernel reads it as passed, or reshaped): patched per call;
- a fresh output array of that call (handed to the caller): reallocated per call, patched;
- anything else (weights, packed weights, slot memory, symbol arrays): fixed, as long as the
  model's slot memory is the one traced (`slot_version`).
No replay is made (the general path runs every call) when any array cannot be classified so:
a caller array that is not C-contiguous, two inputs sharing memory, an empty array, a pointer
inside a caller array but not at its start, runtime steps or bf16 / float8 conversions; nor
when a kernel function was wrapped (tools/bench_cpu_quant.py --kernels times each call).
"""
from __future__ import annotations

import ctypes

import numpy as np

from .cpu import CpuFunction, data_ptr as _ptr, describe


class Trace:
    """What the general path records for a replay: its kernel calls (function, inputs,
    outputs), the call's fresh arrays, and the plan outputs' arrays."""

    def __init__(self):
        self.calls: list[tuple[CpuFunction, list, list]] = []
        self.fresh: set[int] = set()
        self.outputs: list[np.ndarray] = []
        self.ok = True   # False: the call had what a replay cannot repeat (a runtime step,
        # an input converted to bits: its copy is that call's alone)


class Replay:
    """The traced call of one signature; `run(arrays)` repeats it on new caller arrays of
    that signature (same shapes and dtypes, C-contiguous) and returns the outputs as
    (arrays, ids of the fresh ones)."""

    def __init__(self, calls, fresh_specs, outputs, slot_version: int, keep: list):
        self._calls = calls                # (ctypes fn, buffer, arg addresses, patches)
        self._keep = keep                  # the fixed arrays the descriptors point into
        self._fresh_specs = fresh_specs    # (shape, dtype) of each fresh array
        self._outputs = outputs            # per plan output: (kind, index or array, shape)
        self.slot_version = slot_version

    @staticmethod
    def build(trace: Trace, arrays, slot_version: int) -> "Replay | None":
        if not trace.ok:
            return None
        starts: dict[int, int] = {}
        spans = []
        for k, a in enumerate(arrays):
            if not a.flags.c_contiguous or a.size == 0:
                return None
            p = _ptr(a)
            if p in starts:
                return None
            starts[p] = k
            spans.append((p, p + a.nbytes))
        fresh_at: dict[int, int] = {}
        fresh_specs = []

        def source(a: np.ndarray):
            """("in", k) / ("fresh", j) / ("fixed", None) of an array by its memory."""
            p = _ptr(a)
            if p in starts:
                return "in", starts[p]
            if p in fresh_at:
                return "fresh", fresh_at[p]
            if any(lo <= p < hi for lo, hi in spans):
                return None
            return "fixed", None
        calls, keep = [], []
        for fn, ins, outs in trace.calls:
            if not isinstance(fn, CpuFunction):   # a wrapper (a tool timing each kernel)
                return None
            for o in outs:
                if id(o) in trace.fresh and _ptr(o) not in fresh_at:
                    fresh_at[_ptr(o)] = len(fresh_specs)
                    fresh_specs.append((o.shape, o.dtype))
            arrs = list(ins) + list(outs)
            if any(not a.flags.c_contiguous or a.size == 0 for a in arrs):
                return None
            fields, first = [], []
            for a in arrs:
                describe(a, fields, first)
            buf = (ctypes.c_int64 * len(fields))(*fields)
            base = ctypes.addressof(buf)
            patches = []
            for a, f in zip(arrs, first):
                src = source(a)
                if src is None:
                    return None
                if src[0] != "fixed":
                    patches.append((f, src[0] == "fresh", src[1]))
                else:
                    keep.append(a)
            calls.append((fn.raw, buf, [base + 8 * f for f in first], patches))
        outputs = []
        for v in trace.outputs:
            src = source(v) if v.size else None
            if src is None:
                return None
            outputs.append((src[0], src[1] if src[0] != "fixed" else v, v.shape))
        return Replay(calls, fresh_specs, outputs, slot_version, keep)

    def run(self, arrays) -> tuple[list[np.ndarray], set[int]]:
        fresh = [np.empty(shape, dt) for shape, dt in self._fresh_specs]
        ptrs = [_ptr(a) for a in arrays]
        fptrs = [_ptr(a) for a in fresh]
        for raw, buf, args, patches in self._calls:
            for f, is_fresh, i in patches:
                buf[f] = buf[f + 1] = fptrs[i] if is_fresh else ptrs[i]
            raw(*args)
        outs = []
        for kind, ref, shape in self._outputs:
            a = fresh[ref] if kind == "fresh" else arrays[ref] if kind == "in" else ref
            # as the general path: a kernel's own output array, or a reshaped view of it
            outs.append(a if a.shape == shape else a.reshape(shape))
        return outs, {id(a) for a in fresh}
