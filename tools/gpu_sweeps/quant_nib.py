"""Sweep of the 4-bit kernels over the load-time nib layout (kernels/quant_nib.py) on one GPU.

y = x @ W^T, W 14336x4096 and 4096x4096 in Q4_0, Q4_K (GGUF, repacked by ops/quant/nib_layout.py)
and 4-bit GPTQ group 128 (symmetric), and Q6_K; x bf16 of 1 to 512 rows. Round 1 times GEMV
tiles that share each decoded word among 2 or 4 rows of X, at 2-16 rows on Q4_0 14336x4096
(--split adds the dot tiles by split-K at 16 and 64 rows, --gemv the one-row GEMV grid of
every format, --tc the tensor-core kernel's grid and its
best on every 4-bit format, --blk the one-row block GEMV's grid, --wev the shipped buckets
that take the warp-MMA kernel beside the same with the weight's loads evict-first, --mma the
warp-MMA kernel's grid (kernels/quant_nib_mma.py) at 1 and 4 rows, and with two sets of 8
rows of X a program at 12 and 16, then its best on every format; --buckets times only the shipped buckets); round 2 the shipped buckets
(kernels/quant_nib_config.py NIB_BUCKETS), the best of round 1 and the many-row path (decode
into a bf16 copy, then cuBLAS) on every weight.
Every variant is checked against torch (float32 product with the decoded
weight) before it is timed; the peer is cuBLAS bf16 on the decoded weight, weights rotated
among copies over 4x the L2 for both. "% copy" counts the checkpoint's bytes (GGUF blocks or
GPTQ words + scales) over the measured copy bandwidth.
    python3 tools/gpu_sweeps/quant_nib.py            (bash tools/gpu_sweep.sh quant_nib)
    python3 tools/gpu_sweeps/quant_nib.py --dry-run  (CPU, Triton interpreter, tiny shapes)
NIB_FMTS=q4_k,q6_k picks the formats (default all four).
Writes $OUT/quant_nib.json.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dry import DRY  # noqa: E402  (first: --dry-run sets Triton's interpreter up)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphir.lowering.triton_gpu.kernels.quant_nib_config import (  # noqa: E402
    gemv_geometry, mma_geometry, nib_dequant_spec, nib_specs, tc_geometry, tc_split)
from graphir.ops.quant.nib_layout import dequantize_nib, repack_gguf, repack_gptq  # noqa: E402

import _kernels  # noqa: E402

T0 = time.time()
LIMIT_S = 400
DEV = "cpu" if DRY else "cuda"
SHAPES = [(40, 512)] if DRY else [(14336, 4096), (4096, 4096)]
FMTS = tuple(os.environ.get("NIB_FMTS", "q4_0,q4_k,gptq_sym,q6_k").split(","))


def left() -> float:
    return LIMIT_S - (time.time() - T0)


def weight(rng, fmt: str, n: int, k: int):
    """(device arrays (codes, scales, extra, crumbs), checkpoint bytes, float32 decoded rows [check, k])."""
    check = min(n, 1024)
    if fmt.startswith("gptq"):
        from graphir.ops.quant.gptq_layout import pack_rows

        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        scales = (rng.uniform(0.002, 0.02, (k // 128, n))
                  * rng.choice([-1, 1], (k // 128, n))).astype(np.float16)
        arrs = repack_gptq(pack_rows(codes, 4), scales, None, False)
        nbytes = k * n // 2 + scales.nbytes
    else:
        from graphir.ops.quant.gguf_blocks import gguf_block_geometry

        enc = fmt.upper()
        geo = gguf_block_geometry(enc)
        nb = k // geo.block_elems
        raw = rng.integers(0, 256, (n, nb, geo.block_bytes), dtype=np.uint8)
        for off in {"Q4_0": (0,), "Q6_K": (208,)}.get(enc, (0, 2)):
            d = (rng.uniform(0.002, 0.02, (n, nb)) * rng.choice([-1, 1], (n, nb))).astype(np.float16)
            raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n, nb, 2)
        raw = raw.reshape(n, -1)
        arrs = repack_gguf(raw, enc, k)
        nbytes = raw.nbytes
    extra = arrs[2] if len(arrs) > 2 else None
    crumbs = arrs[3] if len(arrs) > 3 else None
    gc = check // 4
    wt = dequantize_nib(fmt, check, arrs[0][:gc], arrs[1][:gc],
                        None if extra is None else extra[:gc], 128 if fmt.startswith("gptq") else 32,
                        None if crumbs is None else crumbs[:gc])
    dev = [torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy()).to(DEV)
           for a in (arrs[0], arrs[1], extra if extra is not None else np.zeros(16, np.uint8),
                     crumbs if crumbs is not None else np.zeros(16, np.uint8))]
    dev[0] = dev[0].view(torch.int32)
    return dev, nbytes, wt


def calls(kernels, specs, conf, M, N, K, x, wsets, out):
    if conf.get("DEQUANT"):
        # The many-row path: decode into a bf16 copy, then cuBLAS on it.
        deq = kernels[specs[0].name]
        wbuf = torch.empty((N, K), dtype=torch.bfloat16, device=DEV)
        grid = specs[0].grid_for(N=N, K=K)
        return [lambda q=q, s=s, z=z, h=h: (deq(grid, q, s, z, h, wbuf, N, K),
                                            torch.matmul(x, wbuf.t(), out=out))
                for q, s, z, h in wsets]
    if conf.get("XP"):
        # X reordered into contiguous planes first (nib_x_planes_kernel), then the kernel on it.
        xs, *specs = specs
        xbuf = torch.empty_like(x)
        plain = calls(kernels, specs, dict(conf, XP=0), M, N, K, xbuf, wsets, out)
        perm = kernels[xs.name]
        xgrid = xs.grid_for(M=M, K=K)
        return [lambda f=f: (perm(xgrid, x, xbuf, K), f()) for f in plain]
    split = conf["SPLIT_K"]
    main = kernels[specs[0].name]
    bps = (tc_geometry(K, conf["NW"], split) if conf.get("TC")
           else mma_geometry(K, conf["num_warps"], split, conf.get("NB", 1)) if conf.get("MMA")
           else gemv_geometry(K, conf["NJ"], split)[1])
    grid = specs[0].grid_for(M=M, N=N)
    part = torch.empty((split, M, N), dtype=torch.float32, device=DEV) if split > 1 else None
    fns = []
    for q, s, z, h in wsets:
        if split == 1:
            fns.append(lambda q=q, s=s, z=z, h=h: main(grid, x, q, s, z, h, out, M, N, K, bps))
        else:
            red = kernels[specs[1].name]
            rgrid = specs[1].grid_for(M=M, N=N)

            def f(q=q, s=s, z=z, h=h):
                main(grid, x, q, s, z, h, part, M, N, K, bps)
                red(rgrid, part, out, out, M, N)
            fns.append(f)
    return fns


GEMV_GRID = "--gemv" in sys.argv
TC_GRID = "--tc" in sys.argv
MMA_GRID = "--mma" in sys.argv
BLK_GRID = "--blk" in sys.argv
# --wev: the shipped buckets of 1-16 rows with the warp-MMA kernel, beside the same with its
# weight loads evict-first.
WEV_GRID = "--wev" in sys.argv
BUCKETS_ONLY = "--buckets" in sys.argv
# --once FMT,N,M[,CONF]: the shipped bucket of that format, weight N x 4096 and row count (or the
# config CONF, "MMA=1;num_warps=8;..."), checked and run a few times with no timing (for ncu:
# `ncu -k regex:nib_ python3 ... --once q4_0,14336,16`).
ONCE = sys.argv[sys.argv.index("--once") + 1].split(",") if "--once" in sys.argv else None
SPLIT_GRID = "--split" in sys.argv
MS = (1, 2, 4, 16, 64) if DRY else (1, 2, 4, 8, 16, 64, 512)


def gemv_rows_confs(m):
    """GEMV tiles sharing each decoded word among ROWS (2 or 4) rows of X."""
    if DRY:
        return [dict(GEMV=1, BG=1, NJ=8, num_warps=1, SPLIT_K=1, PREFETCH=1, ROWS=min(m, 4))]
    return [dict(GEMV=1, BG=1, NJ=nj, num_warps=w, SPLIT_K=1, PREFETCH=1, ROWS=r)
            for r, nj, w in itertools.product((2, 4), (64, 128), (1, 2, 4))
            if r <= m and 32 * w <= nj <= 64 * w]


def split_confs(m):
    """Dot tiles of m rows by split-K (the lowering picks the split from N: dot_split)."""
    if DRY:
        return [dict(BM=16, BG=4, NJ=8, num_warps=4, num_stages=1, SPLIT_K=2, PREFETCH=1)]
    return [dict(BM=m, BG=bg, NJ=16, num_warps=4, num_stages=1, SPLIT_K=sp, PREFETCH=1)
            for bg, sp in itertools.product((8, 16, 32), (1, 2, 4, 8))]


def gemv_confs():
    if DRY:
        return [dict(GEMV=1, BG=1, NJ=8, num_warps=1, SPLIT_K=s, PREFETCH=p)
                for s, p in ((1, 1), (2, 0))]
    # One word column of four rows per lane and step at least (BG NJ >= 32 num_warps).
    return [dict(GEMV=1, BG=bg, NJ=nj, num_warps=w, SPLIT_K=1, PREFETCH=p)
            for bg, nj, w, p in itertools.product((1, 2, 4), (32, 64, 128), (1, 2, 4), (1, 2))
            if 32 * w <= bg * nj <= 128 * w]


DEQ = dict(DEQUANT=1)


def tc_confs(n, k):
    """The tensor-core kernel (kernels/quant_nib_tc.py): weight rows a program, word columns a
    step, register prefetch or Triton's pipelining, and split K from the grid (dot_split's
    rule, halved and doubled)."""
    if DRY:
        return [dict(TC=1, BN=64, NW=16, BM=16, num_warps=4, num_stages=1, SPLIT_K=2,
                     PREFETCH=p, XP=x) for p, x in ((0, 1), (3, 0))]
    out = []
    # 4 or 8 warps: Hopper's wgmma (B through shared memory, a wait per dot); 1 or 2 warps:
    # mma.sync, Triton's choice below a warpgroup.
    # Round 4's grid (also X as 2-byte gathers, XP 0, and prefetching X, PREFETCH 2) found
    # mma.sync with 2 warps and the reordered X best; this one adds 128-row tiles on 2 warps
    # and a deeper pipeline.
    for (bn, w), nw, pf, st in itertools.product(((64, 4), (64, 2), (32, 2), (128, 2)),
                                                 (16, 32), (0, 1), (3, 4)):
        split = tc_split(n, k, bn, nw)
        for sp in sorted({split, split * 2}):
            out.append(dict(TC=1, BN=bn, NW=nw, BM=16, num_warps=w, num_stages=st,
                            SPLIT_K=sp, PREFETCH=pf, XP=1))
    return out


def mma_confs():
    """The warp-MMA kernel (kernels/quant_nib_mma.py): warps sharing a program's blocks of K,
    split K, the next block's loads ahead or not."""
    if DRY:
        return [dict(MMA=1, num_warps=w, NB=b, SPLIT_K=s, PREFETCH=p)
                for w, b, s, p in ((2, 2, 1, 1), (1, 1, 2, 0))]
    # Round 5 also timed the words of each block of eight row groups stored together (one
    # 512-byte load a warp): 3% faster, not worth a second layout.
    # Round 6 adds four blocks a step (twice the loads in flight a warp).
    return [dict(MMA=1, num_warps=w, NB=b, SPLIT_K=s, PREFETCH=p)
            for w, b, s, p in itertools.product((2, 4, 8), (1, 2, 4), (1, 2, 4), (1, 2))
            if k_ok(w, b, s)]


