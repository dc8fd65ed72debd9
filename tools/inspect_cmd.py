"""`graphir inspect ART.gart`: verify an artifact and summarize its manifest."""
from __future__ import annotations

import json
from collections import Counter

from .run_cmd import input_names


def summarize(art) -> dict:
    """What `inspect` prints, as plain data (the --json output)."""
    m = art.manifest
    g = art.graph()
    names = input_names(g)
    info = {
        "path": str(art.path),
        "format_version": m["format_version"],
        "target": m["target"],
        "graph": g.name,
        "graph_hash": m["graph_hash"],
        "tool_versions": m.get("tool_versions", {}),
        "inputs": [f"%{n}: {v.type}" for n, v in zip(names, g.inputs)],
        "outputs": [str(v.type) for v in g.outputs],
        "weights": {k: str(v.type) for k, v in sorted(g.weights.items())},
        "kernels": _kernels(m),
        "pdl_kernels": _pdl_kernels(m),
        "pdl_early_reads": _pdl_early_reads(m),
        "prepacked": _prepacked(m),
        "files": {rel: {"sha256": d, "bytes": (art.path / rel).stat().st_size, "verified": True}
                  for rel, d in sorted(m["files"].items())},
    }
    if "plan" in m:
        info["memory_plan"] = _plan(m["plan"])
    if "tuning" in m:
        info["tuning"] = m["tuning"]
    info["root_digest"] = m.get("root_digest")
    info["signature"] = _signature(art)
    return info


def _signature(art) -> dict | None:
    from graphir.lowering.signing import SIGNATURE

    p = art.path / SIGNATURE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
        return {"key_id": rec.get("key_id"), "algorithm": rec.get("algorithm"),
                "for_this_digest": rec.get("root_digest") == art.manifest.get("root_digest")}
    except ValueError:
        return {"error": f"malformed {SIGNATURE}"}


def _kernels(m) -> list[str]:
    k = m.get("kernels", [])
    return sorted(k) if isinstance(k, (list, dict)) else []


def _pdl_kernels(m) -> list[str]:
    """Kernels launched with programmatic dependent launch (their cubins wait for the kernel
    before them, which may still be running: lowering/triton_gpu/kernels/pdl.py)."""
    k = m.get("kernels", [])
    return sorted(n for n, e in k.items() if e.get("launch_pdl")) if isinstance(k, dict) else []


def _pdl_early_reads(m) -> dict[str, list]:
    """Kernel -> the arguments it reads before waiting for the kernel before it (the runtime
    lets it start early only where nothing ahead of it writes them)."""
    k = m.get("kernels", [])
    return {n: list(e["pdl_early_reads"]) for n, e in k.items()
            if isinstance(e, dict) and e.get("launch_pdl") and e.get("pdl_early_reads")} \
        if isinstance(k, dict) else {}


def _prepacked(m) -> dict[str, list]:
    """Kernel -> [[operand, layout], ...] of the CPU kernels that take operands packed once at
    load (panels of a float weight, repacked K-quant blocks, GPTQ's column panels)."""
    steps = m.get("plan", {}).get("steps", []) if isinstance(m.get("plan"), dict) else []
    return {s["kernel"]: s["attrs"]["prepack"] for s in steps
            if isinstance(s, dict) and isinstance(s.get("attrs"), dict)
            and s["attrs"].get("prepack")}


def _plan(plan: dict) -> dict:
    values, steps = plan["values"], plan["steps"]
    slots: dict[int, list[str]] = {}
    for v in values:
        if v["slot"] is not None and v["view_of"] is None:
            shape = f"[{', '.join(v['shape'])}] {v['dtype']}"
            if shape not in slots.setdefault(v["slot"], []):
                slots[v["slot"]].append(shape)
    kinds = Counter(v["kind"] for v in values)
    return {"steps": len(steps),
            "kernel_calls": sum(1 for s in steps if s["kernel"] not in ("view",)
                                and not s["kernel"].startswith("runtime")),
            "views": sum(1 for s in steps if s["kernel"] == "view"),
            "runtime_ops": sum(1 for s in steps if s["kernel"].startswith("runtime")),
            "values": dict(sorted(kinds.items())),
            "intermediates": kinds.get("intermediate", 0),
            "slots": {str(k): v for k, v in sorted(slots.items())}}


