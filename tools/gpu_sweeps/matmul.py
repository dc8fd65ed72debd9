"""GPU sweep: C = A @ B^T in bf16 (B the [N, K] nn.Linear weight) for every matmul candidate of
lowering/triton_gpu/kernels/matmul_configs.py, each rank of cuBLASLt's heuristic list through our
wrapper, and two peers: cuBLAS (torch F.linear, default backend) and torch's own cuBLASLt path
(F.linear under torch.backends.cuda.preferred_blas_library("cublaslt")).

Shapes: M in 1..8192 rows against the Llama-8B projection weights (qkv 6144x4096, o 4096x4096,
MLP 28672x4096). The kernels are the cubins an artifact ships (compiled offline, in parallel),
launched through graphir's own runtime on torch's stream; each is checked against an fp32
reference first (a failing one is reported, not timed). Times are device times of many calls
captured in one CUDA graph, weights rotated among copies so the L2 (60 MB) never holds them.
cuBLAS is timed before and after ours and its faster time counts (clock drift favours the peer).

Diagnostics for our cuBLASLt wrapper (issue 10: 5-9% behind cuBLAS at M=8192): per shape, every
rank's time and config ids; for M >= 1024 the kernel names cuBLAS, torch-cuBLASLt and our ranks
launch (torch.profiler), and whether the heuristic's first choice changes between 16- and
256-byte alignment.

Prints LAST a table per shape: cuBLAS, torch's cuBLASLt, our best Triton candidate, our
cuBLASLt rank 0 ("Lt0", the heuristic's choice), our fastest rank ("LtBest"), and the ratio
cuBLAS/ours. With $OUT set, writes every timing to $OUT/matmul.json and the tuning table these
timings imply to $OUT/matmul_tuning_defaults.json (the matmul family of
lowering/triton_gpu/tuning_defaults.json, with pinned cuBLASLt algorithm records).
    python3 tools/gpu_sweeps/matmul.py          (or: bash tools/gpu_sweep.sh matmul)
Shipping a measured table (no GPU needed; other families of the shipped file stay as they are):
    python3 tools/gpu_sweeps/matmul.py --merge $OUT/matmul_tuning_defaults.json "run N"
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from graphir.lowering.triton_gpu.kernels import matmul_configs as mc
from graphir.lowering.triton_gpu.lowerings.base import spec_key
from graphir.lowering.triton_gpu.tuning_gpu import compile_specs
from graphir.tools.gpu_timing import copies_to_beat_l2, graph_ms, rel_err, table

MS = (1, 16, 64, 256, 1024, 8192)
NK = ((6144, 4096), (4096, 4096), (28672, 4096))
BUDGET_S = 100   # candidate timing stops here; the end-to-end --tune check follows
LIMIT_S = 145    # tools/gpu_sweep.sh kills the sweep at 150 s
MAX_ERR = 1e-2
T0 = time.time()
F = torch.nn.functional


def configs_for(M: int, N: int, K: int) -> list[dict]:
    cands = mc.candidates(mc.bucket_of(M), "bfloat16", N, K)
    legacy = mc.get(mc.DECODE["name"] if M <= 64 else mc.PREFILL["name"])
    return cands + ([legacy] if legacy not in cands else [])


def compile_all() -> tuple[dict, dict]:
    specs = {}
    for M in MS:
        for N, K in NK:
            for cfg in configs_for(M, N, K):
                if cfg["kind"] != "cublaslt":
                    specs.update({spec_key(s): s for s in mc.specs(cfg, "bfloat16", False, K, N)})
    t = time.time()
    done = compile_specs(specs, 90)
    print(f"compiled {len(specs)} kernels in {time.time() - t:.1f} s "
          f"({sum(isinstance(v, Exception) for v in done.values())} failed)", flush=True)
    for key, v in done.items():
        if isinstance(v, Exception):
            print(f"  compile failed {key}: {type(v).__name__}: {v}"[:300], flush=True)
    return specs, done


def our_calls(cfg, M, N, K, a, ws, c, kernels):
    """One zero-argument callable per weight copy, launching `cfg` on torch's stream."""
    plan = mc.launches(cfg, "bfloat16", False, N, K, M)
    ks = []
    for s in plan["specs"]:
        k = kernels[spec_key(s)]
        if isinstance(k, Exception):
            raise k
        ks.append(k)
    scratch = {n: torch.empty(max(int(cnt), 1), dtype=torch.float32, device="cuda")
               for n, _, cnt in plan["scratch"]}

    def call(w):
        stream = torch.cuda.current_stream().cuda_stream
        bind = {"a": a, "b": w, "c": c, "M": M, "N": N, "K": K, **scratch}
        for idx, grid, args in plan["ops"]:
            ks[idx].launch(grid, *[bind[t] for t in args], stream=stream)
    return [lambda w=w: call(w) for w in ws]


