"""A one-row 4-bit GEMV fed by TMA, against the shipped block GEMV and cuBLAS (issue 12).

Round 9 (BENCHMARKS.md) found the shipped one-row GEMV bound by the loads its warps keep in
flight: a wave of short one-warp programs, each re-reading X, its lanes' loads 64 bytes apart.
Fewer, longer programs with register loads lost, since fewer warps meant fewer loads in flight.
Here a persistent grid (a few programs an SM) streams the weight through Triton's TMA pipeline
(device-made descriptors, STAGES tiles in flight a program, each a [GT row groups, NB blocks]
box of code words and one of scales), so the bytes in flight no longer depend on the warps, and
every load is whole 1 KB rows of the nib layout. Also a TMA read skeleton (the same grid and
boxes, the words XOR-ed) beside the best plain read (read_ceiling.py's), to see what TMA reads
at all.
    python3 tools/gpu_sweeps/gemv_tma.py            (one GPU)
    python3 tools/gpu_sweeps/gemv_tma.py --dry-run  (CPU, Triton interpreter, tiny shapes)
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dry import DRY  # noqa: E402  (first: --dry-run sets Triton's interpreter up)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import _kernels  # noqa: E402
import quant_nib as qn  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_nib import _pair, _planes  # noqa: E402

DEV = "cpu" if DRY else "cuda"


@triton.jit
def _split4(v):
    """The four entries of v's last axis (size 4, held whole by a lane: a free split)."""
    a, b = tl.split(tl.reshape(v, v.shape[:-1] + (2, 2)))
    e0, e2 = tl.split(a)
    e1, e3 = tl.split(b)
    return e0, e1, e2, e3


@triton.jit
def tma_gemv_kernel(x_ptr, q_ptr, s_ptr, c_ptr, N, K, GT: tl.constexpr, NB: tl.constexpr,
                    FLAT: tl.constexpr, STAGES: tl.constexpr):
    # q4_0 over the nib layout, one row of bf16 X: codes int32 [G, K / 2] (a group's K / 8 word
    # columns of four rows), scales float16 [G, K / 8]. Program p walks row blocks p, p + P, ...
    # of GT groups, each in K chunks of NB 32-value blocks.
    G = (N + 3) // 4
    kw4 = K // 2
    ns = K // 8
    cdesc = tl.make_tensor_descriptor(q_ptr, shape=[G, kw4], strides=[kw4, 1],
                                      block_shape=[GT, NB * 16])
    sdesc = tl.make_tensor_descriptor(s_ptr.to(tl.pointer_type(tl.float16)), shape=[G, ns],
                                      strides=[ns, 1], block_shape=[GT, NB * 4])
    nkc = K // (NB * 32)
    nrb = tl.cdiv(G, GT)
    x32 = x_ptr.to(tl.pointer_type(tl.uint32))
    # X pairs of a chunk [1, block, word, pair], loaded once and broadcast over the groups.
    xo = (tl.arange(0, NB)[None, :, None, None] * 16 + tl.arange(0, 4)[None, None, :, None] * 4
          + tl.arange(0, 4)[None, None, None, :])
    rows = tl.arange(0, GT)[:, None] * 4 + tl.arange(0, 4)[None, :]
    # An explicit num_stages is what makes Triton pipeline loads that feed no dot.
    for rb in tl.range(tl.program_id(0), nrb, tl.num_programs(0), flatten=FLAT,
                       num_stages=STAGES if FLAT else 1):
        acc = tl.zeros((GT, NB, 4, 4), tl.float32)
        for kc in tl.range(nkc, num_stages=STAGES):
            w = tl.reshape(cdesc.load([rb * GT, kc * (NB * 16)]), (GT, NB, 4, 4))
            s = tl.reshape(sdesc.load([rb * GT, kc * (NB * 4)]).to(tl.float32), (GT, NB, 1, 4))
            p0, p1, p2, p3 = _split4(tl.broadcast_to(tl.load(x32 + kc * (NB * 16) + xo),
                                                     (GT, NB, 4, 4)))
            x0, x1 = _pair(p0, 1)
            x2, x3 = _pair(p1, 1)
            x4, x5 = _pair(p2, 1)
            x6, x7 = _pair(p3, 1)
            q0, q1, q2, q3, q4, q5, q6, q7 = _planes(w, 8)
            t = q0 * x0[:, :, :, None]
            t = tl.fma(q1, x1[:, :, :, None], t)
            t = tl.fma(q2, x2[:, :, :, None], t)
            t = tl.fma(q3, x3[:, :, :, None], t)
            t = tl.fma(q4, x4[:, :, :, None], t)
            t = tl.fma(q5, x5[:, :, :, None], t)
            t = tl.fma(q6, x6[:, :, :, None], t)
            t = tl.fma(q7, x7[:, :, :, None], t)
            acc = tl.fma(s, t, acc)
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        r = rb * (GT * 4) + rows
        tl.store(c_ptr + r, out.to(c_ptr.dtype.element_ty), mask=r < N)


