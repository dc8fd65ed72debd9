"""Dead-code elimination: drop nodes none of whose results is used; chained ops always stay."""
from __future__ import annotations

from ..opdef import lookup
from . import register_pass


def _removable(node) -> bool:
    return not lookup(node.op).effects and node.op != "chain"


@register_pass("dce", default_position=90)
def dce(graph) -> bool:
    live = {id(v) for v in graph.outputs}
    keep = []
    for n in reversed(graph.nodes):
        if _removable(n) and not any(id(r) in live for r in n.results):
            continue
        keep.append(n)
        live.update(id(v) for v in n.operands)
    # A chain op no chained op uses any more is dead too.
    keep = [n for n in keep if n.op != "chain" or id(n.results[0]) in live]
    keep.reverse()
    changed = len(keep) != len(graph.nodes)
    graph.nodes[:] = keep
    if graph._chain is not None and not any(graph._chain is r for n in keep for r in n.results):
        graph._chain = None
    return changed
