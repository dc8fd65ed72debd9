"""MLA decode sweep on one GPU: the absorbed attention kernel's candidate configs
(kernels/mla_decode.py CANDIDATES) against the shipped default, in bytes of latent cache read per
second and tensor-core rate.

Shapes: batch 64 / 128 x context 4096 x 16 / 128 heads, B64 x 64 heads and B8 x 128 heads
(where the split rules of the configs differ most), one new token per sequence, DeepSeek sizes
(kv_lora_rank 512, rope 64, nope 128, v 128), bf16 latent cache in shuffled 64-token pages.
For each shape, the shipped default of its head bucket (marked "*") first, then every candidate
that fits the heads (md.candidates): the three launches of the plan's absorbed variant (q absorb,
split-K attention with the candidate's tile and split, merge + w_uv) are checked against a
float32 torch implementation of the absorbed attention (a failing candidate is reported, not
timed), then timed as a whole step and the attention launch alone, CUDA-graph replays over two
problems (tools/gpu_timing.graph_ms), and for the default the q absorption and the merge alone.
Reported per variant: GB/s of latent cache
(B * ctx * 576 * 2 bytes) over the attention launch and its share of the device copy bandwidth,
the whole step's share, TFLOP/s of the attention's nominal work (B * ctx * heads * (576 + 512)
* 2; VSPLIT 2 configs compute the scores twice, not counted) and the relative error. Target
(issue 12): >= 80% of copy. Last, the winner per head bucket (least attention time summed over
the batches) as the DEFAULTS line to ship.

Kernels are compiled offline first in worker processes (graphir's tuning_gpu.compile_specs)
and launched through graphir.runtime.cuda on torch's stream. A time budget (~110 s) skips the
candidates still left, never a default. Writes $OUT/mla.json.
    python3 tools/gpu_sweeps/mla.py
    python3 tools/gpu_sweeps/mla.py --dry-run   (CPU, Triton interpreter, tiny shapes)
    python3 tools/gpu_sweeps/mla.py --only m64n64w8s2,m128n32w8s2v2   (defaults + these)
    python3 tools/gpu_sweeps/mla.py --shapes 64x4096x64 --only none   (one shape, its default)
    python3 tools/gpu_sweeps/mla.py --only none --aux 16,32,64   (absorb / merge token blocks)
    python3 tools/gpu_sweeps/mla.py --only none --aux 16,64 --merge fused,split   (merge forms)
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

from graphir.lowering.triton_gpu.kernels import mla_decode as md  # noqa: E402
from graphir.lowering.triton_gpu.kernels.spec import cdiv  # noqa: E402
from graphir.lowering.triton_gpu.lowerings.base import spec_key  # noqa: E402

import _kernels  # noqa: E402
from _kernels import rel_err  # noqa: E402

T0 = time.time()
LIMIT_S = 110
DEV = "cpu" if DRY else "cuda"
SHAPES = [(64, 4096, 16), (128, 4096, 16), (64, 4096, 64), (8, 4096, 128), (64, 4096, 128),
          (128, 4096, 128)]
PAGE, KV_BUCKET = 64, 256
NOPE, ROPE, V, R = 128, 64, 128, 512
TOL = 2e-2
if DRY:
    SHAPES = [(2, 70, 4), (2, 70, 128)]
    NOPE, ROPE, V, R = 16, 16, 16, 64
ONLY = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
# Tokens a program of the q absorption and the merge, timed for each shape's default config
# (mla_decode.specs' aux_block_t; the default first): e.g. --aux 16,64.
AUX = [int(v) for v in sys.argv[sys.argv.index("--aux") + 1].split(",")] if "--aux" in sys.argv \
    else [md.AUX_BLOCK_T]
# The merge's forms (mla_decode.specs' merge), each at every AUX token block: e.g. fused,split.
MERGE = sys.argv[sys.argv.index("--merge") + 1].split(",") if "--merge" in sys.argv \
    else [md.MERGE]
VARIANTS = [(bt, mg) for mg in MERGE for bt in AUX]


def aux_key(bt: int, merge: str) -> str:
    """The result keys' suffix of an (aux token block, merge form) variant: "" for the
    shipped one."""
    return ("" if bt == md.AUX_BLOCK_T else f"_t{bt}") + ("" if merge == md.MERGE
                                                         else f"_{merge}")
if "--shapes" in sys.argv:   # e.g. --shapes 64x4096x64,64x4096x128 (B x ctx x heads)
    SHAPES = [tuple(int(v) for v in s.split("x"))
              for s in sys.argv[sys.argv.index("--shapes") + 1].split(",")]


def left() -> float:
    return LIMIT_S - (time.time() - T0)


# -- problem and reference ------------------------------------------------------------------------
def problem(B, ctx, nh, rng):
    """One decode step: latent cache in shuffled pages (slots past the end NaN), q, weights."""
    pages_per = cdiv(ctx, PAGE)
    n_pages = B * pages_per + 1
    perm = torch.from_numpy(rng.permutation(B * pages_per).astype(np.int32))
    lut = perm.reshape(B, pages_per).to(DEV)
    blocks = torch.randn((n_pages, 1, 1, PAGE, 1, R + ROPE), device=DEV).to(torch.bfloat16)
    if ctx % PAGE:  # a kernel that reads past a sequence's end fails the check
        blocks[lut[:, -1].long(), :, :, ctx % PAGE:] = float("nan")
    clen = torch.full((B,), ctx - 1, dtype=torch.int32, device=DEV)
    offs = torch.arange(B + 1, dtype=torch.int32, device=DEV)
    q = (torch.randn((B, nh * (NOPE + ROPE)), device=DEV) * 0.5).to(torch.bfloat16)
    wuk = (torch.randn((nh, NOPE, R), device=DEV) * R ** -0.5).to(torch.bfloat16)
    wuv = (torch.randn((nh, R, V), device=DEV) * R ** -0.5).to(torch.bfloat16)
    return dict(blocks=blocks, lut=lut, clen=clen, offs=offs, q=q, wuk=wuk, wuv=wuv)


def reference(p, B, ctx, nh, scale):
    """The absorbed attention in float32 torch: [B, nh * V]."""
    rows = torch.arange(ctx, device=DEV)
    page = p["lut"].long()[:, rows // PAGE]                           # [B, ctx]
    lat = p["blocks"][page, 0, 0, (rows % PAGE)[None, :], 0].float()  # [B, ctx, W]
    q = p["q"].float().reshape(B, nh, NOPE + ROPE)
    q_lat = torch.cat([torch.einsum("bhd,hdr->bhr", q[..., :NOPE], p["wuk"].float()),
                       q[..., NOPE:]], -1)
    s = torch.einsum("bhw,blw->bhl", q_lat, lat) * scale
    o = torch.einsum("bhl,blr->bhr", torch.softmax(s, -1), lat[..., :R])
    return torch.einsum("bhr,hrv->bhv", o, p["wuv"].float()).reshape(B, nh * V)


# -- variants --------------------------------------------------------------------------------------
def configs(nh: int) -> list[str]:
    names = md.candidates(nh)
    return [n for i, n in enumerate(names) if i == 0 or ONLY is None or n in ONLY]


def specs_of(nh: int, name: str, aux_block_t: int = md.AUX_BLOCK_T, merge: str | None = None):
    return md.specs("bfloat16", "bfloat16", nh, NOPE, ROPE, V, R, 1, PAGE, name, aux_block_t,
                    merge)


def run(kernels, B, ctx, nh, name, probs, want, copy_gbs) -> dict:
    res = dict(B=B, ctx=ctx, heads=nh, config=name, default=name == configs(nh)[0])
    try:
        specs = specs_of(nh, name)
        absorb, attn, *merge = (kernels[spec_key(s)] for s in specs)
        for k in (absorb, attn, *merge):
            if isinstance(k, Exception):
                raise k
        conf = md.tile_config(nh, R, name)
        kv_len = cdiv(ctx, KV_BUCKET) * KV_BUCKET     # the plan's bucketed context
        parts, part = md.split(B, cdiv(nh, conf["BLOCK_M"]), kv_len, conf)
        res.update(parts=parts, part_size=part)
        rp = specs[1].constexprs["RP"]
        scale = (NOPE + ROPE) ** -0.5
        qlat = torch.empty((B * nh, R + ROPE), dtype=torch.bfloat16, device=DEV)
        o_part = torch.empty((B * nh * parts, rp), dtype=torch.float32, device=DEV)
        ml = torch.empty((B * nh * parts, 2), dtype=torch.float32, device=DEV)
        out = torch.empty((B, nh * V), dtype=torch.bfloat16, device=DEV)
        olat = torch.empty((B * nh, R), dtype=torch.bfloat16, device=DEV)
        agrid = specs[1].grid_for(batch=B, seqmax=1, num_parts=parts)

        def call(p, only_attn=False, only=None, aux=(absorb, merge, specs)):
            ab, mg, sp = aux
            if only is None and not only_attn or only == "absorb":
                ab(sp[0].grid_for(T=B), p["q"], p["wuk"], qlat, B)
            if only is None:
                attn(agrid, qlat, p["offs"], p["clen"], p["lut"], p["blocks"], o_part, ml,
                     p["lut"].shape[1], 0, 1, p["blocks"].shape[0], scale, part, parts)
            if only is None and not only_attn or only == "merge":
                if len(mg) == 1:
                    mg[0](sp[2].grid_for(T=B), o_part, ml, p["wuv"], out, B, parts)
                else:   # the split merge: combine into o_lat, then the w_uv product
                    mg[0](sp[2].grid_for(T=B), o_part, ml, olat, B * nh, parts)
                    mg[1](sp[3].grid_for(T=B), olat, p["wuv"], out, B)

        def check(aux) -> float:
            out.fill_(float("nan"))
            o_part.fill_(float("nan"))
            call(probs[0], aux=aux)
            return rel_err(out.float(), want)
        res["rel_err"] = err = check((absorb, merge, specs))
        if not err < TOL:
            res["error"] = f"rel_err {err:.2e} >= {TOL}"
            return res
        res["us"] = _kernels.timed([lambda p=p: call(p) for p in probs], DRY)
        res["attn_us"] = _kernels.timed([lambda p=p: call(p, True) for p in probs], DRY)
        for bt, mgf in VARIANTS if res["default"] else ():   # absorb and merge, each alone
            sp = specs_of(nh, name, bt, mgf)
            aux = (kernels[spec_key(sp[0])], [kernels[spec_key(s)] for s in sp[2:]], sp)
            key = aux_key(bt, mgf)
            if any(isinstance(k, Exception) for k in aux[1]):
                res["error"] = f"aux {bt} {mgf}: " + str([k for k in aux[1]
                                                           if isinstance(k, Exception)][0])
                return res
            res[f"aux_err{key}"] = e = check(aux)
            if not e < TOL:
                res["error"] = f"aux_block_t {bt} merge {mgf}: rel_err {e:.2e} >= {TOL}"
                return res
            for k in ("absorb", "merge"):
                res[f"{k}_us{key}"] = _kernels.timed(
                    [lambda p=p, k=k: call(p, only=k, aux=aux) for p in probs], DRY)
        cache = B * ctx * (R + ROPE) * 2
        res["attn_gbs"] = cache / res["attn_us"] / 1e3
        res["gbs"] = cache / res["us"] / 1e3
        res["tflops"] = B * ctx * nh * (R + ROPE + R) * 2 / res["attn_us"] / 1e6
        if copy_gbs:
            res["attn_pct_copy"] = 100 * res["attn_gbs"] / copy_gbs
            res["pct_copy"] = 100 * res["gbs"] / copy_gbs
    except Exception as e:  # noqa: BLE001  (reported, the sweep goes on)
        res["error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def row(r, copy_gbs) -> list:
    head = [f"B{r['B']}", f"ctx{r['ctx']}", f"h{r['heads']}",
            r["config"] + ("*" if r["default"] else ""), f"parts {r.get('parts', '-')}"]
    if "attn_us" not in r:
        return head + ["ERROR " + r.get("error", "?")]
    pct = (lambda g: f"{100 * g / copy_gbs:.0f}%copy") if copy_gbs else (lambda g: "-")
    aux = " ".join(f"t{bt}{'' if mg == 'fused' else ' ' + mg}: absorb "
                   f"{r[f'absorb_us{k}']:.1f}us merge {r[f'merge_us{k}']:.1f}us"
                   for bt, mg in VARIANTS for k in [aux_key(bt, mg)] if f"merge_us{k}" in r)
    return head + [f"attn {r['attn_us']:.1f}us", f"{r['attn_gbs']:.0f}GB/s", pct(r["attn_gbs"]),
                   f"{r['tflops']:.0f}TFLOP/s", f"step {r['us']:.1f}us {pct(r['gbs'])}", aux,
                   f"err {r['rel_err']:.1e}"]


def winners(results) -> dict:
    """{head bucket: config} with the least attention time summed over the batches (only
    configs timed at every batch of the bucket)."""
    best = {}
    for bucket in sorted({md.head_bucket(r["heads"]) for r in results}):
        rs = [r for r in results if md.head_bucket(r["heads"]) == bucket]
        shapes = {(r["B"], r["ctx"], r["heads"]) for r in rs}
        tot: dict = {}
        for r in rs:
            if "attn_us" in r:
                tot.setdefault(r["config"], []).append(r["attn_us"])
        full = {k: sum(v) for k, v in tot.items() if len(v) == len(shapes)}
        if full:
            best[bucket] = min(full, key=full.get)
    return best


def main() -> None:
    torch.manual_seed(0)
    if not DRY:
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    specs = {}
    for _, _, nh in SHAPES:
        for name in configs(nh):
            specs.update({spec_key(s): s for s in specs_of(nh, name)})
        for bt, mgf in VARIANTS:
            specs.update({spec_key(s): s for s in specs_of(nh, configs(nh)[0], bt, mgf)})
    kernels = _kernels.compile_all(specs, DRY)
    copy_gbs = 0.0
    if not DRY:
        from graphir.tools.gpu_timing import copy_gbs as measure_copy

        copy_gbs = measure_copy()
        print(f"device copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rng = np.random.default_rng(1)
    results, rows = [], []
    for B, ctx, nh in SHAPES:
        probs = [problem(B, ctx, nh, rng) for _ in range(1 if DRY else 2)]
        want = reference(probs[0], B, ctx, nh, (NOPE + ROPE) ** -0.5)
        for i, name in enumerate(configs(nh)):
            if i and left() < 4:
                print(f"time budget: skipping B{B} ctx{ctx} h{nh} {name}", flush=True)
                continue
            res = run(kernels, B, ctx, nh, name, probs, want, copy_gbs)
            results.append(res)
            rows.append(row(res, copy_gbs))
            print("  ".join(rows[-1]), flush=True)
        del probs, want
        if not DRY:
            torch.cuda.empty_cache()
    best = winners(results)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mla.json"), "w") as f:
            json.dump({"copy_gbs": copy_gbs, "defaults": md.DEFAULTS, "winners": best,
                       "results": results}, f, indent=1)
    from graphir.tools.gpu_timing import table

    print(f"\n== MLA decode, absorbed attention configs ({time.time() - T0:.0f} s; target: "
          f">= 80%copy of the latent cache; * = shipped default)")
    print(table(rows))
    ship = {b: best.get(b, md.DEFAULTS[b]) for b in md.DEFAULTS}
    print(f"winners per head bucket: {best}; to ship: DEFAULTS = {ship}")


if __name__ == "__main__":
    main()
