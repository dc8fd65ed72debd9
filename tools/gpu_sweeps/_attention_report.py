"""The prefill sweep's results (tools/gpu_sweeps/attention.py; the leading underscore keeps
tools/gpu_sweep.sh from running this module as a sweep): the measured winners as the
tuner's table, that table merged into the shipped one, and the printed tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import triton

from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
from graphir.lowering.triton_gpu.kernels import flash_attention_tuning as ft
from graphir.tools.gpu_timing import table


def prefill_table(results, shapes, device: str) -> dict:
    """The measured winners as the tuner's table: per (head dim, mask) and bucket of batch x
    query tiles, the config with the best geometric-mean rate over the shapes in that bucket
    (only configs every one of those shapes ran). Each candidate's row (what the table ships,
    as `tune()` writes it) carries that geometric mean: of its times ("ms") and rates over the
    bucket's shapes ("shape" names them all), and its largest error, so the shipped choice is
    its fastest row. `shapes` are the sweep's (name, batch, seq, head dim, mask, window)."""
    groups: dict = {}
    for name, B, S, D, mask, _ in shapes:
        s = results["shapes"].get(name, {})
        rates = {k: v for k, v in s.get("variants", {}).items()
                 if "ms" in v and not k.startswith("r1:")}
        if rates:
            bucket = tuning.family("prefill").bucket_of(B * triton.cdiv(S, ft.TILE))
            label = f"B{B}x{S}" + (f" window {s['shape'][4]}" if s["shape"][4] else "") + (
                f" D{D}" if D != 128 else "")
            groups.setdefault((D, mask, bucket), []).append((label, rates, s["sdpa"]))
    entries: dict = {}
    for (D, mask, bucket), runs in groups.items():
        common = set.intersection(*(set(r) for _, r, _ in runs))
        if not common:
            continue
        gmean = lambda k, f: math.exp(  # noqa: E731
            sum(math.log(r[k][f]) for _, r, _ in runs) / len(runs))
        score = lambda k: gmean(k, "tflops")  # noqa: E731
        best = max(common, key=score)
        # What a call the warp-specialized kernel cannot serve (soft-cap) runs instead.
        triton_only = [k for k in common if not fc.is_ws(fc.get(k))]
        fallback = max(triton_only, key=score) if fc.is_ws(fc.get(best)) and triton_only \
            else None
        label, rates, sdpa = runs[0]
        rows = sorted(({"config": k, "ms": round(gmean(k, "ms"), 4),
                        "rel_err": float(f"{max(r[k]['rel_err'] for _, r, _ in runs):.3g}"),
                        "shape": "+".join(lb.split(" ")[0] for lb, _, _ in runs),
                        "tflops": round(gmean(k, "tflops"), 1)}
                       for k in common), key=lambda r: r["ms"])
        entries.setdefault(f"D={D},mask={mask}", {})[bucket] = {
            "candidates": rows, "config": best, "fallback": fallback,
            "note": f"{label}: {rates[best]['tflops']:.1f} TF/s, torch SDPA "
                    f"{sdpa['tflops']:.0f}" + (" (causal)" if "causal" in sdpa["how"] else "")}
    return {"version": 1, "device": device, "families": {"prefill": {"bf16": entries}}}


