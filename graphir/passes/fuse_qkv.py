"""fuse-qkv: three projections of one input by separate weights (q, k, v) become one stacked
matmul: concat of the weights (axis 0) -> `gir.fused_qkv_matmul` -> `gir.split`.

A projection is `matmul(x, w){transpose_b}` (or `matmul(x, permute(w){dims=[1, 0]})`), optionally
followed by `add(_, bias)` with a bias `[out]`. The biases fold into the fused op only when all
three projections have one; otherwise the adds stay and consume the split pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..opdef import lookup
from ..rewrite import Pattern, Rewriter, apply_patterns
from . import register_pass


@dataclass
class _Proj:
    mm: object
    weight: object
    permute: object = None  # the permute node feeding the matmul, when the weight is transposed so
    add: object = None
    bias: object = None

    @property
    def out(self):
        return (self.add or self.mm).results[0]


def _weight_of(mm):
    """W [out, in] when mm computes x @ W^T, else None."""
    a = mm.attrs
    if a.get("transpose_a"):
        return None, None
    w = mm.operands[1]
    if a.get("transpose_b"):
        return (w, None) if w.type.rank == 2 else (None, None)
    p = w.node
    if p is not None and p.op == "permute" and tuple(p.attrs["dims"]) == (1, 0):
        return p.operands[0], p
    return None, None


def _users(graph):
    users = graph.users()
    for v in graph.outputs:
        users.setdefault(id(v), []).append(None)  # an output is a use no rewrite may drop
    return users


def _bias_of(mm, users):
    """(add node, bias) when mm's only use is `+ bias[out]`, else (None, None)."""
    us = users.get(id(mm.results[0]), [])
    if len(us) != 1 or us[0] is None or us[0].op != "add":
        return None, None
    add = us[0]
    r = mm.results[0]
    others = [o for o in add.operands if o is not r]
    if len(others) != 1:
        return None, None
    b, rt = others[0].type, r.type
    if (getattr(b, "rank", 0) != 1 or b.shape[0] != rt.shape[-1] or b.dtype != rt.dtype
            or b.device != rt.device or str(add.results[0].type) != str(rt)):
        return None, None
    return add, others[0]


def _projections(x, users) -> list[_Proj] | None:
    projs = []
    for u in users.get(id(x), []):
        if u is None or u.op != "matmul" or u.operands[0] is not x:
            continue
        w, perm = _weight_of(u)
        if w is None:
            return None  # another kind of product of x: which three belong together is unclear
        projs.append(_Proj(u, w, perm))
    return projs


def _rewrite(mm, rw: Rewriter) -> bool:
    g = rw.graph
    x = mm.operands[0]
    if x.type.rank != 2 or _weight_of(mm)[0] is None:
        return False
    users = _users(g)
    projs = _projections(x, users)
    if projs is None or len(projs) != 3 or projs[0].mm is not mm:
        return False  # fire once per triple, on its first matmul
    ws = [p.weight for p in projs]
    if len({(w.type.dtype, w.type.device) for w in ws} | {(x.type.dtype, x.type.device)}) != 1:
        return False
    if len({str(p.mm.results[0].type.dtype) for p in projs}) != 1:
        return False
    for p in projs:
        p.add, p.bias = _bias_of(p.mm, users)
    with_bias = all(p.add is not None for p in projs)
    if not with_bias:
        for p in projs:
            p.add = p.bias = None
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    first = min(pos[id(p.mm)] for p in projs)
    defs = [v for v in [x] + ws + [p.bias for p in projs if p.bias is not None] if v.node is not None]
    late = [v.node for v in defs if pos[id(v.node)] > first]
    # Weights and constants (no operands) may move up to the first projection; anything else
    # defined later pins the fused ops below it, and then every use of a result must follow.
    pinned = any(n.operands for n in late)
    hoist = [] if pinned else sorted({id(n): n for n in late}.values(), key=lambda n: pos[id(n)])
    at = max(pos[id(n)] for n in late) + 1 if pinned else first
    replaced_nodes = {id(p.mm) for p in projs} | {id(p.add) for p in projs if p.add is not None}
    for p in projs:
        for u in users.get(id(p.out), []):
            if u is not None and pos[id(u)] < at and id(u) not in replaced_nodes:
                return False
    sizes = tuple(w.type.shape[0] for w in ws)
    attrs_fused = {}
    try:
        cat_t = lookup("concat").result_types([w.type for w in ws], {"axis": 0})
        ins = [x.type, cat_t[0]]
        if with_bias:
            ins.append(lookup("concat").result_types([p.bias.type for p in projs], {"axis": 0})[0])
        fused_t = lookup("fused_qkv_matmul").result_types(ins, attrs_fused)
    except (ValueError, TypeError):
        return False
    if any(str(fused_t[0].dtype) != str(p.out.type.dtype) for p in projs):
        return False
    before = g.nodes[at]
    for n in hoist:
        g.nodes.remove(n)
        g.nodes.insert(g.nodes.index(before), n)
    (wqkv,) = rw.create("concat", ws, {"axis": 0}, before=before, loc=mm.loc)
    operands = [x, wqkv]
    if with_bias:
        operands.append(rw.create("concat", [p.bias for p in projs], {"axis": 0}, before=before,
                                  loc=mm.loc)[0])
    (qkv,) = rw.create("fused_qkv_matmul", operands, attrs_fused, before=before, loc=mm.loc)
    pieces = rw.create("split", [qkv], {"axis": 1, "sizes": sizes}, before=before, loc=mm.loc)
    for p, piece in zip(projs, pieces):
        if p.add is not None:
            rw.replace(p.add, [piece])
            rw.erase(p.mm)
        else:
            rw.replace(p.mm, [piece])
        if p.permute is not None and len(users.get(id(p.permute.results[0]), [])) == 1:
            rw.erase(p.permute)  # the transposed weight had no other use
    return True


PATTERNS = [Pattern("fuse-qkv", _rewrite, frozenset({"matmul"}))]


@register_pass("fuse-qkv", default_position=40)
def fuse_qkv(graph) -> bool:
    """Stack three projections of one input into concat(weights) + fused_qkv_matmul + split.

    Example:
        >>> from graphir.passes import run_passes
        >>> run_passes(graph, ["fuse-qkv"])
    """
    return apply_patterns(graph, PATTERNS)
