"""A/B (temporary) of affine_at's Q6_K scale in one subtraction (3175a25) in the warp-MMA kernel; formerly: of the nib GEMVs' decode: per-nibble magics (planes come out as the codes themselves, no
X scaled by 16**-q, q6_k's crumbs as 16 (hi - 2)) against the previous kernels, kept for this
comparison in tools/gpu_sweeps/_nib_old (the module as it was before). One process, one set of
weights and X per shape, the variants timed in alternating rounds (CUDA-graph replays, weights
rotated over 4x the L2, as quant_nib.py times them); each output checked against torch and the
two forms' outputs compared.

    PYTHONPATH=tools/gpu_sweeps python3 tools/gpu_sweeps/nib_magic_ab.py [rounds]
    PYTHONPATH=tools/gpu_sweeps python3 tools/gpu_sweeps/nib_magic_ab.py --dry-run
NIB_FMTS=q6_k,q4_k picks formats, NIB_ROWS=1,2 row counts; NIB_BLK=1 adds the block GEMV's
tiles (quant_nib.blk_confs) and two row groups a lane at one row.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dry import DRY  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _kernels  # noqa: E402
import quant_nib as qs  # noqa: E402
from _nib_old import quant_nib_mma as old_mma  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_nib_config import nib_config  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 5
SHAPES = [(40, 512)] if DRY else [(14336, 4096), (4096, 4096)]
ROWS = tuple(int(m) for m in os.environ.get("NIB_ROWS", "1,2,4").split(","))
OLD = {"nib_mma_kernel": old_mma.nib_mma_kernel}


def old_specs(specs):
    """The same launches with the previous module's kernels (renamed: cached apart)."""
    out = []
    for s in specs:
        fn = OLD.get(getattr(s.fn, "__name__", ""))
        out.append(dataclasses.replace(s, fn=fn, name=s.name + "_old") if fn else s)
    return out


def variants(fmt, n, k):
    """[(label, M, conf, specs)]: the shipped buckets at 1, 2 and 4 rows in both forms (the
    previous form only for the GEMVs, which the change touches); where a bucket ships the
    warp-MMA kernel, the GEMV of that row count beside it (the new decode may move the line);
    at one row the block GEMV with two row groups a lane (8 rows share each X octet)."""
    small = n < 8448
    blk = dict(GEMV=1, BLK=1, BG=1, NJ=16 if DRY else 256 if small else 128,
               num_warps=2 if small and not DRY else 1, SPLIT_K=1, WEV=1)
    gemv = {1: blk, 2: dict(GEMV=1, BG=1, NJ=64, num_warps=1, SPLIT_K=1, PREFETCH=1, ROWS=2)}
    gemv[4] = dict(gemv[2], ROWS=4)
    out = []
    for m in ROWS:
        conf = nib_config(m, k, n, fmt)[0]
        specs = qs.specs_of(fmt, k, conf)
        if conf.get("MMA"):
            out.append((f"old {qs.label(conf)}", m, conf, old_specs(specs)))
        out.append((f"new {qs.label(conf)}", m, conf, specs))
    if os.environ.get("NIB_BLK"):
        two = dict(blk, BG=2, num_warps=1)
        out.append((f"new {qs.label(two)}", 1, two, qs.specs_of(fmt, k, two)))
        seen = {qs.label(c) for _, _, c, _ in out}
        out += [(f"new {qs.label(c)}", 1, c, qs.specs_of(fmt, k, c)) for c in qs.blk_confs()
                if qs.label(c) not in seen]
    return out


def main() -> None:
    torch.manual_seed(0)
    copy = 0.0
    if not DRY:
        from graphir.tools.gpu_timing import copy_gbs

        copy = copy_gbs()
        print(f"device copy bandwidth {copy:.0f} GB/s", flush=True)
    rng = np.random.default_rng(0)
    for n, k in SHAPES:
        for fmt in os.environ.get("NIB_FMTS", ",".join(qs.FMTS)).split(","):
            vs = variants(fmt, n, k)
            kernels = _kernels.compile_all({s.name: s for *_, sp in vs for s in sp}, DRY)
            dev, nbytes, wt = qs.weight(rng, fmt, n, k)
            copies = 2 if DRY else qs._kernels_copies(sum(t.numel() * t.element_size() for t in dev))
            wsets = [dev] + [[t.clone() for t in dev] for _ in range(copies - 1)]
            wt = torch.from_numpy(wt).to(qs.DEV)
            xs = {m: torch.randn(m, k, device=qs.DEV).to(torch.bfloat16) for m in ROWS}
            runs, outs = [], {}
            for lab, m, conf, specs in vs:
                out = torch.empty((m, n), dtype=torch.bfloat16, device=qs.DEV)
                fns = qs.calls(kernels, specs, conf, m, n, k, xs[m], wsets, out)
                res = {}
                out.fill_(float("nan"))
                _kernels.check_then_time(res, fns, lambda: out[:, :wt.shape[0]].float(),
                                         xs[m].float() @ wt.t(), nbytes, DRY)
                if "error" in res:
                    print(f"{fmt} {n}x{k} M={m} {lab}: {res['error']}", flush=True)
                    continue
                fns[0]()
                outs[lab] = out.clone()
                runs.append((lab, m, fns, [res["us"]], res["rel_err"]))
            for _ in range(ROUNDS - 1):
                for lab, m, fns, ts, _e in runs:
                    ts.append(_kernels.timed(fns, DRY))
            peer = {m: qs.cublas_us(n, k, m) for m in ROWS}
            for lab, m, fns, ts, err in runs:
                us = statistics.median(ts)
                same = ""
                twin = "old" + lab[3:] if lab.startswith("new") else "new" + lab[3:]
                if lab.startswith("old") and twin in outs:
                    d = (outs[lab].float() - outs[twin].float()).abs().max().item()
                    same = f" | new == old: {'bit for bit' if d == 0 else f'max diff {d:.2e}'}"
                pct = f"{100 * nbytes / us / 1e3 / copy:4.0f}% copy" if copy else ""
                print(f"{fmt:8} {n}x{k} M={m} {lab:34} {us:7.2f} us [{min(ts):.2f}-{max(ts):.2f}]"
                      f" {pct} cuBLAS x{peer[m] / us:.2f} err {err:.1e}{same}", flush=True)


if __name__ == "__main__":
    main()
