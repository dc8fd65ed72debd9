"""Quantized matmul sweep on one GPU: graphir's dequantize-in-the-loop kernels against cuBLAS
bf16 on the same shapes (the MLA decode has its own sweep: tools/gpu_sweeps/mla.py).

Matmuls: y = x @ W^T for W of 4096x4096 and 14336x4096 (out x in), x of 1 and 16 rows (bf16), W
in every GGUF encoding the kernels decode (Q4_0 ... Q6_K) and GPTQ (4-bit group 128 symmetric,
4-bit group 128 asymmetric with desc_act, 8-bit); the launches are the plan's (the row bucket's
config, split-K and its reduce). Each variant is first checked against a float32 product of
the weight decoded by graphir's numpy reference (on 4096x4096, or 1024 rows of the larger
weight), then timed with weights rotated among copies larger than 4x the L2; the peer is
torch's bf16 matmul (cuBLAS) on the dequantized weight, rotated the same way. Reported: times,
cuBLAS / ours, GB/s of quantized bytes read and the share of the device copy bandwidth.
Targets (issue 12): 4-bit at batch 1 >= 3x cuBLAS, Q4_K / Q6_K >= 75% of copy bandwidth,
batch 16 no slower than cuBLAS. Batches the decode GEMV kernels take (M <= 4,
kernels/quant_gemv.py) are timed both ways, rows "dot" (the tensor-core matmul) and "gemv",
whatever the shipped switch says; "plan" rows are what the lowering launches. A few alternative
tile configs of Q4_0 / Q4_K / Q6_K / GPTQ at batch 1 on the large weight are timed too ("alt"
rows, "gemv-..." for the GEMV kernels) to guide the shipped configs.

Kernels are compiled offline in worker processes (as `--tune` does) and launched through
graphir.runtime.cuda on torch's stream, captured in CUDA graphs (tools/gpu_timing.graph_ms).
Writes $OUT/quant.json. Under ~120 s.
    python3 tools/gpu_sweeps/quant.py           (or: bash tools/gpu_sweep.sh quant)
    python3 tools/gpu_sweeps/quant.py --dry-run (CPU, Triton interpreter, tiny shapes)
    python3 tools/gpu_sweeps/quant.py --only Q4_0,Q4_K --ms 1,2   (a subset)
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dry import DRY  # noqa: E402  (first: --dry-run sets Triton's interpreter up)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphir.lowering.triton_gpu.kernels import quant as qk  # noqa: E402
from graphir.lowering.triton_gpu.kernels import quant_gemv as qg  # noqa: E402
from graphir.lowering.triton_gpu.kernels import quant_gptq as gk  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_gguf import FORMATS  # noqa: E402
from graphir.lowering.triton_gpu.kernels.spec import cdiv  # noqa: E402
from graphir.lowering.triton_gpu.lowerings.base import spec_key  # noqa: E402

import _kernels  # noqa: E402

T0 = time.time()
LIMIT_S = 115
DEV = "cpu" if DRY else "cuda"
GGUF = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GPTQ = {"GPTQ4": dict(bits=4, group_size=128, sym=True, desc=False),
        "GPTQ4za": dict(bits=4, group_size=128, sym=False, desc=True),
        "GPTQ8": dict(bits=8, group_size=128, sym=True, desc=False)}
SHAPES = [(4096, 4096), (14336, 4096)]
MS = (1, 4, 16)
ALT = {"Q4_0", "Q4_K", "Q6_K", "GPTQ4", "GPTQ4za"} if DRY else {"Q4_0", "Q4_K", "Q6_K", "GPTQ4"}
if DRY:
    GGUF = ["Q4_0", "Q4_K", "Q6_K", "Q3_K"]
    GPTQ = {"GPTQ4za": GPTQ["GPTQ4za"]}
    SHAPES = [(40, 512)]
if "--only" in sys.argv:
    ONLY = sys.argv[sys.argv.index("--only") + 1].split(",")
    GGUF = [g for g in GGUF if g in ONLY]
    GPTQ = {k: v for k, v in GPTQ.items() if k in ONLY}
if "--ms" in sys.argv:
    MS = tuple(int(m) for m in sys.argv[sys.argv.index("--ms") + 1].split(","))
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def left() -> float:
    return LIMIT_S - (time.time() - T0)


def copies(nbytes: int) -> int:
    if DRY:
        return 2
    from graphir.tools.gpu_timing import copies_to_beat_l2

    return copies_to_beat_l2(nbytes)


# -- quantized weights ------------------------------------------------------------------------------
def gguf_weight(rng, enc: str, n: int, k: int):
    """(uint8 rows [n, row_bytes], float32 decoded [rows_checked, k]) of random codes with sane
    float16 scales; decoded by graphir's numpy reference."""
    from graphir.ops.quant.gguf_blocks import dequantize_gguf

    f = FORMATS[enc]
    nb = k // f.block_elems
    raw = rng.integers(0, 256, (n, nb, f.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[enc]:
        d = (rng.uniform(0.002, 0.02, (n, nb)) * rng.choice([-1, 1], (n, nb))).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n, nb, 2)
    raw = raw.reshape(n, -1)
    check = min(n, 1024 if n > 4096 else n)
    return raw, dequantize_gguf(raw[:check], enc, k)


def gptq_weight(rng, cfg: dict, n: int, k: int):
    """(uint8 weight [k*bits/8 + 2G, n], qzeros or None, perm or None, float32 W^T rows
    [n_checked, k] in x's column order)."""
    from graphir.ops.quant.gptq import dequantize_gptq
    from graphir.ops.quant.gptq_layout import gptq_weight_bytes, pack_rows

    bits, gs = cfg["bits"], cfg["group_size"]
    groups = k // gs
    codes = rng.integers(0, 1 << bits, (k, n), dtype=np.uint8)
    scales = (rng.uniform(0.002, 0.02, (groups, n)) * rng.choice([-1, 1], (groups, n)))
    qw = pack_rows(codes, bits)
    weight = gptq_weight_bytes(qw, scales.astype(np.float16))
    qzeros = None
    if not cfg["sym"]:
        z = rng.integers(1, (1 << bits) - 1, (groups, n), dtype=np.uint8)
        qzeros = pack_rows(np.ascontiguousarray(z.T), bits).T.copy()
    perm = rng.permutation(k).astype(np.int32) if cfg["desc"] else None
    check = min(n, 1024 if n > 4096 else n)
    wf = dequantize_gptq(qw[:, :check], scales[:, :check].astype(np.float16),
                         None if qzeros is None else qzeros[:, :check * bits // 32], None, gs,
                         bits=bits)                      # [k, check], rows in sorted order
    wt = np.empty((check, k), np.float32)
    if perm is not None:
        wt[:, perm] = wf.T                               # x[:, perm] @ wf == x @ wt^T
    else:
        wt[:] = wf.T
    return weight, qzeros, perm, wt


# -- one matmul variant: the plan's launches ------------------------------------------------------
def row_bytes(enc, K):
    return K // FORMATS[enc].block_elems * FORMATS[enc].block_bytes


def gguf_calls(enc, conf, M, N, K, x, ws, out, kernels):
    specs = qk.matmul_specs(enc, "bfloat16", conf, row_bytes(enc, K))
    ks = [kernels[spec_key(s)] for s in specs]
    for k in ks:
        if isinstance(k, Exception):
            raise k
    split = conf["SPLIT_K"]
    part = torch.empty((split * M * N,), dtype=torch.float32, device=DEV) if split > 1 else None
    groups = K // FORMATS[enc].E

    def call(w):
        c = out if split == 1 else part
        ks[0](specs[0].grid_for(M=M, N=N), x, w, c, M, N, w.shape[1], groups,
              conf["groups_per_split"])
        if split > 1:
            ks[1](specs[1].grid_for(M=M, N=N), part, out, out, M, N)
    return [lambda w=w: call(w) for w in ws]


def gptq_calls(cfg, conf, M, N, K, x, ws, z, perm, out, kernels):
    specs = gk.matmul_specs("bfloat16", conf, bits=cfg["bits"], has_zeros=z is not None,
                            has_perm=perm is not None, n=N)
    ks = [kernels[spec_key(s)] for s in specs]
    for k in ks:
        if isinstance(k, Exception):
            raise k
    split = conf["SPLIT_K"]
    part = torch.empty((split * M * N,), dtype=torch.float32, device=DEV) if split > 1 else None
    dummy = torch.zeros(16, dtype=torch.int32, device=DEV)

    def call(w):
        c = out if split == 1 else part
        ks[0](specs[0].grid_for(M=M, N=N), x, w, dummy if z is None else z,
              dummy if perm is None else perm, c, M, N, K, cfg["group_size"],
              conf["tiles_per_split"])
        if split > 1:
            ks[1](specs[1].grid_for(M=M, N=N), part, out, out, M, N)
    return [lambda w=w: call(w) for w in ws]


def plan_conf(kind, M, N, K, bits=4, gemv=None, perm=False):
    """The lowering's config for a dynamic M (its bucket); gemv True / False forces the path."""
    tops = qk.bucket_tops() if kind != "GPTQ" else gk.bucket_tops(perm)
    if gemv is not None:
        tops = [t for t, _ in qg.GEMV_BUCKETS] if gemv else [16, 64, None]
    top = next(t for t in tops if t is None or M <= t)
    if kind == "GPTQ":
        return gk.config_for(top, N, K, bits, gemv=gemv, has_perm=perm)
    return qk.config_for(top, kind, N, K, gemv=gemv)


def path_confs(kind, M, N, K, bits=4, perm=False):
    """[(label, conf)]: the plan's, and at GEMV batches both paths."""
    if M > qg.GEMV_BUCKETS[-1][0]:
        return [("plan", plan_conf(kind, M, N, K, bits, perm=perm))]
    gemv = plan_conf(kind, M, N, K, bits, perm=perm).get("GEMV", False)
    return [("dot" + ("" if gemv else "/plan"), plan_conf(kind, M, N, K, bits, False, perm)),
            ("gemv" + ("/plan" if gemv else ""), plan_conf(kind, M, N, K, bits, True, perm))]


def alt_confs(name, N, K):
    """A few tile variants at batch 1 beside the plan's config."""
    out = []
    if name not in ALT:
        return out
    if name.startswith("GPTQ"):
        bits = GPTQ[name]["bits"]
        for bn, words, w in ((32, 16, 4), (128, 16, 4), (64, 32, 4), (64, 8, 2)):
            c = gk.config_for(1, N, K, bits, gemv=True)
            bk = words * 32 // bits
            steps = cdiv(K, bk)
            split = max(1, min(cdiv(qk.TARGET_PROGRAMS, cdiv(N, bn)), steps, 16))
            c.update(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, tiles_per_split=cdiv(steps, split),
                     SPLIT_K=cdiv(steps, cdiv(steps, split)))
            out.append((f"gemv-n{bn}k{bk}w{w}", c))
        for bn, bk in ((32, 256), (128, 256), (64, 512)):
            c = gk.config_for(16, N, K)
            c.update(BLOCK_N=bn, BLOCK_K=bk)
            steps = cdiv(K, bk)
            split = max(1, min(cdiv(qk.TARGET_PROGRAMS, cdiv(N, bn)), steps, 16))
            c.update(tiles_per_split=cdiv(steps, split), SPLIT_K=cdiv(steps, cdiv(steps, split)))
            out.append((f"n{bn}k{bk}", c))
        return out
    e = FORMATS[name].E
    groups = K // e
    for bn, vals, w in ((32, 128, 4), (64, 256, 4), (16, 256, 2), (32, 512, 4), (64, 128, 8)):
        c = qk.config_for(1, name, N, K, gemv=True)
        ng = max(1, min(vals // e, 2 * qk.GEMV_LANES // FORMATS[name].L))
        steps = cdiv(groups, ng)
        split = max(1, min(cdiv(qk.TARGET_PROGRAMS, cdiv(N, bn)), steps, 16))
        per = cdiv(steps, split) * ng
        c.update(BLOCK_N=bn, NG=ng, num_warps=w, groups_per_split=per,
                 SPLIT_K=cdiv(groups, per))
        out.append((f"gemv-n{bn}v{vals}w{w}", c))
    for bn, kv, w in ((32, 256, 4), (128, 256, 8), (64, 512, 8), (32, 128, 2)):
        c = qk.config_for(16, name, N, K)
        ng = max(2, kv // e)
        steps = cdiv(K // e, ng)
        split = max(1, min(cdiv(qk.TARGET_PROGRAMS, cdiv(N, bn)), steps, 16))
        per = cdiv(steps, split) * ng
        c.update(BLOCK_N=bn, NG=ng, num_warps=w, groups_per_split=per, SPLIT_K=cdiv(K // e, per))
        out.append((f"n{bn}k{kv}w{w}", c))
    return out


def matmul_jobs():
    """[(name, kind, N, K, M, label, conf)] of every variant to time."""
    jobs = []
    for name in GGUF + list(GPTQ):
        kind = name if name in GGUF else "GPTQ"
        bits = GPTQ[name]["bits"] if name in GPTQ else 4
        perm = name in GPTQ and GPTQ[name]["desc"]
        for N, K in SHAPES:
            for M in MS:
                jobs += [(name, kind, N, K, M, lab, c)
                         for lab, c in path_confs(kind, M, N, K, bits, perm)]
            if (N, K) == SHAPES[-1]:
                jobs += [(name, kind, N, K, 1, lab, c) for lab, c in alt_confs(name, N, K)]
    return jobs


def job_specs(job):
    name, kind, N, K, M, label, conf = job
    if kind == "GPTQ":
        cfg = GPTQ[name]
        return gk.matmul_specs("bfloat16", conf, bits=cfg["bits"], has_zeros=not cfg["sym"],
                               has_perm=cfg["desc"], n=N)
    return qk.matmul_specs(kind, "bfloat16", conf, row_bytes(kind, K))


def run_matmuls(kernels, copy_gbs, results, rows):
    rng = np.random.default_rng(0)
    jobs = matmul_jobs()
    by_weight = {}
    for j in jobs:
        by_weight.setdefault((j[0], j[2], j[3]), []).append(j)
    peer = {}
    for (name, N, K), js in by_weight.items():
        if left() < 25:
            print(f"time budget: skipping {name} {N}x{K}", flush=True)
            continue
        kind = js[0][1]
        if kind == "GPTQ":
            raw, z, perm, wt = gptq_weight(rng, GPTQ[name], N, K)
            zt = None if z is None else torch.from_numpy(z).to(DEV)
            pt = None if perm is None else torch.from_numpy(perm).to(DEV)
        else:
            raw, wt = gguf_weight(rng, kind, N, K)
        w0 = torch.from_numpy(raw).to(DEV)
        ws = [w0] + [w0.clone() for _ in range(copies(raw.nbytes) - 1)]
        qbytes = raw.nbytes + (0 if kind != "GPTQ" or z is None else z.nbytes)
        for (_, _, _, _, M, label, conf) in js:
            xk = torch.randn(M, K, device=DEV).to(torch.bfloat16)
            out = torch.empty((M, N), dtype=torch.bfloat16, device=DEV)
            want = xk.float() @ torch.from_numpy(wt).to(DEV).t()
            res = dict(name=name, N=N, K=K, M=M, config=label,
                       conf={k: v for k, v in conf.items()}, quant_bytes=qbytes)
            try:
                fns = gptq_calls(GPTQ[name], conf, M, N, K, xk, ws, zt, pt, out, kernels) \
                    if kind == "GPTQ" else gguf_calls(kind, conf, M, N, K, xk, ws, out, kernels)
                out.fill_(float("nan"))
                _kernels.check_then_time(res, fns, lambda: out[:, :wt.shape[0]].float(), want,
                                         qbytes, DRY)
            except Exception as e:  # noqa: BLE001  (reported, not timed)
                res["error"] = f"{type(e).__name__}: {e}"[:300]
            if (N, K, M) not in peer:
                peer[(N, K, M)] = cublas_us(N, K, M)
            res["cublas_us"] = peer[(N, K, M)]
            results.append(res)
            rows.append(matmul_row(res, copy_gbs))
            print("  ".join(rows[-1]), flush=True)


def cublas_us(N, K, M) -> float:
    w0 = torch.randn(N, K, device=DEV).to(torch.bfloat16)
    ws = [w0] + [w0.clone() for _ in range(copies(w0.numel() * 2) - 1)]
    x = torch.randn(M, K, device=DEV).to(torch.bfloat16)
    us = _kernels.timed([lambda w=w: torch.matmul(x, w.t()) for w in ws], DRY)
    del ws
    return us


def matmul_row(r, copy_gbs):
    head = [r["name"], f"{r['N']}x{r['K']}", f"M={r['M']}", r["config"]]
    if "us" not in r:
        return head + ["ERROR " + r.get("error", "?")]
    return head + [f"{r['us']:.1f}us", f"cuBLAS {r['cublas_us']:.1f}us",
                   f"x{r['cublas_us'] / r['us']:.2f}", f"{r['gbs']:.0f}GB/s",
                   f"{100 * r['gbs'] / copy_gbs:.0f}%copy" if copy_gbs else "-",
                   f"err {r['rel_err']:.1e}"]


def main() -> None:
    torch.manual_seed(0)
    if not DRY:
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    specs = {}
    for job in matmul_jobs():
        specs.update({spec_key(s): s for s in job_specs(job)})
    kernels = _kernels.compile_all(specs, DRY)
    copy_gbs = 0.0
    if not DRY:
        from graphir.tools.gpu_timing import copy_gbs as measure_copy

        copy_gbs = measure_copy()
        print(f"device copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    results, rows = [], []
    run_matmuls(kernels, copy_gbs, results, rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "quant.json"), "w") as f:
            json.dump({"copy_gbs": copy_gbs, "results": results}, f, indent=1)
    from graphir.tools.gpu_timing import table

    print(f"\n== quantized matmul ({time.time() - T0:.0f} s; targets: 4-bit M=1 "
          f">= x3.00 cuBLAS, Q4_K/Q6_K M=1 >= 75%copy, M=16 >= x1.00)")
    print(table(rows))


if __name__ == "__main__":
    main()
