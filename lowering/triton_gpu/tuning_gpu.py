"""Timing tuning candidates on this machine's GPU, through graphir's own CUDA runtime.

`GpuMeasurer(target)(family, facts, config, size)` compiles the config's kernels offline (the
same cubins an artifact ships; `prepare()` compiles a whole list in parallel worker processes),
uploads the family's random inputs once, checks one run against the float64 reference (outputs
are NaN-poisoned first, so a tile nobody wrote fails), then times it: many launches captured in
one CUDA graph, replayed between events, median of several replays. Inputs the family marks
`rotate` (the weight) get enough copies that consecutive launches never find it in the L2.
A library candidate (cuBLASLt) also returns `params`: the record of the algorithm it ran,
which the manifest keeps when it wins.

The runtime is imported lazily: the compiler reaches the GPU only when asked to tune.
"""
from __future__ import annotations

import importlib
import os
import pickle
import statistics
from typing import Callable, Iterable

from graphir import progress

from .lowerings.base import spec_key

L2_ROTATE_BYTES = 4 * (64 << 20)   # rotate until the copies span 4x an H200's 60 MB L2
MAX_COPIES = 16
BATCH_MS = 3.0                     # each timed replay runs about this long
CACHE_LIMIT = 8 << 30              # device bytes of inputs kept between measurements


def unavailable_reason(target, device: int = 0) -> str | None:
    """Why tuning cannot run here for `target` (a triton GPUTarget), or None when it can."""
    try:
        from graphir.runtime.cuda import driver

        if not driver.is_available():
            return "no CUDA driver or device was found"
        props = driver.device_properties(device)
    except Exception as e:  # noqa: BLE001  (any failure means: no usable GPU)
        return f"{type(e).__name__}: {e}"
    cc = props.compute_capability[0] * 10 + props.compute_capability[1]
    if cc != int(target.arch):
        return f"GPU {device} ({props.name}) is sm_{cc}, the target is sm_{target.arch}"
    return None


def _job(spec) -> tuple:
    fn = getattr(spec.fn, "fn", spec.fn)
    return (fn.__module__, fn.__name__, dict(spec.signature), dict(spec.constexprs),
            spec.num_warps, spec.num_stages, tuple(spec.divisible_by_16),
            getattr(spec, "maxnreg", None), tuple(getattr(spec, "pdl_early_reads", ())))


def _compile_job(job: tuple, arch: int):
    from triton.backends.compiler import GPUTarget

    from .aot import compile_kernel

    module, name, sig, ce, warps, stages, div, maxnreg, early = job
    fn = getattr(importlib.import_module(module), name)
    return compile_kernel(fn, sig, ce, warps, stages, GPUTarget("cuda", arch, 32), div, maxnreg,
                          early)


def compile_specs(specs: dict, arch: int, workers: int | None = None,
                  desc: str = "compile candidates") -> dict:
    """{key: CompiledCubin or the Exception it raised} for {key: KernelSpec}, compiled in
    parallel worker processes (compile_worker.py: fresh interpreters, so this process may hold
    a CUDA context and its __main__ is never imported again)."""
    jobs = {k: _job(s) for k, s in specs.items()}
    with progress.bar(len(jobs), desc=desc, unit="kernel") as bar:
        return _compile_all(jobs, arch, min(len(jobs), workers or os.cpu_count() or 1, 16), bar)


