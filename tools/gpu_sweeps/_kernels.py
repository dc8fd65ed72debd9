"""What the kernel sweeps share: launching graphir's offline-compiled cubins (or, in a dry run,
the Triton interpreter), compiling a set of specs in worker processes, timing, and the relative
error every variant is checked with before it is timed."""
from __future__ import annotations

import time

import torch


class Launcher:
    """One kernel spec: its cubin through graphir.runtime.cuda on torch's stream, or (no cubin:
    a dry run) the Triton function itself."""

    def __init__(self, spec, compiled):
        self.spec, self.kernel = spec, None
        if isinstance(compiled, Exception):
            raise compiled
        if compiled is not None:
            from graphir.runtime.cuda.kernel import Kernel

            self.kernel = Kernel.from_cubin(compiled.cubin, compiled.launch_metadata())

    def __call__(self, grid, *args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if grid[0] * grid[1] * grid[2] == 0:
            return
        if self.kernel is None:  # a Gluon kernel's Triton twin under the interpreter
            sp = self.spec.interpretable()
            sp.fn[grid](*args, **sp.constexprs, num_warps=sp.num_warps, num_stages=sp.num_stages)
        else:
            self.kernel.launch(grid, *args, stream=torch.cuda.current_stream().cuda_stream)


def compile_all(specs: dict, dry: bool) -> dict:
    """{spec_key: Launcher or the Exception that stops it}: compiled in a worker pool."""
    if dry:
        return {k: Launcher(s, None) for k, s in specs.items()}
    from graphir.lowering.triton_gpu.tuning_gpu import compile_specs

    t = time.time()
    done = compile_specs(specs, 90)
    bad = [k for k, v in done.items() if isinstance(v, Exception)]
    print(f"compiled {len(specs)} kernels in {time.time() - t:.1f} s ({len(bad)} failed)",
          flush=True)
    out = {}
    for k, s in specs.items():
        try:
            out[k] = Launcher(s, done[k])
        except Exception as e:  # noqa: BLE001  (reported with the variant that uses it)
            out[k] = e
    return out


def timed(fns, dry: bool, calls: int = 40) -> float:
    """Device time per call in microseconds over CUDA-graph replays cycling through `fns` (one
    per problem copy); a dry run gives the wall time of one call."""
    if dry:
        t = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t) * 1e6
    from graphir.tools.gpu_timing import graph_ms

    calls = -(-max(len(fns), calls) // len(fns)) * len(fns)
    return graph_ms(fns, calls=calls, batches=5, warmup=1) * 1e3


def rel_err(got, want) -> float:
    g, w = got.double(), want.double()
    if not torch.isfinite(g).all():
        return float("inf")
    return ((g - w).norm() / w.norm().clamp_min(1e-300)).item()


def check_then_time(res: dict, fns, got, want, nbytes: int, dry: bool, tol: float = 2e-2) -> None:
    """Run fns[0], record res["rel_err"] of got() against want; within tol time every fn
    (res["us"], res["gbs"] for nbytes read), else record res["error"]."""
    fns[0]()
    res["rel_err"] = err = rel_err(got(), want)
    if not err < tol:
        res["error"] = f"rel_err {err:.2e}"
        return
    res["us"] = timed(fns, dry)
    res["gbs"] = nbytes / res["us"] / 1e3