def lt_matmul(M, N, K, rank):
    """Our wrapper pinned to rank `rank` of the heuristic's list for M rows (0: its choice)."""
    from graphir.runtime.cuda.cublaslt import CublasLtMatmul

    lt = CublasLtMatmul("bf16", N, K, False, 0, algo={"index": rank, "at_m": M})
    if rank and lt.plan(M)[3] != "pinned":
        raise RuntimeError(f"no usable rank {rank} for M={M}")
    return lt


def lt_calls(lt, M, N, K, a, ws, c):
    return [lambda w=w: lt.launch((1, 1, 1), a, w, a, c, M, N, K,
                                  stream=torch.cuda.current_stream().cuda_stream) for w in ws]


def measure(fns, c, ref, est_ms):
    c.fill_(float("nan"))
    fns[0]()
    torch.cuda.synchronize()
    err = rel_err(c, ref)
    if not err <= MAX_ERR:
        return {"rel_err": err, "error": f"rel_err {err:.2e} > {MAX_ERR}"}
    calls = max(len(fns), min(100, int(10.0 / max(est_ms, 1e-3))))
    calls = -(-calls // len(fns)) * len(fns)
    return {"rel_err": err, "us": graph_ms(fns, calls=calls, batches=5, warmup=1) * 1e3}


def peer_us(a, ws, backend="cublas"):
    """F.linear's device time under torch's `backend` BLAS library (cublas or cublaslt)."""
    prev = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(backend)
    try:
        return graph_ms([lambda w=w: F.linear(a, w) for w in ws], calls=max(len(ws), 10),
                        batches=5, warmup=1) * 1e3
    finally:
        torch.backends.cuda.preferred_blas_library(prev)


def kernel_names(fns: dict) -> dict:
    """{label: names of the CUDA kernels one eager call of fns[label] launches}."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out[label] = sorted({e.name for e in prof.events()
                             if str(e.device_type).endswith("CUDA")
                             and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()})
    return out


def lt_ranks(res, M, N, K, a, ws, c, ref, est, diagnose):
    """Time every rank of the heuristic's list and record its algorithm; with `diagnose`, also
    the kernels each side launches and the first choice at 16- vs 256-byte alignment."""
    from graphir.runtime.cuda import cublaslt_algo as la

    ranks, lts, why = {}, {}, "cuBLASLt lists no algorithm"
    try:
        listed = len(lt_matmul(M, N, K, 0).ranked(M, count=mc.LT_RANKS))
    except Exception as e:  # noqa: BLE001  (no cuBLASLt: every rank reports it)
        listed, why = 0, f"{type(e).__name__}: {e}"[:200]
    for r in range(mc.LT_RANKS):
        if r >= listed:
            ranks[mc.cublaslt(r)["name"]] = {"error": why if not listed else
                                             f"the heuristic lists {listed} algorithms"}
            continue
        try:
            lts[r] = lt = lt_matmul(M, N, K, r)
            row = measure(lt_calls(lt, M, N, K, a, ws, c), c, ref, est)
            row["algo"] = lt.algo_record(M)
            row["desc"] = la.describe(row["algo"])
        except Exception as e:  # noqa: BLE001  (a missing rank is normal)
            row = {"error": f"{type(e).__name__}: {e}"[:200]}
        ranks[mc.cublaslt(r)["name"]] = row
    res["lt_ranks"] = ranks
    res["cublaslt"] = ranks["cublaslt"]
    if not diagnose or 0 not in lts or time.time() - T0 > 0.6 * BUDGET_S:
        return
    stream = torch.cuda.current_stream
    ours = {f"ours_{name}": (lambda lt=lts[mc.get(name)["ALGO_INDEX"]]: lt.launch(
        (1, 1, 1), a, ws[0], a, c, M, N, K, stream=stream().cuda_stream))
        for name in {"cublaslt", lt_best(res)[1] or "cublaslt"}}
    try:
        res["lt_align_top1"] = {al: la.read_config(lts[0].lib, lts[0].ranked(M, al, 1)[0].algo)
                                for al in (16, 256)}
        names = kernel_names({"cublas": lambda: F.linear(a, ws[0]), **ours})
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            names.update(kernel_names({"torch_cublaslt": lambda: F.linear(a, ws[0])}))
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
        res["kernels"] = names
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        res["kernels"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    print(f"  M={M} N={N} kernels {res['kernels']}; heuristic top-1 at 16 vs 256 B alignment: "
          f"{res.get('lt_align_top1')}", flush=True)


def main() -> None:
    from graphir.runtime.cuda import Kernel

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    specs, done = compile_all()
    kernels = {}
    for key, c in done.items():
        try:
            kernels[key] = c if isinstance(c, Exception) else \
                Kernel.from_cubin(c.cubin, c.launch_metadata())
        except Exception as e:  # noqa: BLE001  (reported with each config that uses it)
            kernels[key] = e
    results, rows = [], []
    for N, K in NK:
        w0 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ws = [w0] + [w0.clone() for _ in range(copies_to_beat_l2(w0.numel() * 2) - 1)]
        for M in MS:
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            ref = a.float() @ w0.float().t()
            est = max(2 * M * N * K / 600e9, N * K * 2 / 3.5e9)  # ms: compute or weight read
            res = {"M": M, "N": N, "K": K, "bucket": mc.bucket_of(M), "ours": {}}
            first = peer_us(a, ws)
            try:
                res["torch_cublaslt_us"] = peer_us(a, ws, "cublaslt")
            except Exception as e:  # noqa: BLE001  (an older torch lacks the switch)
                res["torch_cublaslt_error"] = f"{type(e).__name__}: {e}"[:200]
            lt_ranks(res, M, N, K, a, ws, c, ref, est, diagnose=M >= 1024)
            for cfg in configs_for(M, N, K):
                if cfg["kind"] == "cublaslt":
                    continue
                if time.time() - T0 > BUDGET_S:
                    res["ours"][cfg["name"]] = {"error": "skipped: time budget"}
                    continue
                try:
                    fns = our_calls(cfg, M, N, K, a, ws, c, kernels)
                    res["ours"][cfg["name"]] = measure(fns, c, ref, est)
                except Exception as e:  # noqa: BLE001
                    res["ours"][cfg["name"]] = {"error": f"{type(e).__name__}: {e}"[:200]}
            res["cublas_us_runs"] = [first, peer_us(a, ws)]
            res["cublas_us"] = min(res["cublas_us_runs"])
            results.append(res)
            rows.append(summary_row(res))
            print(" ".join(map(str, rows[-1])), flush=True)
            del a, c, ref
        del ws, w0
        torch.cuda.empty_cache()
    write(results)
    print_table(rows, results)  # in case the end-to-end check below runs out of time
    e2e = end_to_end()
    write(results, e2e)
    print(f"end-to-end compile --tune + run: {e2e}"[:900])
    print_table(rows, results)


def end_to_end() -> dict:
    """compile_graph(..., options={"tune": True}) on this GPU, load the artifact with graphir's
    runtime and run every bucket (with a bias) against torch: the tuner's own path."""
    import signal
    import tempfile

    from graphir import DType, Graph, TensorType, ops
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda.device_model import load

    left = int(LIMIT_S - (time.time() - T0))
    if left < 20:
        return {"skipped": f"only {left} s left"}

    def expire(*_):
        raise TimeoutError(f"end-to-end check over its {left} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(left)
    N, K = 4096, 4096
    out: dict = {}
    try:
        types = [TensorType(DType.bfloat16, ["n", K]), TensorType(DType.bfloat16, [N, K]),
                 TensorType(DType.bfloat16, [N])]
        with Graph("mm_tuned", input_types=types) as g:
            g.output(ops.fused_qkv_matmul(*g.inputs))
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            art = compile_graph(g, "cuda:sm_90", out=Path(tmp) / "mm.gart",
                                options={"tune": True})
            sec = art.manifest["tuning"]
            out["tuned"], out["tune_s"] = sec["tuned"], round(time.time() - t, 1)
            out["winners"] = {b["bucket"]: b["winner"] for b in sec["steps"][0]["buckets"]}
            out["pinned"] = sorted(k for k, md in art.manifest["kernels"].items()
                                   if md.get("algo", {}).get("bytes")
                                   and md["algo"].get("index"))
            model = load(art, {})
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            out["rel_err"] = {}
            for M in (1, 16, 64, 300, 2000, 5000):
                # Twice: the second call of a shape is captured into a CUDA graph and replayed
                # (TMA scratch and pinned cuBLASLt algorithms inside a graph).
                for _ in range(2):
                    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                    (y,) = model.execute(x, w, b)
                    y = torch.from_dlpack(y)
                    torch.cuda.synchronize()
                    err = rel_err(y, x.float() @ w.float().t() + b.float())
                    out["rel_err"][M] = max(out["rel_err"].get(M, 0.0), float(f"{err:.2e}"))
            out["graphs"] = {k: model.executor.stats[k] for k in ("captures", "replays")}
            out["ok"] = all(e <= MAX_ERR for e in out["rel_err"].values())
    except Exception as e:  # noqa: BLE001  (reported, the sweep's table still prints)
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return out


def best_triton(res, single_launch=False):
    ok = [(v["us"], n) for n, v in res["ours"].items() if "us" in v
          and (not single_launch or mc.get(n).get("SPLIT_K", 1) == 1)
          and n in {c["name"] for c in mc.candidates(res["bucket"], "bf16", res["N"], res["K"])}]
    return min(ok) if ok else (math.inf, None)


def lt_best(res):
    ok = [(v["us"], n) for n, v in res.get("lt_ranks", {}).items() if "us" in v]
    return min(ok) if ok else (math.inf, None)


def summary_row(res):
    us, name = best_triton(res)
    lt0 = res["cublaslt"].get("us", math.inf)
    ltb, ltn = lt_best(res)
    best = min(us, ltb)
    fails = sum("us" not in v for v in res["ours"].values())
    return [res["M"], res["N"], f"{res['cublas_us']:.1f}",
            f"{res.get('torch_cublaslt_us', math.inf):.1f}", name, f"{us:.1f}",
            f"{res['cublas_us'] / us:.2f}", f"{lt0:.1f}", f"{ltb:.1f}",
            (ltn or "-").replace("cublaslt_", "").replace("cublaslt", "h0"),
            f"{res['cublas_us'] / best:.2f}", fails]


def suggested_table(results) -> dict:
    """Per bucket: the Triton config with the best geometric-mean ratio over the weights ("*"),
    and per weight shape the overall winner (a cuBLASLt rank, pinned by its algorithm record,
    with its Triton fallback, if it wins by 3%)."""
    fam: dict = {"*": {}}
    for bucket in {r["bucket"] for r in results}:
        rs = [r for r in results if r["bucket"] == bucket]
        scores = {}
        for n in {n for r in rs for n in r["ours"]}:
            if all("us" in r["ours"].get(n, {}) for r in rs) and \
                    n in {c["name"] for c in mc.candidates(bucket, "bf16", 4096, 4096)}:
                scores[n] = sum(math.log(r["ours"][n]["us"] / r["cublas_us"]) for r in rs)
        if scores:
            fam["*"][bucket] = min(scores, key=scores.get)
        for r in rs:
            us, name = best_triton(r)
            lt, ltn = lt_best(r)
            key = f"N={r['N']},K={r['K']}"
            if lt < us * 0.97:
                fb = best_triton(r, single_launch=True)[1] or mc.default_config(bucket)["name"]
                choice = {"config": ltn, "fallback": fb}
                if ltn != "cublaslt":
                    choice["params"] = {"algo": r["lt_ranks"][ltn]["algo"]}
                fam.setdefault(key, {})[bucket] = choice
            elif name:
                fam.setdefault(key, {})[bucket] = name
    dev = torch.cuda.get_device_name(0)
    return {"version": 1, "device": dev,
            "provenance": {"matmul": f"tools/gpu_sweeps/matmul.py on {dev}, torch "
                                     f"{torch.__version__}; bf16 timings, used for fp16; fp32 "
                                     f"entries predicted (decode/prefill), not measured"},
            "families": {"matmul": {"bf16": fam, "fp16": json.loads(json.dumps(fam)),
                                    "fp32": {"*": {b: (mc.DECODE if t is not None and t <= 64
                                                       else mc.PREFILL)["name"]
                                                   for b, t in mc.BUCKETS}}}}}


def write(results, e2e=None) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "matmul.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "results": results,
                   "end_to_end_tune": e2e}, f, indent=1)
    with open(os.path.join(out, "matmul_tuning_defaults.json"), "w") as f:
        json.dump(suggested_table(results), f, indent=1)


