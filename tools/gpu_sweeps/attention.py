"""Prefill attention sweep on one GPU: the paged flash kernel's configs vs torch SDPA and vs the
round-1 kernel.

For each shape (bf16, NH 32 / NKV 8, page 128 in shuffled pages, one layer) it times torch SDPA on
contiguous K/V (the faster of enable_gqa=True and K/V expanded to NH heads; sliding window uses
SDPA causal as the rate reference, and times torch's flex_attention with the window's block
mask as the peer that computes the same thing), first what an untuned compile runs (the shipped
tuning table's choice for the shape's bucket; its row is marked "*"), then that choice and SDPA
again in alternation, five rounds each ("paired vs SDPA": the median and range of the
per-round ratios, which a clock or L2 state drifting during the sweep moves less than the one
ratio), the round-1 kernel as preserved (tools/gpu_sweeps/_attention_round1.py, the loop the
shipped kernel ports; run 4 of this sweep measured it correct on an H200 while the removed
overlapped loop was wrong) at m128n64w8s3tma+r128 and m128n128w8s2tma, then every other
candidate config of the shipped kernel, and the best candidate again with pages in order (the
paging cost). TFLOP/s count only the unmasked work. Every variant is checked against SDPA
before it is timed; a failing or non-compiling variant is reported, not timed. JIT compiles run
first in worker processes that fill Triton's on-disk cache, so the timed process finds them
compiled. ATTN_ONLY (a regex) keeps only the candidates it matches, ATTN_SHAPES (names,
comma-separated) only those shapes. A time budget (ATTN_BUDGET_S, 300 s after the start) skips
the candidates still left, never the shipped choice or the round-1 reference (nine shapes, up to
22 candidates each: run it as `SWEEP_LIMIT_S=420 bash tools/gpu_sweep.sh attention`; every
candidate took 338 s on an H200, 2026-12-05). Last, it writes the measured winners as the
tuner's table section (lowering/triton_gpu/tuning_defaults.json, family "prefill": per head dim
and mask, one config per bucket of batch x 128-row query tiles) to $OUT/prefill_table.json.

    python3 tools/gpu_sweeps/attention.py        (writes $OUT/attention.json when OUT is set)
    python3 tools/gpu_sweeps/attention.py --merge $OUT/prefill_table.json "run N"
                                                 (ships it: no GPU needed; --keys
                                                 "D=64,mask=CAUSAL;..." ships only those)
    python3 tools/gpu_sweeps/attention.py --dry-run   (CPU, Triton interpreter, tiny shapes:
                                                       checks the script's plumbing only)
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

if DRY:  # the interpreter's bf16 dot needs the test suite's patch
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    import tests.lowering.triton_gpu.conftest  # noqa: E402,F401

from graphir.lowering.triton_gpu.kernels import flash_attention as fa  # noqa: E402
from graphir.lowering.triton_gpu import tuning  # noqa: E402
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc  # noqa: E402
from graphir.lowering.triton_gpu.kernels import flash_attention_tuning as ft  # noqa: E402
from graphir.tools.gpu_timing import graph_ms, rel_err  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _attention_report import merge, prefill_table, print_tables  # noqa: E402
from _attention_round1 import round1_kernel  # noqa: E402

DEVICE = "cpu" if DRY else "cuda"
NH, NKV, PAGE = 32, 8, 128
# name, batch, seq, head dim, mask, window
SHAPES = [("c4k", 4, 4096, 128, "CAUSAL", 0), ("n4k", 4, 4096, 128, "NULL", 0),
          ("c16k", 1, 16384, 128, "CAUSAL", 0), ("c2k", 4, 2048, 128, "CAUSAL", 0),
          ("c1k", 1, 1024, 128, "CAUSAL", 0),
          ("w4k", 4, 4096, 128, "SLIDING_WINDOW_CAUSAL", 1024), ("c4k64", 4, 4096, 64, "CAUSAL", 0),
          # head dim 64 without a mask and at 16k too (the targets name both head dims)
          ("n4k64", 4, 4096, 64, "NULL", 0), ("c16k64", 1, 16384, 64, "CAUSAL", 0)]
# The round-1 kernel's best configs (its sweep: 0.63-0.83x SDPA), timed as the reference.
_R1 = {"BLOCK_M": 128, "num_warps": 8}
ROUND1 = [("r1:m128n64w8s3tmar128", dict(_R1, BLOCK_N=64, num_stages=3, USE_TMA=1), 128),
          ("r1:m128n128w8s2tma", dict(_R1, BLOCK_N=128, num_stages=2, USE_TMA=1), None)]
# ATTN_SHAPES=c4k64,n4k64 times only the named shapes (a shorter call for one head dim).
if os.environ.get("ATTN_SHAPES"):
    _want = os.environ["ATTN_SHAPES"].split(",")
    _unknown = sorted(set(_want) - {s[0] for s in SHAPES})
    if _unknown:
        raise SystemExit(f"ATTN_SHAPES: unknown shape(s) {_unknown}; known: "
                         f"{[s[0] for s in SHAPES]}")
    SHAPES = [s for s in SHAPES if s[0] in _want]
if DRY:
    NH, NKV = 4, 2
    SHAPES = [(n, 1, 256, d, m, min(w, 100)) for n, _, _, d, m, w in SHAPES]
TOL = 2e-2
BUDGET_S = float(os.environ.get("ATTN_BUDGET_S", "1e9" if DRY else "300"))
# ATTN_ONLY=REGEX times only the candidates whose tag matches (the shipped choice and round 1
# always): a shorter call when a few forms are compared. Its table then ranks only those.
ONLY = re.compile(os.environ.get("ATTN_ONLY", ""))
T0 = time.time()


def sync():
    if not DRY:
        torch.cuda.synchronize()


def time_ms(fn, calls: int, batches: int = 7) -> float:
    """Device ms per call (CUDA-graph replays); the dry run times one eager call."""
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return graph_ms(fn, calls=calls, batches=batches)


def set_allocator():
    """Device-side TMA descriptors live in Triton's global scratch."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device=DEVICE))


