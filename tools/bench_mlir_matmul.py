"""Benchmark the scheduled MLIR matmul (x @ W^T) against torch CPU eager and numpy, as fractions
of this CPU's measured f32 peak.

Run: .venv/bin/python tools/bench_mlir_matmul.py [--shapes 512x4096x6144,8x4096x6144]
     [--target cpu] [--threads 2] [--reps 5]

The MLIR kernel is the one the layer runs: the packed register-blocked matmul of the target's
MatmulConfig (e.g. 8 x 32 on AVX-512), dynamic M (a symbolic token count), W packed once at load
("prepacked") or packed by the kernel on every call ("pack-in-call"). The peak is measured in
the same run: a loop of independent vector FMAs compiled for the same target, run on every
thread (it shows how many FMA pipes and lanes the core really has). The contenders are timed
in interleaved rounds (best of --reps). Prints GFLOP/s, % of that peak, time(mlir)/time(torch)
(< 1: mlir faster) and the relative error vs float64.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_PEAK_ITERS = 1 << 22


def _build(m: int, k: int, n: int, prepacked: bool, so_path: Path, cpu) -> float:
    """Compile y = x @ W^T exactly as the layer's matmul lowering does; returns compile time."""
    from mlir import ir
    from mlir.dialects import func

    from graphir.dtype import DType
    from graphir.lowering.mlir_cpu import schedules, toolchain
    from graphir.lowering.mlir_cpu.lowerings.linalg import fast_matmul

    cfg = schedules.MatmulConfig.for_target(cpu)
    nr = cfg.panel_width(n)
    with toolchain.new_context(), ir.Location.unknown():
        module = ir.Module.create()
        f32 = ir.F32Type.get()
        a_t = ir.RankedTensorType.get([ir.ShapedType.get_dynamic_size(), k], f32)
        w_t = ir.RankedTensorType.get([n // nr, k, nr] if prepacked else [n, k], f32)
        with ir.InsertionPoint(module.body):
            @func.FuncOp.from_py_func(a_t, w_t, name="linear")
            def linear(a, w):
                return fast_matmul(a, w, packed=prepacked, layout=f"nk{nr}", dtype=DType.float32,
                                   mr=cfg.mr)
        t0 = time.perf_counter()
        schedules.apply_matmul_schedule(module, cfg)
        toolchain.compile_to_shared_object(module, so_path, target=cpu)
        return time.perf_counter() - t0


def _chains(cpu) -> int:
    """Independent FMA chains: enough to cover latency x pipes, few enough to stay in registers."""
    return min(16, cpu.vector_registers - 4)


def _build_peak(so_path: Path, cpu, threads: int) -> None:
    """`peak(out[threads, lanes])`: each thread runs _PEAK_ITERS steps of independent FMA
    chains (distinct starts and all results used, so LLVM can neither merge nor drop one)."""
    from mlir import ir

    from graphir.lowering.mlir_cpu import toolchain

    v = f"vector<{cpu.f32_lanes}xf32>"
    n = _chains(cpu)
    accs = [f"%a{i}" for i in range(n)]
    text = f"""
func.func @peak(%out: memref<{threads}x{cpu.f32_lanes}xf32>) {{
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %n = arith.constant {_PEAK_ITERS} : index
  %x = arith.constant dense<0.999> : {v}
  %y = arith.constant dense<0.001> : {v}
  {"; ".join(f"%y{i} = arith.constant dense<{i + 1}.0> : {v}" for i in range(n))}
  scf.forall (%t) in ({threads}) {{
    %r:{n} = scf.for %i = %c0 to %n step %c1 iter_args({", ".join(f"{a} = %y{i}" for i, a in enumerate(accs))})
        -> ({", ".join([v] * n)}) {{
      {"; ".join(f"%b{i} = vector.fma %x, {a}, %y : {v}" for i, a in enumerate(accs))}
      scf.yield {", ".join(f"%b{i}" for i in range(n))} : {", ".join([v] * n)}
    }}
    %s0 = arith.addf %r#0, %r#1 : {v}
    {"; ".join(f"%s{i - 1} = arith.addf %s{i - 2}, %r#{i} : {v}" for i in range(2, n))}
    vector.store %s{n - 2}, %out[%t, %c0] : memref<{threads}x{cpu.f32_lanes}xf32>, {v}
  }}
  return
}}"""
    with toolchain.new_context(), ir.Location.unknown():
        toolchain.compile_to_shared_object(ir.Module.parse(text.replace("; ", "\n    ")),
                                           so_path, target=cpu)


def best_time(fn, reps: int) -> float:
    """Fastest of `reps` timed calls of fn, in seconds, after one untimed warm-up call."""
    return min(times(fn, reps))


def times(fn, reps: int) -> list[float]:
    """Wall times of `reps` calls of fn, in seconds, after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved_times(fns, reps: int, lead: int = 0) -> list[list[float]]:
    """Wall times of `reps` rounds, each calling every fn once (after one warm-up round), as one
    list per fn: contenders measured side by side see the same load from other processes, and
    each call mostly finds its weights out of the caches, as a layer of a deep model does.
    On 2 cores each call also runs while the previous contender's thread pool still spins
    (torch's OpenMP workers spin some milliseconds after a region: a bf16 decode step of
    graphir took 10.1 ms right after torch's and 7.3 ms after its own, BENCHMARKS.md
    2026-12-05 sixteenth session), so with 3+ contenders the order matters: one that follows
    a call of its own framework is not slowed. `lead` untimed calls of the same fn before
    each timed one measure every contender in its own steady state instead (a serving loop
    runs one framework); the weights may then stay cached, more so on CPUs with a large L3.
    Tried and dropped (BENCHMARKS.md, AMX, 2026-12-05): a 50 ms sleep before each call (every
    call then ran slower, a decode step most: 3.25 / 7.94 ms best / median against 2.2 / 2.4
    back to back)."""
    for fn in fns:
        fn()
    out = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, out):
            for _ in range(lead):
                fn()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return out


def measure_peak(cpu, threads: int, tmp: Path) -> float:
    """This CPU's f32 FMA peak on `threads` threads, GFLOP/s (best of 3 runs)."""
    from graphir.runtime.cpu import CpuLibrary

    so = tmp / f"peak-{cpu.isa}-{threads}.so"
    _build_peak(so, cpu, threads)
    fn = CpuLibrary(so).function("peak", 0, 1)
    out = np.empty((threads, cpu.f32_lanes), np.float32)
    t = best_time(lambda: fn([], [out]), 3)
    return 2.0 * _chains(cpu) * cpu.f32_lanes * _PEAK_ITERS * threads / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x4096x6144,512x4096x4096,8x4096x6144")
    ap.add_argument("--target", default="cpu", help="cpu (this host) or e.g. cpu:x86-64:avx2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lead", type=int, default=0,
                    help="untimed calls of the same contender before each timed one "
                         "(interleaved_times)")
    args = ap.parse_args()
    os.environ["GRAPHIR_NUM_THREADS"] = str(args.threads)   # before the pool starts

    import torch

    from graphir.lowering.driver import Target
    from graphir.lowering.mlir_cpu.cpu_target import CpuTarget, host_cpu
    from graphir.lowering.mlir_cpu.schedules import MatmulConfig
    from graphir.runtime.cpu_executor import pack_operand   # as the runtime packs W at load
    from graphir.runtime.cpu import CpuLibrary

    torch.set_num_threads(args.threads)
    cpu = CpuTarget.parse(Target.parse(args.target).resolved().cpu)
    cfg = MatmulConfig.for_target(cpu)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        peak = measure_peak(cpu, args.threads, Path(tmp))
        for spec in args.shapes.split(","):
            m, k, n = (int(x) for x in spec.split("x"))
            rng = np.random.default_rng(0)
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            flops = 2.0 * m * n * k
            ta, tw = torch.from_numpy(a), torch.from_numpy(w)
            ref = a.astype(np.float64) @ w.T.astype(np.float64)
            calls, built = [], []
            for variant, prepacked in (("prepacked", True), ("pack-in-call", False)):
                so = Path(tmp) / f"{spec}-{variant}.so"
                compile_s = _build(m, k, n, prepacked, so, cpu)
                fn = CpuLibrary(so).function("linear", 2, 1)
                w_in = pack_operand(w, f"nk{cfg.panel_width(n)}") if prepacked else w
                out = np.empty((m, n), np.float32)
                calls.append(lambda fn=fn, w_in=w_in, out=out: fn([a, w_in], [out]))
                built.append((variant, compile_s, out))
            *t_mlir, t_torch, t_numpy = (min(ts) for ts in interleaved_times(
                calls + [lambda: torch.nn.functional.linear(ta, tw), lambda: a @ w.T], args.reps,
                args.lead))
            for (variant, compile_s, out), t in zip(built, t_mlir):
                err = float(np.abs(out - ref).max() / np.abs(ref).max())
                rows.append((spec, variant, compile_s, flops / t / 1e9, flops / t_torch / 1e9,
                             flops / t_numpy / 1e9, t / t_torch, err))

    print(f"{cpu} ({host_cpu().model}), {args.threads} threads, register block "
          f"{cfg.mr} x {cfg.nr}, kc {cfg.kc}; measured f32 FMA peak {peak:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.2f}")
    hdr = ("shape MxKxN", "variant", "compile s", "mlir GF/s", "% peak", "torch GF/s", "% peak",
           "numpy GF/s", "time mlir/torch", "rel err")
    print(" | ".join(hdr))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.1f} | {100 * r[3] / peak:.0f} | {r[4]:.1f} | "
              f"{100 * r[4] / peak:.0f} | {r[5]:.1f} | {r[6]:.2f} | {r[7]:.1e}")


if __name__ == "__main__":
    main()
