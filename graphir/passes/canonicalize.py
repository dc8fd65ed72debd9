"""Canonicalize: fold constants and remove identity ops, as a table of named patterns."""
from __future__ import annotations

import numpy as np

from ..dtype import round_to
from ..opdef import lookup
from ..rewrite import Pattern, Rewriter, apply_patterns
from . import register_pass

FOLD_LIMIT = 1 << 16  # elements; bigger results stay ops (the IR should stay readable)
# An op whose result is much larger than its operands (range, broadcast_to, an outer product)
# stays an op above this size: folding it would write thousands of numbers into the printed IR
# and every artifact's graph.gir for data the backends compute at load time anyway.
GROWTH_LIMIT = 1024
_NOT_FOLDABLE = {"weight", "chain", "constant"}


def _const(v):
    return v.node is not None and v.node.op == "constant"


def _fold(node, rw: Rewriter) -> bool:
    if node.op in _NOT_FOLDABLE or not all(_const(v) for v in node.operands):
        return False
    opdef = lookup(node.op)
    if opdef.effects or opdef.reference is None:
        return False
    types = [r.type for r in node.results]
    if not all(t.is_static for t in types):
        return False
    n_out = sum(int(np.prod(t.static_shape())) for t in types)
    n_in = sum(int(np.prod(v.node.attrs["value"].shape)) for v in node.operands)
    if n_out > FOLD_LIMIT or n_out > max(GROWTH_LIMIT, n_in):
        return False
    args = [v.node.attrs["value"] for v in node.operands]
    args = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in args]
    attrs = {k: (int(v) if hasattr(v, "is_static") else v) for k, v in node.attrs.items()}
    attrs["_out_shapes"] = [t.static_shape() for t in types]
    attrs["_in_types"] = [v.type for v in node.operands]
    attrs["_out_types"] = types
    try:
        outs = opdef.reference(args, attrs)
    except Exception:  # a fold that cannot run (e.g. bad index) is left for run time to report
        return False
    new = [rw.create("constant", [], {"value": round_to(np.asarray(o), t.dtype), "dtype": t.dtype,
                                      "device": t.device}, before=node)[0]
           for o, t in zip(outs, types)]
    rw.replace(node, new)
    return True


def _forward(node, rw: Rewriter, src) -> bool:
    rw.replace(node, [src])
    return True


def _identity(node, rw: Rewriter) -> bool:
    x = node.operands[0] if node.operands else None
    out = node.results[0] if node.results else None
    if x is None or out is None or len(node.results) != 1 or str(x.type) != str(out.type):
        return False
    a = node.attrs
    if node.op in ("reshape", "broadcast_to", "cast", "transfer_to"):
        return _forward(node, rw, x)
    # A same-typed slice is the identity only from 0 with step 1 (x[1:n+1] of [n] is not).
    if node.op == "slice" and all(s == 0 for s in a["starts"]) and all(s == 1 for s in a["steps"]):
        return _forward(node, rw, x)
    if node.op == "permute" and list(a["dims"]) == list(range(len(a["dims"]))):
        return _forward(node, rw, x)
    if node.op == "concat" and len(node.operands) == 1:
        return _forward(node, rw, x)
    if node.op in ("add", "sub", "mul", "div") and out.type.dtype.is_float:
        y = node.operands[1]
        if _const(y):
            unit = 1.0 if node.op in ("mul", "div") else 0.0
            if np.all(y.node.attrs["value"] == unit) and str(x.type) == str(out.type):
                return _forward(node, rw, x)
    return False


def _single_split(node, rw: Rewriter) -> bool:
    if len(node.results) == 1 and str(node.results[0].type) == str(node.operands[0].type):
        return _forward(node, rw, node.operands[0])
    return False


def _reshape_of_reshape(node, rw: Rewriter) -> bool:
    x = node.operands[0]
    if x.node is None or x.node.op != "reshape":
        return False
    (new,) = rw.create("reshape", [x.node.operands[0]],
                       {"shape": tuple(node.results[0].type.shape)}, before=node)
    rw.replace(node, [new])
    return True


def _permute_of_permute(node, rw: Rewriter) -> bool:
    x = node.operands[0]
    if x.node is None or x.node.op != "permute":
        return False
    inner, outer = x.node.attrs["dims"], node.attrs["dims"]
    (new,) = rw.create("permute", [x.node.operands[0]],
                       {"dims": tuple(inner[o] for o in outer)}, before=node)
    rw.replace(node, [new])
    return True


PATTERNS = [
    Pattern("fold-constants", _fold),
    Pattern("remove-identity", _identity),
    Pattern("single-split", _single_split, frozenset({"split"})),
    Pattern("reshape-of-reshape", _reshape_of_reshape, frozenset({"reshape"})),
    Pattern("permute-of-permute", _permute_of_permute, frozenset({"permute"})),
]


@register_pass("canonicalize", default_position=10)
def canonicalize(graph) -> bool:
    return apply_patterns(graph, PATTERNS)