def k_ok(w, b, s):
    """Whether K = 4096 gives each warp of each split at least two steps."""
    return 4096 // 32 // s >= 2 * w * b


def blk_confs():
    """The one-row GEMV a block a lane (kernels/quant_nib_block.py): a lane's
    block of each of BG row groups, NJ / 4 blocks a step over the program's warps."""
    if DRY:
        return [dict(GEMV=1, BLK=1, BG=1, NJ=16, num_warps=1, SPLIT_K=1)]
    # Round 9: weight loads evict-first, and more row groups a lane's block of X serves (lanes
    # of one load instruction sharing an X address cost the L1 one access).
    return [dict(GEMV=1, BLK=1, BG=bg, NJ=nj, num_warps=w, SPLIT_K=1, WEV=1)
            for bg, nj, w in ((1, 128, 1), (2, 64, 1), (4, 32, 1), (2, 128, 1), (2, 128, 2),
                              (4, 64, 1), (4, 64, 2), (2, 256, 2), (1, 256, 2), (8, 32, 2))]


def bucket_jobs(fmt, N, K):
    """The shipped bucket configs (kernels/quant_nib_config.NIB_BUCKETS) at every M of MS."""
    from graphir.lowering.triton_gpu.kernels.quant_nib_config import nib_config

    return [(fmt, N, K, m, nib_config(m, K, N, fmt)[0]) for m in MS]


