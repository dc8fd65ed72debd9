"""The Gluon prefill kernel (kernels/flash_attention_wgmma.py) on one GPU: checked, then timed
against torch SDPA and the shipped Triton kernel, side by side in one run.

1. Correctness on ragged batches with cached prefixes (chunked prefill), every mask, NaN in the
   cache slots past each sequence's length, bf16 and fp16, head dims 64 and 128: against a
   float32 torch reference built from the same pages (`--check ""` skips it).
2. Speed at attention.py's shapes (TFLOP/s of unmasked work): SDPA's best form, the shipped
   Triton kernel's default config, and the Gluon kernel's variants (VARIANTS: 128- or
   64-key blocks, ring depth, single partition / warp-specialized / warp-specialized with
   the consumers taking turns / longest-first / persistent), each checked against SDPA before
   it is timed.

The warp-specialized forms wait on mbarriers: a protocol error hangs rather than fails, so run
the sweep under a deadline (tools/gpu_sweep.sh gives each sweep one) with unbuffered output.

    python3 -u tools/gpu_sweeps/attention_wgmma.py [--only c4k,n4k] [--variants ws_n128s2,...]
                                                   [--check ws_n128s2,wspp_n128s2 | ""]
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as A  # noqa: E402

from graphir.lowering.triton_gpu.kernels import flash_attention as fa  # noqa: E402
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc  # noqa: E402
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (  # noqa: E402
    flash_attention_wgmma)
from graphir.tools.attention_reference import ragged_problem, torch_reference  # noqa: E402
from graphir.tools.gpu_timing import rel_err  # noqa: E402

_V = lambda bn, st, ws=True, pingpong=False, lpt=False: dict(  # noqa: E731
    block_n=bn, stages=st, ws=ws, pingpong=pingpong, lpt=lpt)
# name: flash_attention_wgmma's keyword arguments
VARIANTS = {"n128s2": _V(128, 2, ws=False), "n64s3": _V(64, 3, ws=False),
            "n128s3": _V(128, 3, ws=False), "ws_n128s2": _V(128, 2), "ws_n128s3": _V(128, 3),
            "ws_n64s3": _V(64, 3), "ws_n64s4": _V(64, 4), "wspp_n128s2": _V(128, 2, pingpong=True),
            "wspp_n64s3": _V(64, 3, pingpong=True), "wslpt_n128s2": _V(128, 2, lpt=True),
            "wspplpt_n128s2": _V(128, 2, pingpong=True, lpt=True),
            "wslpt_n128s3": _V(128, 3, lpt=True),
            # the persistent configs (flash_attention_persistent.py; always longest-first)
            "wsp_n128s2": dict(config="m128n128w4s2tmawspersist"),
            "wsp_n128s3": dict(config="m128n128w4s3tmawspersist"),
            # the consumers' deeper pipeline (flash_attention_deep.py; head dim 64 only)
            "wsp_deep2": dict(config="m128n128w4s2tmawspersistdeep"),
            "wsp_deep3": dict(config="m128n128w4s3tmawspersistdeep"),
            # the persistent configs' tiles handed out at run time (DYN)
            "wspd_n128s2": dict(config="m128n128w4s2tmawspersistdyn"),
            "wspd_n128s3": dict(config="m128n128w4s3tmawspersistdyn"),
            "wspd_deep3": dict(config="m128n128w4s3tmawspersistdeepdyn"),
            # ... and the query rows brought by the loader warp (QTMA)
            "wspdq_n128s2": dict(config="m128n128w4s2tmawspersistdynqtma"),
            "wspdq_n128s3": dict(config="m128n128w4s3tmawspersistdynqtma"),
            "wspdq_deep3": dict(config="m128n128w4s3tmawspersistdeepdynqtma"),
            # ... and the key blocks pipelined across tiles (CHAIN)
            "wspdqc_n128s2": dict(config="m128n128w4s2tmawspersistdynqtmachain"),
            "wspdqc_n128s3": dict(config="m128n128w4s3tmawspersistdynqtmachain")}


def serves(kw, D) -> bool:
    """Whether a variant's config is valid at head dim D (DEEP configs take D <= 64)."""
    if "config" not in kw:
        return True
    try:
        fc.check_config(fc.get(kw["config"]), D)
        return True
    except ValueError:
        return False


def run_variant(q, offs, clen, lut, blocks, kw, **call):
    """One variant on torch tensors: a config through flash_attention (as the plan launches
    it), or flash_attention_wgmma's keyword arguments."""
    if "config" in kw:
        return fa.flash_attention(q, offs, clen, lut, blocks, 0, config=fc.get(kw["config"]),
                                  **call)
    return flash_attention_wgmma(q, offs, clen, lut, blocks, 0, **kw, **call)