def merge(measured_path: str, run: str, keys: list[str] | None = None) -> None:
    """Replace the prefill family of the shipped tuning table with a sweep's measured one
    ($OUT/prefill_table.json), each note naming the run; with `keys` ("D=64,mask=CAUSAL", ...)
    only those entries, the provenance naming them (a sweep of a few candidates, ATTN_ONLY,
    replaces only what it decided)."""
    measured = json.loads(Path(measured_path).read_text())
    tuning.validate_table(measured, measured_path)
    got = measured["families"]["prefill"]["bf16"]
    for per_key in got.values():
        for entry in per_key.values():
            entry["note"] += f" ({measured['device']} sweep {run})"
    shipped = json.loads(tuning.DEFAULTS_PATH.read_text())
    how = (f"{measured['device']} sweep {run} of tools/gpu_sweeps/attention.py (every candidate "
           f"checked against torch SDPA, then timed in CUDA graphs on shuffled pages; per bucket "
           f"the best geometric mean over its shapes)")
    prov = shipped.setdefault("provenance", {})
    if keys:
        missing = [k for k in keys if k not in got]
        if missing:
            raise SystemExit(f"{measured_path} has no {missing}; it has {sorted(got)}")
        for k in keys:
            shipped["families"]["prefill"]["bf16"][k] = got[k]
        prov["prefill"] = prov.get("prefill", "Measured") + f"; {', '.join(keys)}: {how}"
    else:
        prov["prefill"] = f"Measured, not predicted: {how}"
        shipped["families"]["prefill"] = measured["families"]["prefill"]
    tuning.validate_table(shipped)
    tuning.DEFAULTS_PATH.write_text(json.dumps(shipped, indent=1) + "\n")
    print(f"merged {measured_path} into {tuning.DEFAULTS_PATH}")


def print_tables(results, shapes):
    names = [s[0] for s in shapes]
    shapes = results["shapes"]
    rows = set()
    for n in names:
        rows.update(shapes.get(n, {}).get("variants", {}))
    order = sorted(r for r in rows if r.startswith("r1:")) + sorted(
        r for r in rows if not r.startswith("r1:"))
    fmt = lambda v: f"{v['tflops']:.0f}" if v and "ms" in v else ("-" if not v else "ERR")
    defaults = {shapes[n].get("default") for n in names if n in shapes}
    body = [["SDPA"] + [fmt(shapes[n]["sdpa"]) if n in shapes else "-" for n in names]]
    body += [["flex_attention"] + [fmt(shapes.get(n, {}).get("flex")) for n in names]]
    for r in order:
        body.append([r + (" *" if r in defaults else "")]
                    + [fmt(shapes.get(n, {}).get("variants", {}).get(r)) for n in names])
    summary = []
    for n in names:
        s = shapes.get(n)
        if not s:
            continue
        d = s["variants"].get(s.get("default"), {})
        r1 = [v["tflops"] for k, v in s["variants"].items() if k.startswith("r1:") and "ms" in v]
        pr = s.get("paired")
        row = [n, s.get("default", "-"), fmt(d),
               f"{d['tflops'] / s['sdpa']['tflops']:.2f}x" if "ms" in d else "-",
               f"{pr['median']:.2f}x [{pr['min']:.2f}-{pr['max']:.2f}]" if pr else "-",
               f"{d['tflops'] / max(r1):.2f}x" if "ms" in d and r1 else "-",
               f"{d['rel_err']:.1e}" if "rel_err" in d else "-"]
        if "best" in s:
            b = s["variants"][s["best"]]
            io = s.get("in_order", {})
            row += [s["best"], f"{b['tflops']:.0f}",
                    f"{(io['tflops'] / b['tflops'] - 1) * 100:+.1f}%" if "ms" in io else "ERR"]
        else:
            row += ["-", "-", "-"]
        summary.append(row)
    print(f"\nTFLOP/s (unmasked work; w4k's SDPA is SDPA causal, its flex_attention the "
          f"window itself; * what an untuned compile runs: the shipped table's choice) "
          f"elapsed {results['elapsed_s']:.0f}s")
    print(table(body, ["variant"] + names))
    print(table(summary, ["shape", "shipped", "TF/s", "vs SDPA", "paired vs SDPA",
                          "vs round 1", "rel err", "best", "TF/s", "in-order pages"]))
    print("prefill table:", json.dumps({k: {b: e["config"] for b, e in v.items()} for k, v in
                                        results["prefill_table"]["families"]["prefill"]["bf16"]
                                        .items()}))
