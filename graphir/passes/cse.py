"""Common-subexpression elimination over pure ops (same op, operands and attributes)."""
from __future__ import annotations

import numpy as np

from ..opdef import lookup
from . import register_pass


def _key(v):
    if isinstance(v, np.ndarray):
        return ("dense", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_key(x) for x in v)
    return (type(v).__name__, v)


@register_pass("cse", default_position=20)
def cse(graph) -> bool:
    seen: dict = {}
    changed = False
    for n in list(graph.nodes):
        if lookup(n.op).effects or n.op == "chain":
            continue
        key = (n.op, tuple(id(v) for v in n.operands),
               tuple(sorted((k, _key(v)) for k, v in n.attrs.items())))
        prev = seen.get(key)
        if prev is None:
            seen[key] = n
            continue
        for old, new in zip(n.results, prev.results):
            graph.replace_all_uses(old, new)
        graph.nodes.remove(n)
        changed = True
    return changed