def label(c):
    if c.get("DEQUANT"):
        return "dequant + cuBLAS"
    if c.get("MMA"):
        return (f"mma x{c.get('XN', 1)}w{c['num_warps']}b{c.get('NB', 1)}s{c['SPLIT_K']}"
                f"p{c['PREFETCH']}a{c.get('SA', 1)}" + "e" * bool(c.get("WEV")))
    if c.get("TC"):
        return (f"tc n{c['BN']}j{c['NW']}w{c['num_warps']}st{c['num_stages']}s{c['SPLIT_K']}"
                f"p{c['PREFETCH']}x{c.get('XP', 0)}")
    if c.get("BLK"):
        return (f"gemvblk g{c['BG']}j{c['NJ']}w{c['num_warps']}s{c['SPLIT_K']}"
                + "e" * bool(c.get("WEV")))
    if c.get("GEMV"):
        return (f"gemv r{c.get('ROWS', 1)}g{c['BG']}j{c['NJ']}w{c['num_warps']}s{c['SPLIT_K']}"
                f"p{c['PREFETCH']}")
    return (f"dot m{c['BM']}g{c['BG']}j{c['NJ']}w{c['num_warps']}st{c['num_stages']}"
            f"s{c['SPLIT_K']}p{c.get('PREFETCH', 0)}")