ALL = ("NULL", "CAUSAL", "SLIDING_WINDOW_CAUSAL", "SLIDING_WINDOW_NONCAUSAL", "CHUNKED_CAUSAL")
CHECKS = [(128, torch.bfloat16, ALL), (128, torch.float16, ("CAUSAL",)),
          (64, torch.bfloat16, ("CAUSAL", "SLIDING_WINDOW_CAUSAL"))]
MASKS = [("NULL", 0), ("CAUSAL", 0), ("SLIDING_WINDOW_CAUSAL", 100),
         ("SLIDING_WINDOW_NONCAUSAL", 150), ("CHUNKED_CAUSAL", 128)]


def check_correctness(variants) -> list:
    rows = []
    for D, dtype, masks in CHECKS:
        if True:
            q, offs, clen, lut, blocks = ragged_problem(D, dtype)
            for mask, window in MASKS:
                if mask not in masks:
                    continue
                scale = D ** -0.5
                want = torch_reference(q, offs, clen, lut, blocks, mask, window, scale)
                for name in variants:
                    if not serves(VARIANTS[name], D):
                        continue
                    try:
                        got = run_variant(q, offs, clen, lut, blocks, VARIANTS[name],
                                          mask=mask, window=window)
                        torch.cuda.synchronize()
                        e_ref = rel_err(got, want)
                        ok = bool(e_ref < 1e-2 and torch.isfinite(got).all())
                    except Exception as e:  # noqa: BLE001
                        e_ref = float("nan")
                        ok = False
                        print(f"D{D} {dtype} {mask} {name}: {type(e).__name__}: {str(e)[-300:]}")
                    rows.append(dict(D=D, dtype=str(dtype), mask=mask, variant=name,
                                     rel_err_ref=e_ref, ok=ok))
                    print(f"check D{D} {str(dtype)[6:]:8} {mask:26} {name}: "
                          f"vs fp32 {e_ref:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    return rows


def speed(variants, only) -> list:
    A.set_allocator()
    rows = []
    for shape in A.SHAPES:
        name, B, S, D, mask, window = shape
        if only and name not in only:
            continue
        p = A.problem(shape)
        want, sdpa_ms, how, _ = A.reference(shape)
        row = {"shape": name, "sdpa_tflops": A.flops(shape) / sdpa_ms / 1e9, "sdpa": how}
        tag = A.default_tag(shape)
        cfg = next(c for c in fa.candidates(D, A.PAGE) if fa.config_tag(c) == tag)
        r = A.measure(shape, A.ours(shape, cfg), want)
        row["shipped"] = r.get("tflops", r.get("error"))
        row["shipped_rel_err"] = r.get("rel_err")
        lut, blocks = p["shuffled"]
        for v in variants:
            if not serves(VARIANTS[v], D):
                row[v] = "n/a"
                continue
            fn = (lambda kw=VARIANTS[v]: run_variant(
                p["q"], p["offs"], p["clen"], lut, blocks, kw, mask=mask, window=window,
                max_seq_len=S))
            try:
                r = A.measure(shape, fn, want)
                row[v] = r.get("tflops", r.get("error"))
                row[v + "_rel_err"] = r.get("rel_err")
            except Exception as e:  # noqa: BLE001
                row[v] = f"{type(e).__name__}: {str(e)[-200:]}"
        rows.append(row)
        best = max((row[v] for v in variants if isinstance(row[v], float)), default=0.0)
        print(f"speed {name:6} SDPA {row['sdpa_tflops']:6.1f} shipped "
              f"{row['shipped'] if isinstance(row['shipped'], str) else round(row['shipped'], 1)}"
              + "".join(f" {v} {row[v]:.1f}" if isinstance(row[v], float) else f" {v} {row[v]}"
                        for v in variants)
              + f" | best/SDPA {best / row['sdpa_tflops']:.2f}", flush=True)
    return rows


def main():
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    variants = args.get("--variants", "n128s3,ws_n128s2,ws_n64s3,wspp_n128s2,wspp_n64s3").split(",")
    only = set(args["--only"].split(",")) if "--only" in args else set()
    checked = [c for c in args.get("--check", "ws_n128s2,wspp_n128s2").split(",") if c]
    out = {"check": check_correctness(checked), "speed": speed(variants, only)}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention_wgmma.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)
    bad = [r for r in out["check"] if not r["ok"]]
    print(f"checks: {len(out['check']) - len(bad)} ok, {len(bad)} wrong")


if __name__ == "__main__":
    main()