def print_table(rows, results) -> None:
    ok_big = [r for r in rows if r[0] >= 1024]
    ok_small = [r for r in rows if r[0] <= 64]
    met_big = sum(float(r[10]) >= 0.95 for r in ok_big)
    met_small = sum(float(r[10]) >= 0.9 for r in ok_small)
    lt_ok = sum(float(r[2]) / float(r[8]) >= 0.98 for r in rows if r[8] != "inf")
    print(f"\n== matmul bf16, device us per call (weights rotated), {time.time() - T0:.0f} s")
    print(table(rows, ["M", "N", "cuBLAS", "torchLt", "best Triton", "us", "ratio", "Lt0",
                       "LtBest", "rank", "best ratio", "fail"]))
    print(f"targets (best of ours incl. cuBLASLt): M>=1024 >=0.95x {met_big}/{len(ok_big)}; "
          f"M<=64 >=0.9x {met_small}/{len(ok_small)}; our best cuBLASLt rank >=0.98x cuBLAS "
          f"{lt_ok}/{len(rows)}; ratio = cuBLAS us / ours us")


def merge(measured_path: str, run: str) -> None:
    """Replace the matmul family of the shipped tuning table with a sweep's measured one."""
    from graphir.lowering.triton_gpu import tuning

    measured = json.loads(Path(measured_path).read_text())
    tuning.validate_table(measured, measured_path)
    order = [b for b, _ in mc.BUCKETS]
    fam = {dt: {shape: {b: per[b] for b in order if b in per} for shape, per in shapes.items()}
           for dt, shapes in measured["families"]["matmul"].items()}
    shipped = json.loads(tuning.DEFAULTS_PATH.read_text())
    shipped["device"] = measured["device"]
    shipped.setdefault("provenance", {})["matmul"] = (
        f"Measured, not predicted: {run} of " + measured.get("provenance", {}).get(
            "matmul", measured.get("note", "tools/gpu_sweeps/matmul.py")))
    shipped["families"]["matmul"] = fam
    tuning.validate_table(shipped)
    tuning.DEFAULTS_PATH.write_text(json.dumps(shipped, indent=1) + "\n")
    print(f"merged {measured_path} into {tuning.DEFAULTS_PATH}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--merge"]:
        merge(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "a GPU run")
    else:
        main()
