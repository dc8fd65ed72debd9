"""The one-row matmul of the decode step's two projections (qkv 6144 x 4096, o 4096 x 4096, bf16)
on every m1 GEMV candidate, the register-prefetching ones (`_pf`) among them, against cuBLAS: the
B1 step spends 31 of its ~44 us of kernels in these two GEMVs, whose tiles were chosen on an
H200. matmul.py's measurement (offline-compiled cubins through graphir's runtime, checked
against an fp32 reference first, device time of calls captured in a CUDA graph with the weight
rotated beyond the L2), alternated over rounds so that clock drift hits every candidate alike;
the median of the rounds and % of a read-only pass at `read_gbs` (the bare read's rate of
read_ceiling.py, given or 3,150 GB/s, an H100's).
    python3 tools/gpu_sweeps/gemv_m1.py [rounds] [read GB/s]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matmul as sweep  # noqa: E402
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc  # noqa: E402
from graphir.lowering.triton_gpu.lowerings.base import spec_key  # noqa: E402
from graphir.lowering.triton_gpu.tuning_gpu import compile_specs  # noqa: E402
from graphir.tools.gpu_timing import copies_to_beat_l2  # noqa: E402

SHAPES = ((6144, 4096), (4096, 4096))


def main(rounds: int, read_gbs: float) -> None:
    from graphir.runtime.cuda import Kernel

    gemvs = [c for c in mc.candidates("m1", "bfloat16", 4096, 4096) if c["kind"] == "gemv"]
    specs = {}
    for N, K in SHAPES:
        for cfg in gemvs:
            specs.update({spec_key(s): s for s in mc.specs(cfg, "bfloat16", False, K, N)})
    done = compile_specs(specs, 90)
    kernels = {k: c if isinstance(c, Exception) else Kernel.from_cubin(c.cubin,
                                                                      c.launch_metadata())
               for k, c in done.items()}
    print(f"{torch.cuda.get_device_name(0)}: {len(gemvs)} GEMV configs, {rounds} rounds, us")
    for N, K in SHAPES:
        w0 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ws = [w0] + [w0.clone() for _ in range(copies_to_beat_l2(w0.numel() * 2) - 1)]
        a = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
        ref = a.float() @ w0.float().t()
        est = N * K * 2 / 3.0e9
        times = {"cuBLAS": []}
        errs = {}
        calls = {}
        for cfg in gemvs:
            try:
                calls[cfg["name"]] = sweep.our_calls(cfg, 1, N, K, a, ws, c, kernels)
                times[cfg["name"]] = []
            except Exception as e:  # noqa: BLE001  (a failed compile is reported, not timed)
                errs[cfg["name"]] = f"{type(e).__name__}: {e}"[:120]
        for r in range(rounds):
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for name in order:
                if name == "cuBLAS":
                    times[name].append(sweep.peer_us(a, ws))
                    continue
                row = sweep.measure(calls[name], c, ref, est)
                if "error" in row:
                    errs[name] = row["error"]
                    times.pop(name)
                    continue
                times[name].append(row["us"])
                errs.setdefault(name, f"rel err {row['rel_err']:.1e}")
        ideal = N * K * 2 / (read_gbs * 1e3)
        print(f"N={N} K={K}: {N * K * 2 / 1e6:.1f} MB, a read at {read_gbs:.0f} GB/s "
              f"{ideal:.2f} us")
        for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            med = statistics.median(ts)
            print(f"  {name:24s} {med:7.2f}  ({100 * ideal / med:4.1f}% of the read)  "
                  f"rounds {' '.join(f'{t:.2f}' for t in ts)}  {errs.get(name, '')}")
        for name, e in errs.items():
            if name not in times:
                print(f"  {name:24s} FAILED {e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5,
         float(sys.argv[2]) if len(sys.argv) > 2 else 3150.0)
