"""Pictures for the CLI: DOT text rendered by Graphviz's `dot`, and a compiled plan as DOT."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

FORMATS = ("text", "dot", "svg", "png")


def render(dot_text: str, fmt: str, out: str | Path) -> Path:
    """Write `dot_text` to `out` as DOT, or rendered to SVG/PNG with Graphviz's dot program."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dot":
        out.write_text(dot_text)
        return out
    exe = shutil.which("dot")
    if exe is None:
        raise ValueError(f"--format {fmt} needs Graphviz's `dot` program, which is not on PATH; "
                         f"install it (Debian/Ubuntu: apt-get install graphviz; conda: conda "
                         f"install graphviz) or use --format dot")
    p = subprocess.run([exe, f"-T{fmt}", "-o", str(out)], input=dot_text, text=True,
                       capture_output=True)
    if p.returncode:
        raise ValueError(f"dot -T{fmt} failed: {p.stderr.strip()[:300]}")
    return out


def plan_to_dot(art) -> str:
    """The compiled plan of an artifact: steps in order (kernel names), the values they read and
    write, and each intermediate's memory-plan slot."""
    m = art.manifest
    plan = m["plan"]
    q = json.dumps
    title = f"{art.path.name}: {m['target']}"
    lines = ["digraph plan {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             f"  labelloc=t; label={q(title)};"]
    used = {v for s in plan["steps"] for v in s["inputs"] + s["outputs"]}
    shapes = {"input": "invhouse", "buffer": "cylinder", "weight": "box3d", "output": "house"}
    for v in plan["values"]:
        if v["id"] not in used:
            continue
        label = f"%{v['id']} {v['kind']}: [{', '.join(v['shape'])}] {v['dtype']}"
        if v["slot"] is not None:
            label += f"\nslot {v['slot']}"
        if v["view_of"] is not None:
            label += f"\nview of %{v['view_of']}"
        lines.append(f"  v{v['id']} [label={q(label)}, shape={shapes.get(v['kind'], 'ellipse')}];")
    for i, s in enumerate(plan["steps"]):
        kernels = s["kernel"].split("+")
        more = f"\n(+{len(kernels) - 4} more)" if len(kernels) > 4 else ""
        label = f"step {i}: gir.{s['op']}\n" + "\n".join(kernels[:4]) + more
        lines.append(f'  s{i} [label={q(label)}, shape=box, style="rounded,filled", '
                     f'fillcolor="#e0f2fe"];')
        if i:
            lines.append(f'  s{i - 1} -> s{i} [style=bold, color="#2563eb"];')
        lines += [f'  v{v} -> s{i} [color="#9ca3af"];' for v in s["inputs"]]
        lines += [f'  s{i} -> v{v} [color="#9ca3af"];' for v in s["outputs"]]
    lines.append("}")
    return "\n".join(lines) + "\n"
