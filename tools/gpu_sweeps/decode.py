"""Paged decode attention sweep on one GPU: the decode kernel's tuning candidates vs torch SDPA on a
contiguous cache, in bytes of K/V read per second, the tuning table that implies, and an
end-to-end `compile --tune` of a decode layer checked against torch.

For each shape (bf16, head dim 128, one cache layer, K/V in shuffled pages) it times torch SDPA on
the contiguous cache [B, NKV, ctx, D] (the faster of enable_gqa=True and K/V expanded to NH heads;
bottom-right causal among the new tokens when there are several), then every candidate the tuner
would time for the shape's bucket (paged_decode_tuning.candidates: the plan's query tile for the
shape's new tokens, resolved for the page size, duplicates dropped), launched as the plan launches
it (the split rule; the reduce when it splits, unless the config merges its own partitions),
plus a few forced partition counts: half and twice the default's, and one partition for the
multi-head configs the rule splits (/p<n>). Every
variant, SDPA included, is first checked against a float32 reference on the same cache (rel err);
one that fails or does not compile is reported, not timed.

Kernels are compiled offline in worker processes (tuning_gpu.compile_specs, as `--tune` does) and
launched through graphir.runtime.cuda (the serving path, Triton's global scratch included) on
torch's stream, so tools/gpu_timing.graph_ms captures them in CUDA graphs like the peer. Inputs
rotate among copies larger than the L2 cache.

With $OUT set it writes $OUT/decode.json (every timing) and $OUT/decode_tuning_defaults.json: per
bucket the candidate with the best geometric-mean ratio to SDPA over the shapes in it (at most
four kernels; buckets no shape covers keep the shipped choice), page-16 and few-token shapes as
exact-shape entries. Shipping it (no GPU needed):
    python3 tools/gpu_sweeps/decode.py --merge $OUT/decode_tuning_defaults.json "run N"

    python3 tools/gpu_sweeps/decode.py             (or: bash tools/gpu_sweep.sh decode)
    python3 tools/gpu_sweeps/decode.py --dry-run   (CPU, Triton interpreter, tiny shapes: checks
                                                    the script's plumbing and numerics only)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dry import DRY  # noqa: E402  (first: --dry-run sets Triton's interpreter up)

from graphir.lowering.triton_gpu import tuning  # noqa: E402
from graphir.lowering.triton_gpu.kernels import paged_decode as pd  # noqa: E402
from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg  # noqa: E402
from graphir.lowering.triton_gpu.kernels import paged_decode_tuning as pdt  # noqa: E402
from graphir.lowering.triton_gpu.kernels.spec import cdiv  # noqa: E402
from graphir.lowering.triton_gpu.lowerings.base import spec_key  # noqa: E402

D, BUCKET, TOL = 128, pdt.KV_BUCKET, 2e-2
# name, batch, context (cached + new tokens), page, new tokens per sequence, query heads, KV
# heads; at least one shape per bucket of units = batch x KV heads and context.
SHAPES = [("B1x1024", 1, 1024, 128, 1, 32, 8), ("B1x4096", 1, 4096, 128, 1, 32, 8),
          ("B1x4096g8", 1, 4096, 128, 1, 64, 8),
          ("B8x1024", 8, 1024, 128, 1, 32, 8), ("B8x32768", 8, 32768, 128, 1, 32, 8),
          ("B32x2048", 32, 2048, 128, 1, 32, 8), ("B16x16384", 16, 16384, 128, 1, 32, 8),
          ("B32x8192g8", 32, 8192, 128, 1, 64, 8), ("B128x1024", 128, 1024, 128, 1, 32, 8),
          ("B64x4096", 64, 4096, 128, 1, 32, 8), ("B64x4096p16", 64, 4096, 16, 1, 32, 8),
          ("B256x512", 256, 512, 128, 1, 32, 8), ("B64x4096q4", 64, 4096, 128, 4, 32, 8)]
if DRY:
    SHAPES = [("dry_p128", 3, 300, 128, 1, 8, 2), ("dry_p16q4", 2, 200, 16, 4, 16, 2)]
    D = 32
# DECODE_SHAPES=B1x1024,B1x4096 keeps the named shapes (and skips the end-to-end --tune check),
# e.g. to time them with and without PDL (GRAPHIR_PDL=0) in two quick calls.
_ONLY = [n for n in os.environ.get("DECODE_SHAPES", "").split(",") if n]
if _ONLY:
    SHAPES = [s for s in SHAPES if s[0] in _ONLY]
BUDGET_S = float(os.environ.get("DECODE_BUDGET_S", "1e9" if DRY else "75"))
LIMIT_S = 140    # tools/gpu_sweep.sh kills a sweep at 150 s (SWEEP_LIMIT_S)
MAX_KERNELS = 4  # decode kernels the one-token tile of the emitted table may use
T0 = time.time()


def tile_of(shape) -> int:
    """The plan's query tile (q_per_seq) for the shape's new tokens."""
    _, _, _, _, q_len, nh, nkv = shape
    return next(q for q in cfg.q_tiles(nh, nkv) if q >= q_len)


def facts_of(shape) -> dict:
    _, _, _, page, _, nh, nkv = shape
    return pdt.make_facts("bf16", nh, nkv, D, page, tile_of(shape), "CAUSAL")


def bucket_of(shape) -> str:
    _, B, ctx, _, _, _, nkv = shape
    return pdt.bucket_of(B * nkv, cdiv(ctx, BUCKET) * BUCKET)


def variants_for(shape):
    """[(label, resolved config, forced num_parts or None)]; the default is the first."""
    _, B, ctx, _, _, _, nkv = shape
    kvb = cdiv(ctx, BUCKET) * BUCKET
    cands = pdt.candidates(bucket_of(shape), facts_of(shape))
    out = [(c["name"], c, None) for c in cands]
    n = cfg.split(B, nkv, kvb, cands[0])[0]
    out += [(f"{cands[0]['name']}/p{f}", cands[0], f)
            for f in sorted({max(1, n // 2), 2 * n} - {n})]
    out += [(f"{c['name']}/p1", c, 1) for c in cands
            if c["HEADS"] > 1 and cfg.split(B, nkv, kvb, c)[0] > 1 and B * nkv // c["HEADS"] >= 64]
    return out


def specs_of(shape, conf):
    _, _, _, page, _, nh, nkv = shape
    return pd.aot_specs(nh, nkv, D, page, "bfloat16", "CAUSAL", tile_of(shape), config=conf)


class Launcher:
    """One kernel: the offline cubin through graphir.runtime.cuda on torch's current stream, or
    (dry run) the Triton interpreter."""

    def __init__(self, spec, compiled):
        self.spec, self.kernel = spec, None
        if compiled is not None:
            from graphir.runtime.cuda.kernel import Kernel
            self.kernel = Kernel.from_cubin(compiled.cubin, compiled.launch_metadata())

    def __call__(self, grid, *args):
        import torch
        if self.kernel is None:
            self.spec.fn[grid](*args, **self.spec.constexprs, num_warps=self.spec.num_warps,
                               num_stages=self.spec.num_stages)
        else:
            self.kernel.launch(grid, *args, stream=torch.cuda.current_stream().cuda_stream)


def reference(shape, prob):
    """float32 attention on copy 0 of the contiguous cache: [B * q_len, NH * D]."""
    import torch
    _, B, ctx, _, q_len, nh, nkv = shape
    s = prob["sets"][0]
    g = nh // nkv
    q = s["q"].float().reshape(B, nkv, g * q_len, D)
    sc = q @ s["k"].float().transpose(-1, -2) * D ** -0.5
    pos = ctx - q_len + torch.arange(q_len, device=q.device).repeat(g)
    sc = sc.masked_fill(torch.arange(ctx, device=q.device)[None, :] > pos[:, None], -torch.inf)
    o = torch.softmax(sc, -1) @ s["v"].float()
    return o.reshape(B, nh, q_len, D).permute(0, 2, 1, 3).reshape(B * q_len, nh * D)


def make_problem(shape, dev, copies):
    """Contiguous K/V copies for SDPA and the same data in shuffled pages for the kernels; the
    unused slots of each last page hold NaN (a kernel that reads them fails the check)."""
    import torch
    _, B, ctx, page, q_len, nh, nkv = shape
    npg = cdiv(ctx, page)
    num_pages = B * npg + 1
    g = torch.Generator(device="cpu").manual_seed(0)
    lut = torch.randperm(num_pages - 1, generator=g)[:B * npg].view(B, npg).to(torch.int32)
    lut = torch.cat([lut, torch.full((B, 1), num_pages - 1, dtype=torch.int32)], 1).to(dev)
    cache_len = torch.full((B,), ctx - q_len, dtype=torch.int32, device=dev)
    offs = (torch.arange(B + 1, dtype=torch.int32, device=dev) * q_len)
    sets = []
    for _ in range(copies):
        k, v = (torch.randn(B, nkv, ctx, D, device=dev).to(torch.bfloat16) for _ in range(2))
        blocks = torch.full((num_pages, 2, 1, page, nkv, D), float("nan"), device=dev,
                            dtype=torch.bfloat16)
        last = lut[:, npg - 1].long()
        for kv, t in enumerate((k, v)):
            t = torch.nn.functional.pad(t, (0, 0, 0, npg * page - ctx))
            rows = t.permute(0, 2, 1, 3).reshape(B * npg, page, nkv, D)
            blocks[lut[:, :npg].reshape(-1).long(), kv, 0] = rows
        blocks[last, :, 0, ctx - (npg - 1) * page:] = float("nan")  # never read
        q = torch.randn(B, nh, q_len, D, device=dev).to(torch.bfloat16)
        sets.append(dict(k=k, v=v, blocks=blocks, q=q,
                         q_rows=q.permute(0, 2, 1, 3).reshape(B * q_len, nh, D).contiguous()))
    return dict(lut=lut, cache_len=cache_len, offs=offs, sets=sets, num_pages=num_pages)


def sdpa_fns(shape, prob):
    import torch
    import torch.nn.functional as F
    _, B, ctx, _, q_len, nh, nkv = shape
    mask = None
    if q_len > 1:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(q_len, ctx)
    sdpa = F.scaled_dot_product_attention
    out = {"sdpa_gqa": [(lambda s: lambda: sdpa(s["q"], s["k"], s["v"], attn_mask=mask,
                                                enable_gqa=True))(s) for s in prob["sets"]]}
    exp = []
    for s in prob["sets"]:
        ke, ve = (t.repeat_interleave(nh // nkv, dim=1) for t in (s["k"], s["v"]))
        exp.append((lambda s, ke, ve: lambda: sdpa(s["q"], ke, ve, attn_mask=mask))(s, ke, ve))
    out["sdpa_expanded"] = exp
    if q_len > 1:  # in case the lower-right causal bias is refused: an explicit mask
        dev = prob["lut"].device
        keep = torch.arange(ctx, device=dev)[None, :] <= \
            (ctx - q_len + torch.arange(q_len, device=dev))[:, None]
        out["sdpa_gqa_boolmask"] = [(lambda s: lambda: sdpa(
            s["q"], s["k"], s["v"], attn_mask=keep, enable_gqa=True))(s) for s in prob["sets"]]
    return out


def kernel_fns(shape, prob, conf, forced, launchers):
    """One callable per input copy (the plan's launches), the output and the partitions."""
    import torch
    _, B, ctx, _, q_len, nh, nkv = shape
    kvb = cdiv(ctx, BUCKET) * BUCKET
    T = B * q_len
    main, red = launchers
    nparts, part = cfg.split(B, nkv, kvb, conf)
    if forced:
        part = cdiv(cdiv(kvb, forced), conf["BLOCK_N"]) * conf["BLOCK_N"]
        nparts = cdiv(kvb, part)
    dev = prob["lut"].device
    out = torch.empty(T, nh * D, device=dev, dtype=torch.bfloat16)
    o_part = torch.empty(T * nh * nparts * D, device=dev, dtype=torch.float32)
    ml_part = torch.empty(T * nh * nparts * 2, device=dev, dtype=torch.float32)
    count = torch.zeros(B * nkv, device=dev, dtype=torch.int32)  # left zero by each launch
    grid = (B * (nkv // conf["HEADS"]) * nparts, 1, 1)
    fns = []
    for s in prob["sets"]:
        head = (s["q_rows"], prob["offs"], prob["cache_len"], prob["lut"], s["blocks"], out)
        tail = (prob["lut"].shape[1], 0, 1, prob["num_pages"], 1, D ** -0.5, part, nparts)
        if nparts == 1:
            null = o_part if DRY else None  # the interpreter wants a tensor
            fns.append(lambda head=head, tail=tail: main(grid, *head, null, null, null, *tail))
        elif conf["MERGE"]:
            fns.append(lambda head=head, tail=tail: main(grid, *head, o_part, ml_part, count,
                                                         *tail))
        else:
            def f(head=head, tail=tail):
                main(grid, *head, o_part, ml_part, count, *tail)
                red((T * nh, 1, 1), o_part, ml_part, out, nparts)
            fns.append(f)
    return fns, out, nparts


def time_shape(shape, compiled) -> dict:
    import torch
    from graphir.tools.gpu_timing import copies_to_beat_l2, graph_ms, rel_err
    name, B, ctx, page, q_len, nh, nkv = shape
    kv_bytes = B * ctx * nkv * D * 2 * 2
    copies = 1 if DRY else copies_to_beat_l2(kv_bytes)
    prob = make_problem(shape, "cpu" if DRY else "cuda", copies)
    ref = reference(shape, prob)
    rows = {}
    for label, fns in sdpa_fns(shape, prob).items():
        try:
            got = fns[0]().permute(0, 2, 1, 3).reshape(B * q_len, nh * D)
            rows[label] = dict(err=rel_err(got.float(), ref))
            if not DRY:
                rows[label]["ms"] = graph_ms(fns)
        except Exception as e:  # noqa: BLE001
            rows[label] = dict(error=repr(e)[:300])
    peer = min((r["ms"] for r in rows.values() if "ms" in r), default=float("nan"))
    for label, conf, forced in variants_for(shape):
        if time.time() - T0 > BUDGET_S:
            rows[label] = dict(error="skipped (budget)")
            continue
        specs = specs_of(shape, conf)
        comp = [compiled.get(spec_key(s)) for s in specs]
        bad = next((c for c in comp if isinstance(c, Exception)), None)
        if bad is not None:
            rows[label] = dict(error=f"compile: {type(bad).__name__}: {bad}"[:200])
            continue
        try:
            launchers = [Launcher(sp, c) for sp, c in zip(specs, comp)]
            fns, out, nparts = kernel_fns(shape, prob, conf, forced, launchers)
            fns[0]()
            err = rel_err(out.float(), ref)
            info = dict(err=err, parts=nparts, config=cfg.public(conf), forced=forced)
            if not err < TOL:
                info["error"] = f"rel err {err:.2e}"
            elif not DRY:
                info["ms"] = graph_ms(fns)
            rows[label] = info
        except Exception as e:  # noqa: BLE001
            rows[label] = dict(error=repr(e)[:300])
    for r in rows.values():
        if "ms" in r:
            r["tbs"] = kv_bytes / r["ms"] / 1e9
            r["vs_sdpa"] = peer / r["ms"]
    del prob
    if not DRY:
        torch.cuda.empty_cache()
    return dict(shape=name, batch=B, ctx=ctx, page=page, q_len=q_len, nh=nh, nkv=nkv,
                bucket=bucket_of(shape), shape_key=pdt.shape_key(facts_of(shape)),
                kv_bytes=kv_bytes, copies=copies, peer_ms=peer, rows=rows)


def main():
    from graphir.lowering.triton_gpu.tuning_gpu import compile_specs
    specs = {}
    for shape in SHAPES:
        for _, conf, forced in variants_for(shape):
            specs.update({spec_key(s): s for s in specs_of(shape, conf)})
    compiled = {} if DRY else compile_specs(specs, 90)
    print(f"compiled {len(specs)} kernels in {time.time() - T0:.0f}s", flush=True)
    results = []
    for shape in SHAPES:
        if time.time() - T0 > BUDGET_S:
            print(f"{shape[0]}: skipped (budget)")
            continue
        results.append(time_shape(shape, compiled))
        print(f"{shape[0]}: done at {time.time() - T0:.0f}s", flush=True)
    print_tables(results)
    suggested = suggested_table(results)
    write(results, suggested, None)  # before the end-to-end check, in case it runs out of time
    print("suggested decode table ('*', bf16): " + json.dumps(
        suggested["families"]["decode"]["bf16"].get("*", {})), flush=True)
    e2e = ({"skipped": "dry run"} if DRY else {"skipped": "DECODE_SHAPES"} if _ONLY
           else end_to_end())
    write(results, suggested, e2e)
    print(f"end-to-end compile --tune + run: {json.dumps(e2e)}"[:1500])
    print_tables(results)


def write(results, suggested, e2e) -> None:
    if not os.environ.get("OUT"):
        return
    with open(os.path.join(os.environ["OUT"], "decode.json"), "w") as f:
        json.dump(dict(shapes=results, candidates=cfg.CANDIDATES, end_to_end_tune=e2e), f,
                  indent=1, default=str)
    with open(os.path.join(os.environ["OUT"], "decode_tuning_defaults.json"), "w") as f:
        json.dump(suggested, f, indent=1)


def print_tables(results):
    from graphir.tools.gpu_timing import table
    labels = sorted({k for r in results for k in r["rows"] if DRY or not k.startswith("sdpa")},
                    key=lambda k: (k.startswith("sdpa"), "/" in k, k))
    grid = []
    for lbl in labels:
        cells = []
        for r in results:
            x = r["rows"].get(lbl)
            cells.append("-" if x is None else f"{x['vs_sdpa']:.3f}" if "ms" in x else
                         f"e{x['err']:.0e}" if DRY and "error" not in x else "ERR")
        grid.append([lbl] + cells)
    errs = [f"{r['shape']}/{k}: {x['error'][:100]}" for r in results for k, x in r["rows"].items()
            if "error" in x]
    if errs:
        print(f"{len(errs)} errors, first:\n  " + "\n  ".join(errs[:3]))
    print("ratio to the faster SDPA (same K/V bytes), variant x shape:")
    print(table(grid, ["variant"] + [r["shape"] for r in results]))
    summary = []
    for r in results:
        rows = r["rows"]
        ok = [k for k, x in rows.items() if "ms" in x and not k.startswith("sdpa")]
        best = min(ok, key=lambda k: rows[k]["ms"]) if ok else None
        dflt = next((k for k in rows if not k.startswith("sdpa")), None)
        cell = lambda k: "-" if k is None or "ms" not in rows[k] else \
            f"{k} {rows[k]['tbs']:.2f}/{rows[k]['vs_sdpa']:.3f}x p{rows[k]['parts']}"  # noqa
        peer = r["kv_bytes"] / r["peer_ms"] / 1e9 if r["peer_ms"] == r["peer_ms"] else 0
        summary.append([r["shape"], r["bucket"], f"{peer:.2f}", cell(dflt), cell(best)])
    print(f"total {time.time() - T0:.0f}s. K/V read TB/s / ratio to SDPA / partitions:")
    print(table(summary, ["shape", "bucket", "sdpa", "default", "best"]))


# -- the tuning table these timings imply ---------------------------------------------------
def suggested_table(results) -> dict:
    """The shipped decode table with what this sweep measured replaced: '*' (one-token tiles,
    pages of 32 or more): per bucket the config with the best geometric mean ratio over the
    bucket's shapes, then at most MAX_KERNELS kernels (limit_kernels on
    those means); other shapes (pages of 16, several new tokens) as exact-shape entries."""
    shipped = tuning.load_table()["families"].get("decode", {}).get("bf16", {})
    # Everything shipped stays unless this sweep re-measured it (a DECODE_SHAPES run covers a
    # few buckets; its merge must not drop the exact-shape entries it did not time).
    fam = json.loads(json.dumps(shipped))
    fam.setdefault("*", {})
    generic = lambda r: r["q_len"] == 1 and r["page"] >= 32  # noqa: E731
    choices = []
    for bucket, _ in pdt.BUCKETS:
        rs = [r for r in results if r["bucket"] == bucket and generic(r)]
        score = geo_scores(rs)
        if score:
            cands = [{"config": n, "ms": round(math.exp(s / len(rs)), 6), "rel_err": 0.0}
                     for n, s in score.items()]
            choices.append(tuning.Choice(bucket, cfg.get(min(score, key=score.get)),
                                         "sweep", candidates=cands))
    facts = pdt.make_facts("bf16", 32, 8, D, 128, 1, "CAUSAL")
    pdt.limit_kernels(choices, MAX_KERNELS, facts)
    fam["*"].update({ch.bucket: ch.config["name"] for ch in choices})
    # An exact-shape entry of a generic shape this sweep re-measured would shadow its new '*'
    # choice (the table lookup tries the shape's own key first): drop it.
    for r in results:
        if generic(r) and r["bucket"] in {ch.bucket for ch in choices}:
            fam.get(r["shape_key"], {}).pop(r["bucket"], None)
    fam = {k: v for k, v in fam.items() if v}
    for r in results:
        if not generic(r):
            score = geo_scores([r])
            if score:
                fam.setdefault(r["shape_key"], {})[r["bucket"]] = min(score, key=score.get)
    dev = "dry run" if DRY else __import__("torch").cuda.get_device_name(0)
    note = (f"From tools/gpu_sweeps/decode.py on {dev}: bf16 timings vs SDPA, used for fp16 "
            "and fp32 ('*' only).")
    return {"version": 1, "device": dev, "provenance": {"decode": note}, "note": note,
            "families": {"decode": {"bf16": fam, "fp16": json.loads(json.dumps(fam)),
                                    "fp32": {"*": dict(fam["*"])}}}}


def geo_scores(rs) -> dict:
    """{config: sum of log(ms / SDPA ms)} over configs timed (unforced) on every shape."""
    names = None
    for r in rs:
        ok = {x["config"]["name"] for k, x in r["rows"].items()
              if "ms" in x and not x.get("forced") and not k.startswith("sdpa")}
        names = ok if names is None else names & ok
    return {n: sum(math.log(next(x["ms"] for x in r["rows"].values() if "ms" in x
                                  and not x.get("forced") and x.get("config", {}).get("name")
                                  == n) / r["peer_ms"]) for r in rs)
            for n in sorted(names or ())}


def merge(measured_path: str, run: str) -> None:
    """Replace the decode family of the shipped tuning table with a sweep's measured one."""
    from pathlib import Path
    measured = json.loads(Path(measured_path).read_text())
    tuning.validate_table(measured, measured_path)
    shipped = json.loads(tuning.DEFAULTS_PATH.read_text())
    shipped.setdefault("provenance", {})["decode"] = (
        f"Measured: {run} of " + measured.get("provenance", {}).get("decode", "decode.py"))
    shipped["families"]["decode"] = measured["families"]["decode"]
    tuning.validate_table(shipped)
    tuning.DEFAULTS_PATH.write_text(json.dumps(shipped, indent=1) + "\n")
    print(f"merged {measured_path} into {tuning.DEFAULTS_PATH}")


# -- compile --tune, end to end ---------------------------------------------------------------
E2E = [("e2e_B1x1000", 1, 1000, 128, 1, 32, 8), ("e2e_B4x5000", 4, 5000, 128, 1, 32, 8),
       ("e2e_B40x600", 40, 600, 128, 1, 32, 8), ("e2e_B24x3000q3", 24, 3000, 128, 3, 32, 8)]


def end_to_end() -> dict:
    """compile_graph(decode attention layer, options={"tune": True}) on this GPU, load the
    artifact with graphir's runtime and run steps in several buckets (and a 3-token tile)
    against the float32 reference, each twice (the second replays the captured CUDA graph)."""
    import signal
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    from graphir import BufferType, DType, Graph, TensorType, ops
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda.device_model import load
    from graphir.tools.gpu_timing import rel_err

    left = int(LIMIT_S - (time.time() - T0))
    if left < 30:
        return {"skipped": f"only {left} s left"}

    def expire(*_):
        raise TimeoutError(f"end-to-end check over its {left} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(left)
    nh, nkv, page = 32, 8, 128
    out: dict = {"rel_err": {}}
    try:
        bf, u32 = DType.bfloat16, DType.uint32
        types = [TensorType(bf, ["t", nh * D]), BufferType(bf, ["p", 2, 1, page, nkv, D]),
                 TensorType(u32, ["b + 1"]), TensorType(u32, ["b"]), TensorType(u32, ["b", "m"])]
        with Graph("decode_tuned", input_types=types) as g:
            g.output(ops.flash_attention_ragged(*g.inputs, n_heads=nh, n_kv_heads=nkv,
                                                head_dim=D, layer_idx=0, mask_variant="causal"))
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            art = compile_graph(g, "cuda:sm_90", out=Path(tmp) / "d.gart", options={"tune": True})
            sec = art.manifest["tuning"]
            out["tuned"], out["tune_s"] = sec["tuned"], round(time.time() - t, 1)
            out["winners"] = {st["step"][-8:]: {b["bucket"]: b["winner"] for b in st["buckets"]}
                              for st in sec["steps"] if st["family"] == "decode"}
            model = load(art, {})
            for shape in E2E:
                prob = make_problem(shape, "cuda", 1)
                s = prob["sets"][0]
                host = lambda x: x.cpu().numpy().astype(np.uint32)  # noqa: E731
                args = [s["q_rows"].reshape(-1, nh * D), s["blocks"], host(prob["offs"]),
                        host(prob["cache_len"]), host(prob["lut"])]
                for _ in range(2):
                    (y,) = model.execute(*args)
                    y = torch.from_dlpack(y)
                    torch.cuda.synchronize()
                    err = rel_err(y.float(), reference(shape, prob))
                    out["rel_err"][shape[0]] = max(out["rel_err"].get(shape[0], 0.0),
                                                   float(f"{err:.2e}"))
            out["graphs"] = {k: model.executor.stats[k] for k in ("captures", "replays")}
            out["ok"] = all(e <= TOL for e in out["rel_err"].values())
    except Exception as e:  # noqa: BLE001  (reported, the sweep's tables still print)
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        merge(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "a GPU run")
    else:
        main()