def _compile_all(jobs: dict, arch: int, workers: int, bar) -> dict:
    """Each of `workers` threads drives one worker process, taking jobs from a shared queue;
    jobs no worker could take (it did not start, or died) compile in this process."""
    import queue
    import subprocess
    import sys
    import threading

    from .compile_worker import recv, send

    out: dict = {}
    todo: queue.Queue = queue.Queue()
    for item in jobs.items():
        todo.put(item)
    lock = threading.Lock()
    # Workers compile whatever this process runs under: Triton's interpreter cannot compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def drive():
        try:
            proc = subprocess.Popen([sys.executable, "-m",
                                     "graphir.lowering.triton_gpu.compile_worker", str(arch)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError:
            return
        try:
            while True:
                try:
                    key, job = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    send(proc.stdin, job)
                    res = recv(proc.stdout)
                except (EOFError, OSError, pickle.UnpicklingError):
                    todo.put((key, job))      # the worker is gone: leave the job to others
                    return
                with lock:
                    out[key] = res
                    bar.update()
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()

    if workers > 1:
        threads = [threading.Thread(target=drive, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    while not todo.empty():
        key, job = todo.get()
        try:
            out[key] = _compile_job(job, arch)
        except Exception as e:  # noqa: BLE001  (recorded per kernel)
            out[key] = e
        bar.update()
    return out


class GpuMeasurer:
    """The `measure` of tuning.tune() on a real GPU (see the module docstring)."""

    def __init__(self, target, device: int = 0, say: Callable[[str], None] = lambda m: None,
                 workers: int | None = None):
        from graphir.runtime.cuda import Stream, driver

        props = driver.device_properties(device)
        self.device_name, self.device, self.arch = props.name, device, int(target.arch)
        self.stream = Stream(device=device)
        self.say, self.workers = say, workers
        self.compiled: dict = {}
        self._kernels: dict = {}
        self._host: dict = {}
        self._dev: dict = {}
        self._libs: dict = {}

    # -- kernels --------------------------------------------------------------------------
    def prepare(self, items: Iterable[tuple]) -> None:
        """Compile, in parallel, the Triton kernels of [(family, facts, config, size)]."""
        want = {}
        for fam, facts, cfg, size in items:
            for spec in fam.launches(cfg, facts, size).get("specs", []):
                key = spec_key(spec)
                if key not in self.compiled:
                    want[key] = spec
        if want:
            self.say(f"compiling {len(want)} candidate kernels")
            self.compiled.update(compile_specs(want, self.arch, self.workers))

    def _kernel(self, spec):
        from graphir.runtime.cuda import Kernel

        key = spec_key(spec)
        if key not in self._kernels:
            if key not in self.compiled:
                self.compiled.update(compile_specs({key: spec}, self.arch, 1))
            c = self.compiled[key]
            if isinstance(c, Exception):
                raise c
            self._kernels[key] = Kernel.from_cubin(c.cubin, c.launch_metadata(), self.device)
        return self._kernels[key]

    def _library(self, plan: dict, size: int):
        """The cuBLASLt matmul of a plan, pinned to the plan's rank of the heuristic's list
        (rank 0: the heuristic's own choice); a rank the list lacks for `size` rows raises."""
        from graphir.runtime.cuda.cublaslt import CublasLtMatmul

        algo = plan.get("algo") or {"index": 0, "at_m": size}
        shape = (plan["library"], plan["dtype"], plan["N"], plan["K"], plan["has_bias"])

        def get(rank: int):
            key = shape + (rank, size if rank else None)
            if key not in self._libs:
                self._libs[key] = CublasLtMatmul(
                    plan["dtype"], plan["N"], plan["K"], plan["has_bias"], self.device,
                    algo={"index": rank, "at_m": algo["at_m"]} if rank else None)
            return self._libs[key]

        rank = algo["index"]
        if rank and len(get(0).ranked(size, count=rank + 1)) <= rank:
            raise RuntimeError(f"cuBLASLt's heuristic lists no rank-{rank} algorithm for "
                               f"M={size}")
        lib = get(rank)
        if lib.plan(size)[3] != ("pinned" if rank else "heuristic"):
            raise RuntimeError(f"cuBLASLt refuses its rank-{rank} algorithm for M={size}")
        return lib

    # -- data -----------------------------------------------------------------------------
    def _inputs(self, case: dict) -> tuple[dict, dict, int]:
        from graphir.runtime.cuda import DeviceBuffer

        host, dev, copies = {}, {}, 1
        for name, spec in case["inputs"].items():
            key = spec["key"]
            if key not in self._host:
                self._host[key] = spec["make"]()
            host[name] = self._host[key]
            n = 1
            if spec.get("rotate"):
                n = max(1, min(MAX_COPIES, -(-L2_ROTATE_BYTES // max(host[name].nbytes, 1))))
                copies = max(copies, n)
            if sum(b.nbytes for bufs in self._dev.values() for b in bufs) > CACHE_LIMIT:
                self._dev.clear()
            have = self._dev.setdefault(key, [])
            while len(have) < n:
                have.append(DeviceBuffer.from_numpy(host[name], spec["dtype"], self.device))
            dev[name] = have[:n]
        return host, dev, copies

    # -- measuring ------------------------------------------------------------------------
    def __call__(self, fam, facts, cfg, size: int) -> dict:
        from graphir.runtime.cuda import DeviceBuffer

        plan = fam.launches(cfg, facts, size)
        case = fam.bench(facts, size)
        host, dev, copies = self._inputs(case)
        outs = {n: DeviceBuffer.empty(o["shape"], o["dtype"], self.device)
                for n, o in case["outputs"].items()}
        ints = dict(case["ints"], **plan.get("ints", {}))  # config-dependent ints (decode split)
        params = None
        if "library" in plan:
            lib = self._library(plan, size)
            calls = [(lib, (1, 1, 1), plan["args"])]
            scratch = {}
            params = {"algo": lib.algo_record(size)}  # what a manifest pins if this wins
        else:
            calls = [(self._kernel(plan["specs"][i]), grid, args) for i, grid, args in plan["ops"]]
            scratch = {n: DeviceBuffer.empty((max(int(c), 1),), dt, self.device)
                       for n, dt, c in plan["scratch"]}
            for buf in scratch.values():  # zero, as the plan's scratch starts (counters)
                buf.memset(0, stream=self.stream)

        def arg(tok, i):
            if tok in ints:
                return ints[tok]
            if tok in dev:
                bufs = dev[tok]
                return bufs[i % len(bufs)]
            return outs[tok] if tok in outs else scratch[tok]

        def run(i):
            for k, grid, toks in calls:
                k.launch(grid, *[arg(t, i) for t in toks], stream=self.stream)

        for o in outs.values():
            o.memset(0xFF, stream=self.stream)  # NaN in every float type
        run(0)
        self.stream.synchronize()
        got = {n: o.to_numpy() for n, o in outs.items()}
        rel = case["check"](got, host)
        if not rel < float("inf"):
            return {"ms": float("inf"), "rel_err": rel}
        out = {"ms": self._time(run, copies), "rel_err": rel}
        return out if params is None else {**out, "params": params}

    def _time(self, run: Callable[[int], None], copies: int, batches: int = 5) -> float:
        from graphir.runtime.cuda import CudaGraph, Event

        for i in range(copies):
            run(i)
        e0, e1 = Event(device=self.device), Event(device=self.device)
        e0.record(self.stream)
        for i in range(3):
            run(i)
        e1.record(self.stream)
        once = max(e0.elapsed_time(e1) / 3, 1e-3)
        calls = max(copies, min(200, int(BATCH_MS / once)))
        calls = -(-calls // copies) * copies
        g = CudaGraph()
        with g.capture(self.stream):
            for i in range(calls):
                run(i)
        g.replay(self.stream)
        self.stream.synchronize()
        times = []
        for _ in range(batches):
            a, b = Event(device=self.device), Event(device=self.device)
            a.record(self.stream)
            g.replay(self.stream)
            b.record(self.stream)
            times.append(a.elapsed_time(b) / calls)
        g.destroy()
        return statistics.median(times)