def specs_of(fmt, K, conf):
    group = 128 if fmt.startswith("gptq") else 32
    if conf.get("DEQUANT"):
        return [nib_dequant_spec(fmt, "bfloat16", K, group)]
    return nib_specs(fmt, "bfloat16", conf, group)


def run(jobs, copy_gbs, results, weights, peer):
    """jobs: (fmt, N, K, M, conf). Compiles what is new, checks and times each."""
    specs = {}
    for fmt, N, K, M, conf in jobs:
        for s in specs_of(fmt, K, conf):
            specs[s.name] = s
    kernels = _kernels.compile_all(specs, DRY)
    rng = np.random.default_rng(0)
    for fmt, N, K, M, conf in jobs:
        if left() < 15:
            print("time budget: stopping", flush=True)
            return
        if (fmt, N, K) not in weights:
            dev, nbytes, wt = weight(rng, fmt, N, K)
            n_copies = 2 if DRY else _kernels_copies(sum(t.numel() * t.element_size() for t in dev))
            wsets = [dev] + [[t.clone() for t in dev] for _ in range(n_copies - 1)]
            weights[(fmt, N, K)] = (wsets, nbytes, torch.from_numpy(wt).to(DEV))
        wsets, nbytes, wt = weights[(fmt, N, K)]
        specs_c = specs_of(fmt, K, conf)
        res = dict(fmt=fmt, N=N, K=K, M=M, config=label(conf), conf=conf, quant_bytes=nbytes)
        try:
            bad = [kernels[s.name] for s in specs_c if isinstance(kernels[s.name], Exception)]
            if bad:
                raise bad[0]
            x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
            out = torch.empty((M, N), dtype=torch.bfloat16, device=DEV)
            fns = calls(kernels, specs_c, conf, M, N, K, x, wsets, out)
            out.fill_(float("nan"))
            _kernels.check_then_time(res, fns, lambda: out[:, :wt.shape[0]].float(),
                                     x.float() @ wt.t(), nbytes, DRY)
        except Exception as e:  # noqa: BLE001  (reported, not timed)
            res["error"] = f"{type(e).__name__}: {e}"[:300]
        if (N, K, M) not in peer:
            peer[(N, K, M)] = cublas_us(N, K, M)
        res["cublas_us"] = peer[(N, K, M)]
        results.append(res)
        print(row(res, copy_gbs), flush=True)


