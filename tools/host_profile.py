"""Host cost of one `model.execute` of the CUDA executor, measured without a GPU.

The real executor, CudaDevice, pinned ring and kernels run against `FakeDriver`: every libcuda
entry point of runtime/cuda/driver.py answers at once (launches, copies and graph replays do
nothing; allocations hand out fake device addresses; page-locked host memory is real host
memory), and each call is counted. What is left is the Python and numpy work a call costs on
the host, which is what bounds a B1 decode step, plus the fakes' own (~0.5 us per driver
call on a slow core, about what a ctypes call costs; a real driver call costs a few us more).
Totals are this thread's CPU time (robust on a shared machine); the per-phase split reads the
wall clock around wrapped methods and is for ratios.

    python -m graphir.tools.host_profile            # per-phase table, decode B1 / B64, prefill
    python -m graphir.tools.host_profile --general  # plus the general path, for comparison
    python -m graphir.tools.host_profile --cprofile # plus the top functions of one case

Torch CUDA tensors are stood in for by CPU tensors that report device 0 (`cuda_like`), so the
torch attribute reads of the fast path cost what they cost on a GPU host.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
import threading
import time
from collections import Counter

import numpy as np

_HOST_KEEP: list = []  # the fake "pinned" host memory, never freed
# cuDeviceGetAttribute answers (H200-like); every other entry point returns 0, those in
# FakeDriver.table also write an out-parameter.
_DEVICE_ATTRS = {8: 49152, 16: 132, 38: 60 << 20, 75: 9, 76: 0, 81: 233472, 97: 232448}


class FakeDriver:
    """libcuda stand-in installed into runtime.cuda.driver (see the module docstring).

    `calls` counts every entry point by name and `last` holds each one's latest arguments;
    `results` makes an entry point return other codes (name -> list of codes, one per call,
    then 0). `install()` / `uninstall()` swap the driver module's state and put the previous
    state back (use it as a context manager)."""

    def __init__(self):
        from graphir.runtime.cuda import driver

        # Every name present from the start, so counting costs the same on every call.
        self.calls: Counter = Counter({name: 0 for name in driver._PROTOTYPES})
        self.last: dict[str, tuple] = {}
        self.results: dict[str, list] = {}
        self._next_ptr = 0x7F00_0000_0000
        self._next_handle = 0x1000
        self.handed: set[int] = set()  # every fake handle and address given out
        self._saved = None
        # A capture by other code (torch) in CUDA's global mode: frees made meanwhile by a
        # thread whose capture mode is not relaxed fail and break it, as the driver does.
        self.foreign_capture = False
        self.broken_captures = 0
        self.capture_mode = 0

    # -- out-parameters ----------------------------------------------------------------------
    @staticmethod
    def _set(ref, value) -> None:
        obj = getattr(ref, "_obj", ref)  # ctypes.byref(x) -> x
        obj.value = value

    def _handle(self, ref, *_):
        self._next_handle += 16
        self.handed.add(self._next_handle)
        self._set(ref, self._next_handle)
        return 0

    def _alloc(self, ref, nbytes):
        self.handed.add(self._next_ptr)
        self._set(ref, self._next_ptr)
        self._next_ptr += -(-max(int(nbytes), 1) // 4096) * 4096 + 4096
        return 0

    def _alloc_host(self, ref, nbytes):
        # Never freed: numpy views of "pinned" arrays may outlive the fake.
        mem = ctypes.create_string_buffer(max(int(nbytes), 1) + 4096)
        _HOST_KEEP.append(mem)
        addr = -(-ctypes.addressof(mem) // 4096) * 4096
        self.handed.add(addr)
        self._set(ref, addr)
        return 0

    def _int(self, value):
        def f(ref, *_):
            self._set(ref, value)
            return 0
        return f

    def _attr(self, ref, attr, *_):
        self._set(ref, _DEVICE_ATTRS.get(int(attr), 0))
        return 0

    def _func_attr(self, ref, attr, *_):
        self._set(ref, 1024 if int(attr) == 0 else 0)
        return 0

    def _name(self, buf, n, dev):
        buf.value = b"Fake H200"
        return 0

    def _err(self, code, ref):
        self._set(ref, b"CUDA_ERROR_FAKE")
        return 0

    def _exchange_mode(self, ref):
        obj = getattr(ref, "_obj", ref)
        obj.value, self.capture_mode = self.capture_mode, obj.value
        return 0

    def _unsafe(self, *_):
        from graphir.runtime.cuda.driver import CAPTURE_MODE_RELAXED

        if self.foreign_capture and self.capture_mode != CAPTURE_MODE_RELAXED:
            self.broken_captures += 1
            return 900      # CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
        return 0

    def table(self) -> dict:
        from graphir.runtime.cuda import driver

        special = {
            "cuDriverGetVersion": self._int(13000), "cuDeviceGetCount": self._int(1),
            "cuDeviceGet": lambda ref, ordinal: self._set(ref, int(ordinal)) or 0,
            "cuDeviceGetName": self._name, "cuDeviceGetAttribute": self._attr,
            "cuDeviceTotalMem_v2": self._int(141 << 30), "cuDevicePrimaryCtxRetain": self._handle,
            "cuCtxGetCurrent": self._handle, "cuMemAlloc_v2": self._alloc,
            "cuMemAllocHost_v2": self._alloc_host,
            "cuModuleLoadData": self._handle, "cuModuleGetFunction": self._handle,
            "cuFuncGetAttribute": self._func_attr, "cuStreamCreate": self._handle,
            "cuEventCreate": self._handle, "cuStreamEndCapture": self._handle,
            "cuGraphInstantiateWithFlags": self._handle, "cuStreamIsCapturing": self._int(0),
            "cuGetErrorName": self._err, "cuGetErrorString": self._err,
            "cuThreadExchangeStreamCaptureMode": self._exchange_mode,
            **{name: self._unsafe for name in ("cuMemFree_v2", "cuMemFreeHost",
                                               "cuModuleUnload")},
        }
        out = {}
        for name in driver._PROTOTYPES:
            fn = special.get(name, lambda *a: 0)
            out[name] = self._counted(name, fn)
        return out

    def _counted(self, name, fn):
        calls, last, results = self.calls, self.last, self.results

        def call(*args):
            calls[name] += 1
            last[name] = args
            rc = fn(*args)
            queued = results.get(name)
            return queued.pop(0) if queued else rc
        return call

    def install(self) -> "FakeDriver":
        from graphir.runtime.cuda import driver

        self._saved = (driver._lib, dict(driver._funcs), driver._initialized,
                       dict(driver._primary), driver._tls, driver._load_error)
        driver._funcs.clear()
        driver._funcs.update(self.table())
        driver._lib, driver._initialized, driver._load_error = object(), True, None
        driver._primary.clear()
        driver._tls = threading.local()
        return self

    def uninstall(self) -> None:
        import gc
        import weakref

        from graphir.runtime.cuda import driver

        gc.collect()  # what died meanwhile is freed against the fake
        # What still lives must never reach the real driver with a fake handle.
        for f in list(getattr(weakref.finalize, "_registry", ())):
            info = f.peek()
            if info and any(isinstance(a, int) and a in self.handed for a in info[2]):
                f.detach()
        lib, funcs, init, primary, tls, err = self._saved
        driver._funcs.clear()
        driver._funcs.update(funcs)
        driver._lib, driver._initialized, driver._tls, driver._load_error = lib, init, tls, err
        driver._primary.clear()
        driver._primary.update(primary)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


@contextlib.contextmanager
def cuda_like():
    """CPU torch tensors report CUDA device 0 (is_cuda, device, get_device) meanwhile."""
    import torch

    T = torch.Tensor
    saved = {k: T.__dict__.get(k) for k in ("is_cuda", "get_device", "device")}
    cuda0 = torch.device("cuda", 0)
    T.is_cuda = property(lambda self: True)
    T.get_device = lambda self: 0
    T.device = property(lambda self: cuda0)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(T, k)
            else:
                setattr(T, k, v)


class FakeFunction:
    """What Kernel needs of a loaded function."""

    def __init__(self, name: str):
        self.handle, self.name, self.max_threads_per_block = id(self), name, 1024

    def set_max_dynamic_shared(self, nbytes: int) -> None:
        pass


def fake_kernels(program) -> dict:
    """Kernel objects for every kernel of a lowered program (fake functions, real packing).
    A kernel that reads before its PDL wait is marked for PDL, as the offline compiler marks
    it once its PTX checks out (kernels/pdl.py); the others launch the ordinary way."""
    from graphir.runtime.cuda.kernel import Kernel
    from graphir.runtime.cuda.module import LaunchSpec

    out = {}
    for key, spec in program.kernels.items():
        names = [n for n, _ in spec.runtime_params()]
        params = tuple(t for _, t in spec.runtime_params())
        early = tuple(names.index(n) for n in spec.pdl_early_reads)
        ls = LaunchSpec(spec.name, params, num_warps=max(spec.num_warps, 1),
                        param_names=tuple(names), pdl=bool(early), early_reads=early)
        out[key] = Kernel(FakeFunction(spec.name), ls)
    return out


def load_layer(graph, stream: int | None = 0x5EED, use_graphs: bool = True):
    """The graph lowered and loaded on the fake driver (weights as fake device buffers)."""
    from graphir.lowering.triton_gpu.backend import lower
    from graphir.runtime.cuda.device_model import CudaDevice
    from graphir.runtime.cuda.executor import PlanExecutor
    program = lower(graph)
    dev = CudaDevice(fake_kernels(program), 0, stream)
    # numpy (the stacked qkv weight is computed on the host at load time); zeros: nothing
    # reads the numbers
    weights = {n: np.zeros(v.type.static_shape(), np.float32) for n, v in graph.weights.items()}
    return PlanExecutor(program.plan.to_json(), graph, dev, weights, use_graphs)


def aligned_empty(shape, dtype, align: int = 512):
    """An uninitialized CPU tensor at an `align`-byte aligned address, as torch's CUDA caching
    allocator hands them out (CPU allocations are only 64-byte aligned)."""
    import math

    import torch

    n = math.prod(shape)
    item = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(n * item + align, dtype=torch.uint8)
    off = -raw.data_ptr() % align
    return raw[off:off + n * item].view(dtype).view(shape)


def step_args(batch: int, cached: int, new: int, *, page: int = 128, hidden: int = 4096,
              nkv: int = 8, d: int = 128, seed: int = 0):
    """A step's inputs as bench_gpu.py passes them: torch x and blocks, numpy metadata."""
    import torch

    pages = -(-(cached + new) // page)
    rng = np.random.default_rng(seed)
    lut = rng.permutation(batch * pages).reshape(batch, pages).astype(np.uint32)
    x = aligned_empty((batch * new, hidden), torch.bfloat16)
    # Never touched: the fake driver reads nothing, so the pages stay unmapped.
    blocks = torch.empty(batch * pages + 1, 2, 1, page, nkv, d, dtype=torch.bfloat16)
    return (x, (np.arange(batch + 1) * new).astype(np.uint32),
            blocks, np.full(batch, cached, np.uint32), lut,
            np.array([[new, cached + new]], np.uint32))


# -- phases ----------------------------------------------------------------------------------
# (owner, method name, phase) wrapped with timers by `phase_times`; the owner is an attribute
# path from the executor, or "class:" and a class path. Indented phases run inside the one
# above them.
PHASES = [
    ("", "_signature", "signature (shapes, bytes)"),
    ("dev", "read_tensor", "  torch tensor reads"),
    ("class:graphir.runtime.ragged.FastFacts", "__call__", "ragged check + facts"),
    ("", "_hit", "stage + launch + end"),
    ("dev", "staging_view", "  acquire staging slot"),
    ("dev", "upload_staged", "  HtoD copy (1 call)"),
    ("dev", "copy_in", "  DtoD copies of tensors"),
    ("dev", "end_call", "  end call (event record)"),
    ("", "_call", "general path (misses)"),
]
LAUNCH_PHASE = "  graph launch (1 call)"


def _owner(ex, path: str):
    if path.startswith("class:"):
        import importlib

        mod, _, name = path[6:].rpartition(".")
        return getattr(importlib.import_module(mod), name)
    obj = ex
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj


@contextlib.contextmanager
def phase_times(ex):
    """Wrap the executor's phase methods (those it has) with timers: {phase: [ns, calls]}."""
    acc: dict[str, list] = {}
    undo = []
    clock = time.perf_counter_ns
    for path, name, phase in PHASES:
        obj = _owner(ex, path)
        fn = getattr(obj, name, None) if obj is not None else None
        if fn is None or not callable(fn):
            continue
        cell = acc.setdefault(phase, [0, 0])

        def timed(*a, _fn=fn, _cell=cell, **kw):
            t0 = clock()
            try:
                return _fn(*a, **kw)
            finally:
                _cell[0] += clock() - t0
                _cell[1] += 1
        had = name in vars(obj)
        undo.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, timed)
    # The fast path's closures bound per (signature, plan) and per graph reading device
    # tensors in place: the staging slot, the staged copy and the launch (one driver call
    # each).
    ios = [io for e in getattr(ex, "_sigs", {}).values() for io in e.plans.values()]
    ios += [d for io in ios for d in (getattr(io, "direct", None) or {}).values()]
    for attr, phase in (("view", "  acquire staging slot"), ("upload", "  HtoD copy (1 call)"),
                        ("launch", LAUNCH_PHASE)):
        cell = acc.setdefault(phase, [0, 0])
        for io in ios:
            fn = getattr(io, attr, None)
            if fn is None:
                continue

            def timed_io(*a, _fn=fn, _cell=cell):
                t0 = clock()
                try:
                    return _fn(*a)
                finally:
                    _cell[0] += clock() - t0
                    _cell[1] += 1
            undo.append((io, attr, True, fn))
            setattr(io, attr, timed_io)
    try:
        yield acc
    finally:
        for obj, name, had, old in reversed(undo):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def per_call_us(fn, calls: int = 2000, repeats: int = 7, clock=time.thread_time_ns) -> float:
    """The least over repeats of the mean time of fn() in microseconds. The default clock is
    this thread's CPU time, so time spent descheduled on a shared machine does not count."""
    out = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        out.append((clock() - t0) / calls / 1e3)
    return min(out)


