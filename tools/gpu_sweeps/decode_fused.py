"""The fused-reduce experiment of the paged decode kernel on one GPU (paged_decode.py's
`paged_decode_fused_kernel`: the last partition of each unit to finish merges the partials, so
a split decode is one launch instead of two): checked, then timed against the shipped split +
reduce launches and torch SDPA, side by side in one run, at decode.py's shapes.

Each shape runs the config the shipped table picks for it and the split rule's partition count
(what the plan launches); both forms are launched straight through Triton (no host sync, so
CUDA graphs capture them as they capture SDPA) and checked against a float32 reference first.
The fused form's gain is the reduce launch and its gap, so it matters where a decode is short:
B1 x 1024 (0.84x SDPA with split + reduce, BENCHMARKS.md) is the shape it is for.

    python3 -u tools/gpu_sweeps/decode_fused.py [--only B1x1024,B8x1024]
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode as DS  # noqa: E402  (its shapes, problems, SDPA forms and reference)

import torch  # noqa: E402

from graphir.lowering.triton_gpu import tuning  # noqa: E402
from graphir.lowering.triton_gpu.kernels import paged_decode as pd  # noqa: E402
from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg  # noqa: E402
from graphir.lowering.triton_gpu.kernels.spec import cdiv  # noqa: E402
from graphir.tools.gpu_timing import graph_ms, rel_err, table  # noqa: E402

D = DS.D


def shipped_config(shape) -> dict:
    _, _, _, page, _, nh, nkv = shape
    bucket = DS.bucket_of(shape)
    choice = next(c for c in tuning.select("decode", DS.facts_of(shape)) if c.bucket == bucket)
    return cfg.resolve(choice.config, nh, nkv, D, page, DS.tile_of(shape))


def launchers(shape, prob, conf, fused: bool):
    """One callable per input copy: the decode launch (and the reduce unless fused)."""
    _, B, ctx, page, q_len, nh, nkv = shape
    kvb = cdiv(ctx, DS.BUCKET) * DS.BUCKET
    T, tile = B * q_len, DS.tile_of(shape)
    nparts, part = cfg.split(B, nkv, kvb, conf)
    dev = prob["lut"].device
    out = torch.empty(T, nh * D, device=dev, dtype=torch.bfloat16)
    o_part = torch.empty(T * nh * nparts * D, device=dev, dtype=torch.float32)
    ml_part = torch.empty(T * nh * nparts * 2, device=dev, dtype=torch.float32)
    units = B * (nkv // conf["HEADS"])
    sem = (pd._semaphores(units, dev),) if fused else ()
    kernel = pd.paged_decode_fused_kernel if fused else pd.paged_decode_kernel
    cx = dict(cfg.constexprs(conf, nh, nkv, D, page, 1, tile), SOFTCAP=0.0)
    fns = []
    for s in prob["sets"]:
        def f(s=s):
            kernel[(units * nparts,)](
                s["q_rows"], prob["offs"], prob["cache_len"], prob["lut"], s["blocks"], out,
                o_part, ml_part, *sem, prob["lut"].shape[1], 0, 1, prob["num_pages"], 1,
                D ** -0.5, part, nparts, **cx, num_warps=conf["num_warps"],
                num_stages=conf["num_stages"])
            if nparts > 1 and not fused:
                pd.paged_decode_reduce_kernel[(T * nh,)](o_part, ml_part, out, nparts, D=D,
                                                         BLOCK_P=pd.BLOCK_P, num_warps=4)
            return out
        fns.append(f)
    return fns, nparts


def kv_bytes(shape) -> int:
    _, B, ctx, _, _, _, nkv = shape
    return 2 * B * nkv * ctx * D * 2


def main():
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    only = set(args["--only"].split(",")) if "--only" in args else set()
    import triton
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device="cuda"))
    rows, out = [], []
    for shape in DS.SHAPES:
        name = shape[0]
        if only and name not in only:
            continue
        prob = DS.make_problem(shape, "cuda", 3)
        want = DS.reference(shape, prob)
        res = {"shape": name}
        sd = DS.sdpa_fns(shape, prob)
        res["sdpa_ms"] = min(graph_ms(fns) for k, fns in sd.items() if k != "sdpa_gqa_boolmask")
        conf = shipped_config(shape)
        res["config"] = conf["name"]
        for label, fused in (("split", False), ("fused", True)):
            fns, nparts = launchers(shape, prob, conf, fused)
            res["parts"] = nparts
            try:
                err = rel_err(fns[0](), want)
                torch.cuda.synchronize()
                res[f"{label}_err"] = err
                res[f"{label}_ms"] = graph_ms(fns) if err < DS.TOL else float("nan")
            except Exception as e:  # noqa: BLE001
                res[f"{label}_err"] = f"{type(e).__name__}: {str(e)[-200:]}"
                res[f"{label}_ms"] = float("nan")
        tb = kv_bytes(shape) / 1e12
        rows.append([name, conf["name"], res["parts"], f"{tb / res['sdpa_ms'] * 1e3:.2f}",
                     f"{tb / res['split_ms'] * 1e3:.2f}", f"{tb / res['fused_ms'] * 1e3:.2f}",
                     f"{res['sdpa_ms'] / res['fused_ms']:.2f}",
                     f"{res['split_ms'] / res['fused_ms']:.2f}",
                     f"{res['fused_err']:.1e}" if isinstance(res["fused_err"], float)
                     else res["fused_err"][:40]])
        out.append(res)
        print(rows[-1], flush=True)
        del prob
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_fused.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(table(rows, ["shape", "config", "parts", "SDPA TB/s", "split TB/s", "fused TB/s",
                       "fused/SDPA", "fused/split", "fused err"]))


if __name__ == "__main__":
    sys.exit(main())