def format_summary(info: dict) -> str:
    lines = [f"artifact  {info['path']}",
             f"format    version {info['format_version']}, target {info['target']}",
             f"graph     @{info['graph']}  sha256 {info['graph_hash']}",
             "tools     " + ", ".join(f"{k} {v}" for k, v in sorted(info["tool_versions"].items())),
             "inputs"] + [f"  {s}" for s in info["inputs"]] + ["outputs"]
    lines += [f"  {i}: {s}" for i, s in enumerate(info["outputs"])]
    lines.append(f"weights   {len(info['weights'])}")
    lines += [f"  {k}: {t}" for k, t in info["weights"].items()]
    pdl = set(info.get("pdl_kernels", ()))
    lines.append(f"kernels   {len(info['kernels'])}"
                 + (f" ({len(pdl)} overlap the kernel before them: [PDL])" if pdl else ""))
    packed, early = info.get("prepacked", {}), info.get("pdl_early_reads", {})
    lines += [f"  {k}" + (" [PDL]" if k in pdl else "")
              + (f"  (reads {', '.join(early[k])} before the wait)" if k in early else "")
              + "".join(f"  (operand {i} packed at load: {lay})" for i, lay in packed.get(k, ()))
              for k in info["kernels"]]
    p = info.get("memory_plan")
    if p:
        lines.append(f"memory plan: {p['steps']} steps ({p['kernel_calls']} kernel calls, "
                     f"{p['views']} views, {p['runtime_ops']} runtime ops); "
                     f"{p['intermediates']} intermediates in {len(p['slots'])} slots")
        lines += [f"  slot {k}: {' | '.join(v)}" for k, v in p["slots"].items()]
    if info.get("tuning"):
        from graphir.lowering.triton_gpu.tuning import format_section

        lines += format_section(info["tuning"])
    sig = info.get("signature")
    lines.append(f"digest    {info.get('root_digest')}")
    if sig is None:
        lines.append("signature none (sign with `graphir compile --sign KEY`)")
    elif "error" in sig:
        lines.append(f"signature {sig['error']}")
    else:
        state = "verified against the trusted keys" if info.get("trusted") else \
            ("matches this digest (pass --trusted-key to verify it)" if sig["for_this_digest"]
             else "DOES NOT match this digest")
        lines.append(f"signature {sig['algorithm']} key {sig['key_id']}: {state}")
    lines.append(f"files     {len(info['files'])}, every sha256 verified")
    lines += [f"  {rel:<24} {f['bytes']:>10} B  sha256 {f['sha256'][:16]}…  OK"
              for rel, f in info["files"].items()]
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from graphir.lowering.artifact import ArtifactError, load_artifact

    keys = args.trusted_key or None
    try:
        art = load_artifact(args.artifact, trusted_keys=keys)
    except ArtifactError as e:
        raise ValueError(str(e)) from None
    if args.format != "text":
        from .render import plan_to_dot, render

        if not args.output:
            raise ValueError(f"--format {args.format} needs -o OUT")
        print(f"wrote {render(plan_to_dot(art), args.format, args.output)}")
        return 0
    info = summarize(art)
    info["trusted"] = keys is not None
    print(json.dumps(info, indent=1) if args.json else format_summary(info))
    return 0


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="verify an artifact and summarize its manifest",
                       description="Check ART.gart (format version, tool versions, sha256 of every "
                                   "file, graph hash) and print its target, signature, kernels, "
                                   "memory plan and files.")
    i.add_argument("artifact", help="artifact directory (.gart)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--format", choices=["text", "dot", "svg", "png"], default="text",
                   help="text (default), or the compiled plan as a picture (-o OUT): steps in "
                        "order, kernel names, values and their memory-plan slots")
    i.add_argument("-o", "--output", help="file of the picture")
    i.add_argument("--trusted-key", action="append", metavar="KEY.pub",
                   help="require a valid signature by this public key (repeatable)")
    i.set_defaults(fn=cmd_inspect)