def host_phases(ex, call, calls: int = 1000, rounds: int = 5) -> dict[str, float]:
    """Microseconds per call of each phase of `call()` (an execute of `ex`, warmed up), in
    PHASES order: per phase the least over a few rounds (the timers read the wall clock).
    The timers add ~0.1-1 us to each phase they wrap; the split is for ratios."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        with phase_times(ex) as acc:
            for _ in range(max(calls // rounds, 1)):
                call()
        for k, (ns, n) in acc.items():
            if n:
                best[k] = min(best.get(k, float("inf")), ns / n / 1e3)
    order = [k for _, _, k in PHASES]
    order.insert(order.index("  end call (event record)"), LAUNCH_PHASE)
    return {k: best[k] for k in order if k in best}


CASES = {"decode B1 ctx4096": (1, 4096, 1), "decode B64 ctx4096": (64, 4096, 1),
         "prefill B4x2048": (4, 0, 2048), "prefill B1x8192": (1, 0, 8192)}


def profile_case(ex, fake: FakeDriver, case: str, calls: int = 2000) -> dict:
    """Warm the case's key (build, capture, replay), then time cache hits: the total per call,
    a per-phase split (timers around the phase methods, so it sums to a bit more) and the
    driver calls per hit."""
    args = step_args(*CASES[case])
    for _ in range(3):
        ex.execute(*args)
    total = per_call_us(lambda: ex.execute(*args), calls)
    before = Counter(fake.calls)
    ex.execute(*args)
    driver_calls = {k: v - before.get(k, 0) for k, v in fake.calls.items()
                    if v != before.get(k, 0)}
    phases = host_phases(ex, lambda: ex.execute(*args), calls)
    return {"us_per_call": total, "phases_us": phases, "driver_calls": driver_calls,
            "plans": len(ex._plans), "stats": dict(ex.stats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cprofile", metavar="CASE", nargs="?", const="decode B1 ctx4096")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--general", action="store_true",
                    help="also time the general path (the fast path switched off)")
    a = ap.parse_args(argv)
    from graphir.examples.llama_attention import build

    with FakeDriver() as fake, cuda_like():
        ex = load_layer(build())
        for case in a.cases.split(","):
            r = profile_case(ex, fake, case, a.calls)
            print(f"\n{case}: {r['us_per_call']:.1f} us/call (cache hit), "
                  f"driver calls {r['driver_calls']}")
            for k, v in r["phases_us"].items():
                print(f"   {k:30s} {v:6.1f} us")
            if a.general:
                ex._fast = False
                args = step_args(*CASES[case])
                print(f"   general path: {per_call_us(lambda: ex.execute(*args), a.calls):.1f}"
                      f" us/call")
                ex._fast = True
        if a.cprofile:
            import cProfile
            import pstats

            args = step_args(*CASES[a.cprofile])
            ex.execute(*args)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.calls):
                ex.execute(*args)
            pr.disable()
            pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
