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
        "files": {rel: {"sha256": d, "bytes": (art.path / rel).stat().st_size, "verified": True}
                  for rel, d in sorted(m["files"].items())},
    }
    if "plan" in m:
        info["memory_plan"] = _plan(m["plan"])
    return info


def _kernels(m) -> list[str]:
    k = m.get("kernels", [])
    return sorted(k) if isinstance(k, (list, dict)) else []


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
    lines.append(f"kernels   {len(info['kernels'])}")
    lines += [f"  {k}" for k in info["kernels"]]
    p = info.get("memory_plan")
    if p:
        lines.append(f"memory plan: {p['steps']} steps ({p['kernel_calls']} kernel calls, "
                     f"{p['views']} views, {p['runtime_ops']} runtime ops); "
                     f"{p['intermediates']} intermediates in {len(p['slots'])} slots")
        lines += [f"  slot {k}: {' | '.join(v)}" for k, v in p["slots"].items()]
    lines.append(f"files     {len(info['files'])}, every sha256 verified")
    lines += [f"  {rel:<24} {f['bytes']:>10} B  sha256 {f['sha256'][:16]}…  OK"
              for rel, f in info["files"].items()]
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from graphir.lowering.artifact import ArtifactError, load_artifact

    try:
        art = load_artifact(args.artifact)
    except ArtifactError as e:
        raise ValueError(str(e)) from None
    info = summarize(art)
    print(json.dumps(info, indent=1) if args.json else format_summary(info))
    return 0


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="verify an artifact and summarize its manifest",
                       description="Check ART.gart (format version, tool versions, sha256 of every "
                                   "file, graph hash) and print its target, signature, kernels, "
                                   "memory plan and files.")
    i.add_argument("artifact", help="artifact directory (.gart)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(fn=cmd_inspect)