def _kernels_copies(nbytes):
    from graphir.tools.gpu_timing import copies_to_beat_l2

    return copies_to_beat_l2(nbytes)


def cublas_us(N, K, M) -> float:
    w0 = torch.randn(N, K, device=DEV).to(torch.bfloat16)
    ws = [w0] + [w0.clone() for _ in range(1 if DRY else _kernels_copies(w0.numel() * 2) - 1)]
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    return _kernels.timed([lambda w=w: torch.matmul(x, w.t()) for w in ws], DRY)


def row(r, copy_gbs) -> str:
    head = f"{r['fmt']:5} {r['N']}x{r['K']} M={r['M']:<3} {r['config']:28}"
    if "us" not in r:
        return head + " ERROR " + r.get("error", "?")
    pct = f"{100 * r['gbs'] / copy_gbs:3.0f}%copy" if copy_gbs else "-"
    return (head + f" {r['us']:7.1f}us cuBLAS {r['cublas_us']:6.1f}us "
            f"x{r['cublas_us'] / r['us']:.2f} {r['gbs']:5.0f}GB/s {pct} err {r['rel_err']:.1e}")


def best(results, fmt, N, M, kind, top):
    ok = [r for r in results if "us" in r and r["fmt"] == fmt and r["N"] == N and r["M"] == M
          and r["config"].startswith(kind)]
    return [r["conf"] for r in sorted(ok, key=lambda r: r["us"])[:top]]


