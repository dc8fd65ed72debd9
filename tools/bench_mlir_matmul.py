"""Benchmark the scheduled MLIR matmul (x @ W^T) against numpy (OpenBLAS) and torch CPU eager.

Run: .venv/bin/python tools/bench_mlir_matmul.py [--shapes 512x4096x6144,8x4096x6144] [--reps 5]

Prints GFLOP/s of each and the ratios mlir/torch and mlir/numpy, measured in the same run.
Two MLIR variants: "prepacked" (W packed once at load time, the recommended form) and
"pack-in-call" (the compiled function packs W on every call).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _build(m: int, k: int, n: int, prepacked: bool, dynamic_m: bool, so_path: Path) -> float:
    from mlir import ir
    from mlir.dialects import func

    from graphir.lowering.mlir_cpu import schedules, toolchain

    with toolchain.new_context(), ir.Location.unknown():
        module = ir.Module.create()
        f32 = ir.F32Type.get()
        rows = ir.ShapedType.get_dynamic_size() if dynamic_m else m
        a_t = ir.RankedTensorType.get([rows, k], f32)
        w_t = ir.RankedTensorType.get([n // 16, k, 16] if prepacked else [n, k], f32)
        with ir.InsertionPoint(module.body):
            @func.FuncOp.from_py_func(a_t, w_t, name="linear")
            def linear(a, w):
                packed = w if prepacked else schedules.emit_pack_weight(w)
                return schedules.emit_packed_matmul(a, packed)
        t0 = time.perf_counter()
        schedules.apply_matmul_schedule(module)
        toolchain.compile_to_shared_object(module, so_path)
        return time.perf_counter() - t0


def best_time(fn, reps: int) -> float:
    """Fastest of `reps` timed calls of fn, in seconds, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x4096x6144,8x4096x6144,512x4096x4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from graphir.lowering.mlir_cpu import schedules
    from graphir.runtime.cpu import CpuLibrary

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.shapes.split(","):
            m, k, n = (int(x) for x in spec.split("x"))
            rng = np.random.default_rng(0)
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            flops = 2.0 * m * n * k
            ta, tw = torch.from_numpy(a), torch.from_numpy(w)
            t_torch = best_time(lambda: torch.nn.functional.linear(ta, tw), args.reps)
            t_numpy = best_time(lambda: a @ w.T, args.reps)
            ref = a.astype(np.float64) @ w.T.astype(np.float64)
            for variant, prepacked, dyn in (("prepacked", True, False),
                                            ("prepacked dyn-M", True, True),
                                            ("pack-in-call", False, False)):
                so = Path(tmp) / f"{spec}-{variant.replace(' ', '_')}.so"
                compile_s = _build(m, k, n, prepacked, dyn, so)
                fn = CpuLibrary(so).function("linear", 2, 1)
                w_in = schedules.pack_weight_numpy(w) if prepacked else w
                out = np.empty((m, n), np.float32)
                t_mlir = best_time(lambda: fn([a, w_in], [out]), args.reps)
                err = float(np.abs(out - ref).max() / np.abs(ref).max())
                rows.append((spec, variant, compile_s, flops / t_mlir / 1e9,
                             flops / t_torch / 1e9, flops / t_numpy / 1e9,
                             t_torch / t_mlir, t_numpy / t_mlir, err))

    hdr = ("shape MxKxN", "variant", "compile s", "mlir GF/s", "torch GF/s", "numpy GF/s",
           "mlir/torch", "mlir/numpy", "rel err")
    print(" | ".join(hdr))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | "
              f"{r[6]:.2f} | {r[7]:.2f} | {r[8]:.1e}")


if __name__ == "__main__":
    main()