@triton.jit
def tma_read_kernel(q_ptr, out_ptr, G, KW4, GT: tl.constexpr, BW: tl.constexpr,
                    FLAT: tl.constexpr, STAGES: tl.constexpr):
    # The same walk and boxes as tma_gemv_kernel's codes, the words XOR-ed.
    cdesc = tl.make_tensor_descriptor(q_ptr, shape=[G, KW4], strides=[KW4, 1],
                                      block_shape=[GT, BW])
    acc = tl.zeros((GT, BW), tl.int32)
    for rb in tl.range(tl.program_id(0), G // GT, tl.num_programs(0), flatten=FLAT,
                       num_stages=STAGES if FLAT else 1):
        for kc in tl.range(KW4 // BW, num_stages=STAGES):
            acc ^= cdesc.load([rb * GT, kc * BW])
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(tl.xor_sum(acc, 1), 0))


def gemv_spec(c):
    from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, KernelSpec

    per = NUM_SMS * c["waves"]
    return KernelSpec(
        name=f"tma_gemv_g{c['GT']}b{c['NB']}w{c['warps']}s{c['stages']}v{c['waves']}f{c['FLAT']}",
        fn=tma_gemv_kernel,
        signature={"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*u8", "c_ptr": "*bf16",
                   "N": "i32", "K": "i32", "GT": "constexpr", "NB": "constexpr",
                   "FLAT": "constexpr", "STAGES": "constexpr"},
        constexprs=dict(GT=c["GT"], NB=c["NB"], FLAT=c["FLAT"], STAGES=c["stages"]), num_warps=c["warps"],
        num_stages=c["stages"],
        grid=lambda N: (min(per, -(-(-(-N // 4)) // c["GT"])), 1, 1), grid_args=("N",),
        divisible_by_16=("x_ptr", "q_ptr", "s_ptr", "c_ptr", "K"))


def read_spec(c):
    from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, KernelSpec

    per = NUM_SMS * c["waves"]
    return KernelSpec(
        name=f"tma_read_g{c['GT']}b{c['BW']}w{c['warps']}s{c['stages']}v{c['waves']}f{c['FLAT']}",
        fn=tma_read_kernel,
        signature={"q_ptr": "*i32", "out_ptr": "*i32", "G": "i32", "KW4": "i32",
                   "GT": "constexpr", "BW": "constexpr", "FLAT": "constexpr",
                   "STAGES": "constexpr"},
        constexprs=dict(GT=c["GT"], BW=c["BW"], FLAT=c["FLAT"], STAGES=c["stages"]), num_warps=c["warps"],
        num_stages=c["stages"], grid=lambda G: (min(per, G // c["GT"]), 1, 1), grid_args=("G",),
        divisible_by_16=("q_ptr", "out_ptr", "KW4"))


def gemv_confs():
    if DRY:
        return [dict(GT=2, NB=4, warps=1, stages=2, waves=1, FLAT=0),
                dict(GT=4, NB=2, warps=2, stages=3, waves=1, FLAT=1)]
    out = []
    for gt, nb, w, st, v, fl in itertools.product((2, 4, 8), (8, 16), (4, 8), (3, 5), (1, 2),
                                                  (0, 1)):
        kb = gt * nb * 16 * 4 // 1024 + 1      # a stage's KB (codes + scales)
        if kb * st * v <= 200 and gt * nb * 16 // (32 * w) >= 2:
            out.append(dict(GT=gt, NB=nb, warps=w, stages=st, waves=v, FLAT=fl))
    return out


def read_confs():
    if DRY:
        return [dict(GT=2, BW=64, warps=1, stages=2, waves=1, FLAT=1)]
    return [dict(GT=gt, BW=256, warps=w, stages=st, waves=v, FLAT=1)
            for gt, w, st, v in itertools.product((4, 8, 16), (1, 4), (3, 5, 8), (1, 2))
            if gt * st * v <= 96]


def main() -> None:
    torch.manual_seed(0)
    copy_gbs = 0.0
    if not DRY:
        from graphir.tools.gpu_timing import copy_gbs as measure_copy

        copy_gbs = measure_copy()
        print(f"device copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if not DRY:
        from graphir.lowering.triton_gpu.kernels.spec import torch_global_scratch
        torch_global_scratch(torch.device("cuda"))
    else:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    specs = {}
    for c in gemv_confs():
        specs[gemv_spec(c).name] = gemv_spec(c)
    for c in read_confs():
        specs[read_spec(c).name] = read_spec(c)
    kernels = _kernels.compile_all(specs, DRY)
    results, weights, peer = [], {}, {}
    for N, K in qn.SHAPES:
        # The shipped bucket first, in the same process and with the same weights.
        ship = qn.bucket_jobs("q4_0", N, K)[0]
        qn.run([ship], copy_gbs, results, weights, peer)
        wsets, nbytes, wt = weights[("q4_0", N, K)]
        x = torch.randn(1, K, device=DEV).to(torch.bfloat16)
        want = x.float() @ wt.t()
        out = torch.empty((1, N), dtype=torch.bfloat16, device=DEV)
        rows = []
        for c in gemv_confs():
            if K % (c["NB"] * 32):
                continue
            sp = gemv_spec(c)
            k = kernels[sp.name]
            res = dict(kernel=sp.name)
            if isinstance(k, Exception):
                print(sp.name, "FAILED", str(k)[:300], flush=True)
                continue
            grid = sp.grid_for(N=N)
            fns = [lambda q=q, s=s: k(grid, x, q, s, out, N, K) for q, s, _, _ in wsets]
            out.fill_(float("nan"))
            try:
                _kernels.check_then_time(res, fns, lambda: out[:, :wt.shape[0]].float(), want,
                                         nbytes, DRY)
            except Exception as e:  # noqa: BLE001  (reported, not timed)
                res["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(res)
            if "us" in res:
                pct = 100 * res["gbs"] / copy_gbs if copy_gbs else 0
                print(f"q4_0 {N}x{K} {sp.name:34} {res['us']:7.2f}us cuBLAS "
                      f"{peer[(N, K, 1)]:6.1f}us x{peer[(N, K, 1)] / res['us']:.2f} "
                      f"{pct:3.0f}%copy err {res['rel_err']:.1e}", flush=True)
            else:
                print(f"q4_0 {N}x{K} {sp.name:34} ERROR {res.get('error')}", flush=True)
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        print(f"== q4_0 {N}x{K}: shipped {results[-1].get('us', float('nan')):.2f} us; "
              f"best TMA " + ", ".join(f"{r['kernel']} {r['us']:.2f}" for r in ok[:4]),
              flush=True)
        # The read skeleton over the same code words.
        kw4 = K // 2
        codes = [ws[0].reshape(-1) for ws in wsets]
        G = codes[0].numel() // kw4
        outs = torch.empty(1024, dtype=torch.int32, device=DEV)
        best = []
        for c in read_confs():
            sp = read_spec(c)
            k = kernels[sp.name]
            if isinstance(k, Exception) or G % c["GT"] or kw4 % c["BW"]:
                continue
            grid = sp.grid_for(G=G)
            fns = [lambda q=q: k(grid, q, outs, G, kw4) for q in codes]
            fns[0]()
            got = 0
            for v in outs[:grid[0]].tolist():
                got ^= v
            want_x = int(np.bitwise_xor.reduce(codes[0].cpu().numpy().view(np.int32)))
            if got != want_x:
                print(f"read {sp.name}: WRONG xor", flush=True)
                continue
            us = _kernels.timed(fns, DRY)
            best.append((us, sp.name))
        best.sort()
        nb = codes[0].numel() * 4
        print(f"== codes {nb / 1e6:.1f} MB: TMA read best " + ", ".join(
            f"{n} {u:.2f} us ({nb / u / 1e3:.0f} GB/s)" for u, n in best[:4]), flush=True)


if __name__ == "__main__":
    main()
