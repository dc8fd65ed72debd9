"""Graphs as pictures: Graphviz DOT text for a Graph (and, in tools/, for a compiled plan).

Nodes show the op, the result type and the user's source line; graph inputs, weights,
constants, buffers (the KV cache) and the chain token are drawn distinctly; fused kernel ops
(rope_split_store, fused_qkv_matmul) are highlighted and elementwise chains that a backend runs
as one kernel are boxed as clusters. The text is plain DOT: `dot -Tsvg` renders it
(tools/render.py does, with a clear error when Graphviz is missing).

Example:
    >>> print(graph_to_dot(g))                    # doctest: +SKIP
"""
from __future__ import annotations

import json

from .types import BufferType, ChainType

FUSED_OPS = {"rope_split_store", "fused_qkv_matmul"}
STYLE = {
    "input": 'shape=invhouse, style=filled, fillcolor="#dbeafe"',
    "buffer": 'shape=cylinder, style=filled, fillcolor="#fde68a"',
    "weight": 'shape=box3d, style=filled, fillcolor="#e5e7eb"',
    "constant": 'shape=note, style=filled, fillcolor="#f3f4f6"',
    "op": 'shape=box, style="rounded,filled", fillcolor="#ffffff"',
    "fused": 'shape=box, style="rounded,filled,bold", fillcolor="#bbf7d0", penwidth=2',
    "output": 'shape=house, style=filled, fillcolor="#fecaca"',
}


def _q(text: str) -> str:
    return json.dumps(text)  # a DOT string literal: quotes and backslashes escaped


def _short(t) -> str:
    return f"[{', '.join(str(d) for d in t.shape)}] {t.dtype.short}"


def graph_to_dot(graph, title: str | None = None, groups=None) -> str:
    """DOT text of `graph`. `groups`: elementwise fusion groups to box (default: found here)."""
    if groups is None:
        from .passes.elementwise_fusion import find_groups

        groups = find_groups(graph)
    lines = ["digraph G {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8, color="#6b7280"];']
    if title:
        lines.append(f"  labelloc=t; label={_q(title)};")
    src: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        name = graph.input_names[i] if graph.input_names else f"arg{i}"
        kind = "buffer" if isinstance(v.type, BufferType) else "input"
        lines.append(f"  in{i} [label={_q(f'%{name}: {_short(v.type)}')}, {STYLE[kind]}];")
        src[id(v)] = f"in{i}"
    member = {id(n): k for k, grp in enumerate(groups) for n in grp.nodes}
    clusters: dict[int, list[str]] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "chain":
            for r in n.results:
                src[id(r)] = None  # the chain's origin: no node of its own
            continue
        if n.op == "weight":
            kind, label = "weight", f"weight {n.attrs['name']}\n{_short(n.results[0].type)}"
        elif n.op == "constant":
            kind, label = "constant", f"constant {_short(n.results[0].type)}"
        else:
            kind = "fused" if n.op in FUSED_OPS else "op"
            types = [_short(r.type) for r in n.results if not isinstance(r.type, ChainType)]
            label = f"{n.op}\n" + "\n".join(types)
            if n.loc:
                label += f"\n{n.loc}"
        stmt = f"  n{i} [label={_q(label)}, {STYLE[kind]}];"
        (clusters.setdefault(member[id(n)], []) if id(n) in member else lines).append(stmt)
        for r in n.results:
            src[id(r)] = f"n{i}"
    for k, stmts in clusters.items():
        lines += [f"  subgraph cluster_{k} {{",
                  f'    label="fused elementwise kernel {k}"; style="rounded,dashed"; '
                  f'color="#16a34a";'] + ["  " + s for s in stmts] + ["  }"]
    for i, n in enumerate(graph.nodes):
        if n.op == "chain":
            continue
        for v in n.operands:
            s = src.get(id(v))
            if s is None:
                continue
            if isinstance(v.type, ChainType):
                lines.append(f'  {s} -> n{i} [style=dashed, color="#9ca3af", label="chain"];')
            else:
                lines.append(f"  {s} -> n{i};")
    for k, v in enumerate(graph.outputs):
        lines.append(f"  out{k} [label={_q(f'output {k}: {_short(v.type)}')}, {STYLE['output']}];")
        if src.get(id(v)):
            lines.append(f"  {src[id(v)]} -> out{k};")
    lines.append("}")
    return "\n".join(lines) + "\n"