_PROBLEMS: dict = {}


def problem(shape):
    """Random q/K/V (fixed seed) and the same K/V in a paged cache: shuffled and in-order."""
    name, B, S, D, mask, window = shape
    if name in _PROBLEMS:
        return _PROBLEMS[name]
    _PROBLEMS.clear()
    g = torch.Generator(device=DEVICE).manual_seed(S + D)
    q = torch.randn(B * S, NH, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, NKV, S, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, NKV, S, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    per_seq = S // PAGE
    num_pages = B * per_seq + 1  # the last page pads the lookup table's spare column
    # [B, 2, NKV, S, D] -> one [2, PAGE, NKV, D] slab per (sequence, page of its tokens)
    kv = torch.stack([k, v], 1).view(B, 2, NKV, per_seq, PAGE, D).permute(0, 3, 1, 4, 2, 5)
    kv = kv.reshape(B * per_seq, 2, PAGE, NKV, D)
    caches = {}
    for how, lut in (("shuffled", torch.randperm(B * per_seq, device=DEVICE, generator=g)),
                     ("in_order", torch.arange(B * per_seq, device=DEVICE))):
        blocks = torch.empty(num_pages, 2, 1, PAGE, NKV, D, device=DEVICE, dtype=torch.bfloat16)
        blocks.normal_(generator=g)
        blocks[lut, :, 0] = kv
        lut = torch.cat([lut.view(B, per_seq), torch.full((B, 1), num_pages - 1, device=DEVICE)],
                        1).to(torch.int32).contiguous()
        caches[how] = (lut, blocks)
    del kv
    offs = torch.arange(0, B * S + 1, S, device=DEVICE, dtype=torch.int32)
    clen = torch.zeros(B, device=DEVICE, dtype=torch.int32)
    p = dict(q=q, k=k, v=v, offs=offs, clen=clen, **caches)
    _PROBLEMS[name] = p
    return p


def allowed_keys(S: int, mask: str, window: int) -> int:
    """Unmasked (query, key) pairs of one sequence and head."""
    i = torch.arange(S, dtype=torch.float64)
    if mask == "NULL":
        return S * S
    if mask == "CAUSAL":
        return int((i + 1).sum())
    return int(torch.minimum(i + 1, torch.full_like(i, window)).sum())


def flops(shape) -> float:
    _, B, S, D, mask, window = shape
    return 4.0 * D * NH * B * allowed_keys(S, mask, window)


def ours(shape, cfg, paging="shuffled"):
    """A callable running the current kernel with `cfg` (register cap included)."""
    name, B, S, D, mask, window = shape
    p = problem(shape)
    lut, blocks = p[paging]
    return lambda: fa.flash_attention(p["q"], p["offs"], p["clen"], lut, blocks, 0, mask=mask,
                                      window=window, max_seq_len=S, config=cfg)


def round1(shape, cfg, maxnreg):
    """A callable running the round-1 kernel (grid: query blocks, heads, sequences)."""
    name, B, S, D, mask, window = shape
    p = problem(shape)
    lut, blocks = p["shuffled"]
    out = torch.empty(B * S, NH * D, device=DEVICE, dtype=torch.bfloat16)
    # The round-1 kernel predates the soft-cap and the longest-first order.
    cx = {k: v for k, v in fa._constexprs(NH, NKV, D, PAGE, mask, cfg, True).items()
          if k not in ("SOFTCAP", "LPT")}
    grid = (triton.cdiv(S, cfg["BLOCK_M"]), NH, B)
    opts = {"maxnreg": maxnreg} if maxnreg else {}

    def run():
        round1_kernel[grid](
            p["q"], p["offs"], p["clen"], lut, blocks, out, lut.shape[1], 0, 1, blocks.shape[0],
            max(window, 1), D ** -0.5, **cx, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **opts)
        return out
    return run


def default_tag(shape) -> str:
    """config_tag of what a compile with no GPU to tune on runs for `shape`: the shipped
    tuning table's choice for its bucket, the built-in default where the table has none."""
    _, B, S, D, mask, window = shape
    facts = ft.make_facts("bf16", NH, NKV, D, PAGE, mask, window)
    bucket = tuning.family("prefill").bucket_of(B * triton.cdiv(S, ft.TILE))
    chosen = {c.bucket: c.config["name"] for c in tuning.select("prefill", facts)}
    return chosen.get(bucket) or fa.config_tag(fa.default_config(D, PAGE, mask))


def swept_configs(D: int) -> list[dict]:
    """The configs timed at head dim D: the tuner's candidates and the CHAIN configs (timed
    here before the tuner is offered them)."""
    return fa.candidates(D, PAGE) + [dict(c) for c in fc.CHAIN_CONFIGS.get(D, [])]


def variants(shape):
    """(name, factory) of every kernel variant timed on `shape` (factories build lazily): the
    shipped choice first, the round-1 reference, then the other candidates."""
    cands = swept_configs(shape[3])
    shipped = default_tag(shape)
    default = next(c for c in cands if fa.config_tag(c) == shipped)
    out = [(fa.config_tag(default), lambda: ours(shape, default))]
    out += [(tag, lambda cfg=cfg, reg=reg: round1(shape, cfg, reg)) for tag, cfg, reg in ROUND1]
    for cfg in cands:
        if cfg is not default and ONLY.search(fa.config_tag(cfg)):
            out.append((fa.config_tag(cfg), lambda cfg=cfg: ours(shape, cfg)))
    return out


def _warm(jobs):
    """Worker: compile (by running once) the variants named in `jobs` into Triton's cache."""
    set_allocator()
    errors = {}
    for si, vname in jobs:
        shape = SHAPES[si]
        try:
            dict(variants(shape))[vname]()()
        except Exception as e:  # noqa: BLE001  (reported by the main process when it reruns)
            errors[f"{shape[0]}/{vname}"] = str(e)[-300:]
    sync()
    return errors


def precompile(workers: int = 12) -> dict:
    """Run every variant once in `workers` spawned processes; one kernel binary (mask, head
    dim, variant) goes to one worker, so no two workers compile the same thing."""
    groups: dict = {}
    for si, shape in enumerate(SHAPES):
        for vname, _ in variants(shape):
            groups.setdefault((shape[3], shape[4], vname), []).append((si, vname))
    chunks = [[] for _ in range(workers)]
    for i, jobs in enumerate(groups.values()):
        chunks[i % workers].extend(jobs)
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            errs = {}
            for e in ex.map(_warm, [c for c in chunks if c]):
                errs.update(e)
            return errs
    except Exception as e:  # noqa: BLE001  (compiles then happen in this process)
        return {"precompile": str(e)[-300:]}


def reference(shape):
    """(SDPA output in our [T, NH*D] layout, the SDPA rate reference in ms, which form gave it,
    every form's ms, the call of that form)."""
    name, B, S, D, mask, window = shape
    p = problem(shape)
    q4 = p["q"].view(B, S, NH, D).transpose(1, 2)
    k, v = p["k"], p["v"]
    kx, vx = (t.repeat_interleave(NH // NKV, dim=1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    causal = mask != "NULL"
    timed = {}
    # (Both kept: the paired timing re-runs the faster; K/V expanded stay alive for it.)
    fns = {"gqa": lambda: sdpa(q4, k, v, is_causal=causal, enable_gqa=True),
           "expanded": lambda: sdpa(q4, kx, vx, is_causal=causal)}
    for how, fn in fns.items():
        try:
            fn()
            timed[how] = time_ms(fn, calls_for(flops(shape) / 600e12 * 1e3))
        except Exception as e:  # noqa: BLE001
            timed[how] = float("inf")
            print(f"{name}: SDPA {how} failed: {str(e)[-200:]}")
    if mask == "SLIDING_WINDOW_CAUSAL":
        i = torch.arange(S, device=DEVICE)
        am = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        want = sdpa(q4, kx, vx, attn_mask=am)
    else:
        want = sdpa(q4, kx, vx, is_causal=causal)
    want = want.transpose(1, 2).reshape(B * S, NH * D)
    best = min(timed, key=timed.get)
    return want, timed[best], best, timed, fns[best]


def flex_peer(shape, want) -> dict:
    """torch's own sliding-window attention, the window's strongest peer a torch user has
    (SDPA has no window; an explicit mask runs its slow path): flex_attention compiled
    (torch.compile's default mode) with a block mask of the window, GQA native, on the same
    contiguous q / K / V as SDPA; checked against `want`, then timed like SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    name, B, S, D, mask, window = shape
    p = problem(shape)
    q4 = p["q"].view(B, S, NH, D).transpose(1, 2).contiguous()

    def in_window(b, h, qi, ki):
        return (ki <= qi) & (qi - ki < window)
    try:
        bm = create_block_mask(in_window, B=None, H=None, Q_LEN=S, KV_LEN=S, device=DEVICE)
        flex = torch.compile(flex_attention, dynamic=False)
        fn = lambda: flex(q4, p["k"], p["v"], block_mask=bm, enable_gqa=True)  # noqa: E731
        got = fn().transpose(1, 2).reshape(B * S, NH * D)
        err = rel_err(got, want)
        if not err < TOL:
            return {"rel_err": err, "error": f"rel err {err:.3g} >= {TOL}"}
        ms = timed_ms(shape, fn)
        return {"rel_err": err, "ms": ms, "tflops": flops(shape) / ms / 1e9}
    except Exception as e:  # noqa: BLE001  (a peer failing is reported, not fatal)
        return {"error": f"{type(e).__name__}: {str(e)[-300:]}"}


PAIRED_ROUNDS = 5


def paired(shape, peer_fn, ours_fn) -> dict:
    """The shipped kernel against the SDPA peer timed in alternation (peer, ours, peer, ...;
    PAIRED_ROUNDS each): the median and range of the per-round ratios, so a clock or L2 state
    that drifts during the sweep moves both sides of each ratio alike."""
    ratios = []
    for _ in range(PAIRED_ROUNDS):
        peer_ms = timed_ms(shape, peer_fn)
        ratios.append(peer_ms / timed_ms(shape, ours_fn))
    ratios.sort()
    return {"median": ratios[len(ratios) // 2], "min": ratios[0], "max": ratios[-1],
            "rounds": PAIRED_ROUNDS}


def calls_for(est_ms: float) -> int:
    return max(2, min(40, int(40 / max(est_ms, 1e-3))))


def timed_ms(shape, fn) -> float:
    """Device ms of one call of fn at `shape` (its calls a batch sized for ~300 TFLOP/s)."""
    return time_ms(fn, calls_for(flops(shape) / 300e12 * 1e3), batches=5)


def measure(shape, fn, want):
    got = fn()
    sync()
    err = rel_err(got, want)
    if not err < TOL:
        return {"rel_err": err, "error": f"rel err {err:.3g} >= {TOL}"}
    ms = timed_ms(shape, fn)
    return {"rel_err": err, "ms": ms, "tflops": flops(shape) / ms / 1e9}


def main():
    set_allocator()
    print("device", "cpu (dry run)" if DRY else torch.cuda.get_device_name(0), "torch",
          torch.__version__, "triton", triton.__version__, flush=True)
    t = time.time()
    # --dry-run --precompile exercises the worker pool on the CPU too.
    warm_errors = precompile(2) if "--precompile" in sys.argv else {} if DRY else precompile()
    print(f"precompile {time.time() - t:.1f}s errors={len(warm_errors)}", flush=True)
    results = {"warm_errors": warm_errors, "shapes": {}}
    for shape in SHAPES:
        name = shape[0]
        res = results["shapes"][name] = {"shape": list(shape[1:]), "flops": flops(shape),
                                         "default": default_tag(shape), "variants": {}}
        want, ref_ms, how, timed, peer_fn = reference(shape)
        window = shape[4] == "SLIDING_WINDOW_CAUSAL"
        # The window's rate reference: SDPA causal, same batch and sequence.
        peer_flops = flops(shape[:4] + ("CAUSAL", 0)) if window else res["flops"]
        res["sdpa"] = {"ms": ref_ms, "how": how + (" causal" if window else ""),
                       "tflops": peer_flops / ref_ms / 1e9, "all": timed}
        print(f"{name}: SDPA {how} {res['sdpa']['tflops']:.0f} TF/s", flush=True)
        if window:
            f = res["flex"] = flex_peer(shape, want)
            print(f"{name}: flex_attention " + (f"{f['tflops']:.0f} TF/s err {f['rel_err']:.1e}"
                                                 if "ms" in f else f["error"]), flush=True)
        for vname, make in variants(shape):
            keep = vname == res["default"] or vname.startswith("r1:")
            if time.time() - T0 > BUDGET_S and not keep:
                res["variants"][vname] = {"error": "skipped: time budget"}
                continue
            try:
                fn = make()
                r = measure(shape, fn, want)
            except Exception as e:  # noqa: BLE001  (one variant failing must not stop the rest)
                r = {"error": f"{type(e).__name__}: {str(e)[-300:]}"}
            if vname == res["default"] and "ms" in r:
                # Per-round ratios of ms, as TFLOP/s ratios (the window's peer is SDPA causal).
                scale = res["flops"] / peer_flops
                res["paired"] = {k: v * scale if k != "rounds" else v
                                 for k, v in paired(shape, peer_fn, fn).items()}
            res["variants"][vname] = r
            print(f"  {name} {vname}: " + (f"{r['tflops']:.0f} TF/s err {r['rel_err']:.1e}"
                                          if "ms" in r else r["error"]), flush=True)
        ok = {k: v for k, v in res["variants"].items() if "ms" in v and not k.startswith("r1:")}
        if ok:
            best = max(ok, key=lambda k: ok[k]["tflops"])
            cfg = next(c for c in swept_configs(shape[3]) if fa.config_tag(c) == best)
            try:
                res["in_order"] = dict(measure(shape, ours(shape, cfg, "in_order"), want),
                                       config=best)
            except Exception as e:  # noqa: BLE001
                res["in_order"] = {"error": str(e)[-300:], "config": best}
            res["best"] = best
        del want
        if not DRY:
            torch.cuda.empty_cache()
    results["elapsed_s"] = time.time() - T0
    results["prefill_table"] = prefill_table(
        results, SHAPES, "cpu (dry run)" if DRY else torch.cuda.get_device_name(0))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(os.environ["OUT"], "prefill_table.json"), "w") as f:
            json.dump(results["prefill_table"], f, indent=1)
    print_tables(results, SHAPES)
    print(roofline(results))


def roofline(results) -> str:
    """A roofline chart of each shape's shipped default and SDPA (bytes: q, K, V read once and
    the output written) under the measured copy bandwidth and cuBLAS rate; $OUT or here."""
    from graphir.tools.gpu_timing import copy_gbs, gemm_tflops
    from graphir.tools.roofline import Point, write_chart

    pts = []
    for name, B, S, D, mask, _ in SHAPES:
        s = results["shapes"].get(name, {})
        nbytes = 2 * B * S * D * (2 * NH + 2 * NKV)
        d = s.get("variants", {}).get(s.get("default"), {})
        if "ms" in d:
            pts.append(Point(name, s["flops"], nbytes, d["ms"] / 1e3))
        if "ms" in s.get("sdpa", {}) and mask != "SLIDING_WINDOW_CAUSAL":
            pts.append(Point(f"{name} SDPA", s["flops"], nbytes, s["sdpa"]["ms"] / 1e3,
                             ours=False))
    # The dry run has no GPU to measure: a nominal roof, so only the plumbing is checked.
    bw, peak = (1e9, 1e10) if DRY else (copy_gbs() * 1e9, gemm_tflops() * 1e12)
    return write_chart(pts, bw, peak, os.path.join(os.environ.get("OUT", "."),
                                                   "roofline_prefill.png"),
                       f"prefill attention kernel, {results['prefill_table']['device']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        args, keys = sys.argv[:], None
        if "--keys" in args:
            i = args.index("--keys")
            keys = args[i + 1].split(";")
            del args[i:i + 2]
        sys.exit(merge(args[2], args[3] if len(args) > 3 else "a GPU run", keys))
    sys.exit(main())