def main() -> None:
    torch.manual_seed(0)
    copy_gbs = 0.0
    if not DRY:
        from graphir.tools.gpu_timing import copy_gbs as measure_copy

        copy_gbs = measure_copy()
        print(f"device copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    results, weights, peer = [], {}, {}
    N0, K0 = SHAPES[0]
    # Round 1: GEMV tiles sharing each decoded word among 2 or 4 rows of X, at 2-16 rows on
    # Q4_0 14336x4096 (--split adds the dot tiles by split-K at 16 and 64 rows on both
    # weights, --gemv the one-row GEMV grid of every format); round 2: the shipped buckets, the best of round 1 and the dequantize + cuBLAS
    # path on every weight.
    first = [("q4_0", N0, K0, m, c) for m in MS[1:5] for c in gemv_rows_confs(m)]
    first += [("q4_0", N, K, m, c) for N, K in SHAPES for m in MS[-3:-1]
              for c in split_confs(m)] if SPLIT_GRID else []
    first += [(f, N0, K0, 1, c) for f in FMTS for c in gemv_confs()] if GEMV_GRID else []
    if ONCE:
        fmt, n, m = ONCE[0], int(ONCE[1]), int(ONCE[2])
        from graphir.lowering.triton_gpu.kernels.quant_nib_config import nib_config

        conf = nib_config(m, 4096, n, fmt)[0]
        if len(ONCE) > 3:      # an explicit config: KEY=VALUE;KEY=VALUE (integers)
            conf = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in ONCE[3].split(";")}
        specs = specs_of(fmt, 4096, conf)
        kernels = _kernels.compile_all({sp.name: sp for sp in specs}, DRY)
        dev, _, wt = weight(np.random.default_rng(0), fmt, n, 4096)
        x = torch.randn(m, 4096, device=DEV).to(torch.bfloat16)
        out = torch.empty((m, n), dtype=torch.bfloat16, device=DEV)
        (fn,) = calls(kernels, specs, conf, m, n, 4096, x, [dev], out)
        for _ in range(3):
            fn()
        err = _kernels.rel_err(out[:, :wt.shape[0]].float(), x.float() @ torch.from_numpy(wt).to(DEV).t())
        print(f"{label(conf)} rel err {err:.1e}")
        return
    if BLK_GRID:
        # The block GEMV's grid at one row on every format and weight, beside the shipped bucket.
        run([(f, N, K, 1, c) for N, K in SHAPES for f in FMTS
             for c in blk_confs() + [bucket_jobs(f, N, K)[0][4]]], copy_gbs, results, weights, peer)
        first = []
    elif WEV_GRID:
        jobs = []
        for N, K in SHAPES:
            for f in FMTS:
                for j in bucket_jobs(f, N, K):
                    if j[4].get("MMA") and j[3] <= 16:
                        jobs += [j, j[:4] + (dict(j[4], WEV=1),)]
        run(jobs, copy_gbs, results, weights, peer)
        first = []
    elif BUCKETS_ONLY:
        # The shipped buckets alone, every format and weight.
        run([j for N, K in SHAPES for f in FMTS for j in bucket_jobs(f, N, K)], copy_gbs,
            results, weights, peer)
        first = []
    elif MMA_GRID:
        # The warp-MMA grid at 1 and 4 rows on Q4_0, both weights (one set of 8 rows of X a
        # program), and at 12 and 16 rows with two sets (XN 2) beside the tensor-core kernel;
        # then the best on every format next to the shipped buckets.
        mm = [("q4_0", N, K, m, c) for N, K in SHAPES for m in (1, 4) for c in mma_confs()]
        mm += [("q4_0", N, K, m, dict(c, XN=2)) for N, K in SHAPES for m in (12, 16)
               for c in mma_confs() if c["PREFETCH"] == 1]
        run(mm, copy_gbs, results, weights, peer)
        jobs = []
        for N, K in SHAPES:
            top = best(results, "q4_0", N, 1, "mma", 1) + best(results, "q4_0", N, 4, "mma", 1)
            top16 = best(results, "q4_0", N, 16, "mma", 2)
            for fmt in FMTS:
                jobs += [(fmt, N, K, m, c) for m in (1, 2, 4, 8) for c in top]
                jobs += [(fmt, N, K, m, c) for m in (12, 16) for c in top16]
                jobs += [j for j in bucket_jobs(fmt, N, K) if j[3] <= 16]
        run(jobs, copy_gbs, results, weights, peer)
        first = []
    elif TC_GRID:
        # The tensor-core grid at 1 and 16 rows on Q4_0, both weights; then the best three
        # of each weight on every 4-bit format at every row count up to 16, next to the
        # shipped buckets.
        tc = [("q4_0", N, K, m, c) for N, K in SHAPES for m in (1, 16) for c in tc_confs(N, K)]
        run(tc, copy_gbs, results, weights, peer)
        jobs = []
        for N, K in SHAPES:
            top = best(results, "q4_0", N, 16, "tc", 3)
            for fmt in FMTS[:3]:
                jobs += [(fmt, N, K, m, c) for m in MS[:5] for c in top]
                jobs += [j for j in bucket_jobs(fmt, N, K) if j[3] <= 16]
        run(jobs, copy_gbs, results, weights, peer)
        first = []
    run(first, copy_gbs, results, weights, peer)
    top = {m: best(results, "q4_0", N0, m, "gemv", 2) for m in MS[1:5]}
    jobs = []
    for N, K in SHAPES if not (TC_GRID or MMA_GRID or BUCKETS_ONLY or BLK_GRID) else ():
        for fmt in FMTS:
            jobs += bucket_jobs(fmt, N, K)
            jobs += [(fmt, N, K, m, c) for m in MS[1:5] for c in top[m]]
            jobs += [(fmt, N, K, m, DEQ) for m in MS[-3:]]
    run(jobs, copy_gbs, results, weights, peer)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "quant_nib.json"), "w") as f:
            json.dump({"copy_gbs": copy_gbs, "results": results}, f, indent=1)
    print("\n== best per (format, shape, M)")
    for fmt in FMTS:
        for N, K in SHAPES:
            for M in MS:
                ok = [r for r in results if "us" in r and r["fmt"] == fmt and r["N"] == N
                      and r["M"] == M]
                if ok:
                    print(row(min(ok, key=lambda r: r["us"]), copy_gbs))
    print(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
