"""fuse-rope-split-store: split(qkv) -> [per-head rms_norm] -> rope(q), rope(k) -> two paged
KV-cache stores, rewritten into one `gir.rope_split_store` (what a layer built with
`_fuse_rope_and_store=True` emits).

The pattern is anchored on the V store because the fused op takes its place: the roped q is the
fused op's result, and the K store moves down to the V store's point in the chain. The rewrite
fires only when it provably keeps the meaning; every condition below names what it protects.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dim import Dim
from ..opdef import lookup
from ..rewrite import Pattern, Rewriter, apply_patterns
from ..types import ChainType
from . import register_pass


@dataclass
class _Branch:
    """What feeds one rope: the split piece, the optional per-head rms_norm, the rope."""

    rope: object
    nodes: list  # pure nodes between the split piece and the rope (reshape, rms_norm, reshape)
    norm_weight: object = None
    eps: float | None = None
    heads: int | None = None


class _Uses:
    """Who uses each value; a graph output counts as a use no rewrite may remove."""

    def __init__(self, graph):
        self.users = graph.users()
        self.outputs = {id(v) for v in graph.outputs}

    def only(self, v):
        us = self.users.get(id(v), [])
        if id(v) in self.outputs or len(us) != 1 or us[0].operands.count(v) != 1:
            return None
        return us[0]

    def all(self, v):
        return self.users.get(id(v), [])


def _branch(piece, uses: _Uses) -> _Branch | None:
    """piece -> rope, or piece -> reshape[T, H, D] -> rms_norm -> reshape back -> rope."""
    u = uses.only(piece)
    if u is None:
        return None
    if u.op == "rope":
        return _Branch(u, []) if u.operands[0] is piece else None
    if u.op != "reshape" or u.results[0].type.rank != 3:
        return None
    r1 = u
    n = uses.only(r1.results[0])
    if n is None or n.op != "rms_norm" or n.operands[0] is not r1.results[0]:
        return None
    if float(n.attrs.get("weight_offset", 0.0) or 0.0) != 0.0:
        return None  # the fused op's norm has no weight offset
    r2 = uses.only(n.results[0])
    if r2 is None or r2.op != "reshape" or str(r2.results[0].type) != str(piece.type):
        return None
    rope = uses.only(r2.results[0])
    if rope is None or rope.op != "rope" or rope.operands[0] is not r2.results[0]:
        return None
    t, h, d = r1.results[0].type.shape
    if not (h.is_static and d.is_static) or int(d) != int(rope.attrs.get("head_dim", -1)):
        return None  # the norm must run per head of the rope's head_dim
    return _Branch(rope, [r1, n, r2], n.operands[1], float(n.attrs["epsilon"]), int(h))


def _chain_between(first, last, uses: _Uses, nodes_len: int) -> list | None:
    """Chained ops strictly between two chained nodes on a linear chain, or None if `last`
    does not follow `first` on it."""
    c, between = first.results[-1], []
    for _ in range(nodes_len):
        n = uses.only(c)
        if n is None or n.operands[-1] is not c or not lookup(n.op).effects:
            return None
        if n is last:
            return between
        between.append(n)
        c = n.results[-1]
    return None


def _static_sizes(split) -> list[int] | None:
    sizes = [Dim(s) for s in split.attrs["sizes"]]
    return [int(s) for s in sizes] if all(s.is_static for s in sizes) else None


def _match(sv, uses: _Uses, graph):
    """Everything the rewrite needs, or None when it must not fire."""
    if sv.attrs.get("kind") != 1 or len(sv.operands) != 6:
        return None
    v, blocks, offs, clen, lut, _ = sv.operands
    split = v.node
    if split is None or split.op != "split" or len(split.results) != 3 or v.index != 2:
        return None
    qkv = split.operands[0]
    if qkv.type.rank != 2 or int(split.attrs["axis"]) % 2 != 1:
        return None
    q, k, _ = split.results
    if uses.only(v) is not sv:
        return None  # raw v used elsewhere
    bq, bk = _branch(q, uses), _branch(k, uses)
    if bq is None or bk is None:
        return None  # q or k (unroped / unnormed) used elsewhere, or another shape of graph
    rq, rk = bq.rope, bk.rope
    kr = rk.results[0]
    sk = uses.only(kr)
    if sk is None or sk.op != "kv_cache_store" or sk.operands[0] is not kr:
        return None  # roped k used elsewhere or not stored
    if sk.attrs.get("kind") != 0 or sk.attrs.get("layer") != sv.attrs.get("layer"):
        return None
    if any(a is not b for a, b in zip(sk.operands[1:5], sv.operands[1:5])):
        return None  # different blocks, offsets, cache lengths or lookup tables
    freqs = rq.operands[1]
    if (rk.operands[1] is not freqs or rq.operands[2] is not offs or rk.operands[2] is not offs
            or rq.operands[3] is not clen or rk.operands[3] is not clen):
        return None  # RoPE of q and k at other frequencies or positions than the stores
    d = rq.attrs.get("head_dim")
    if rk.attrs.get("head_dim") != d or bool(rq.attrs.get("interleaved")) != bool(rk.attrs.get("interleaved")):
        return None
    if (bq.norm_weight is None) != (bk.norm_weight is None) or bq.eps != bk.eps:
        return None  # the fused op norms both or neither, with one epsilon
    sizes = _static_sizes(split)
    if sizes is None or not isinstance(d, int) or d <= 0:
        return None
    nq, nk, nv = sizes
    bshape = blocks.type.shape
    if (nk != nv or nq % d or nk % d or len(bshape) != 6 or not bshape[4].is_static
            or int(bshape[4]) * d != nk or bshape[5] != d):
        return None  # split sizes are not NH*D, NKV*D, NKV*D of this cache
    if bq.heads is not None and (bq.heads != nq // d or bk.heads != nk // d):
        return None
    tensors = [qkv, freqs, blocks] + ([bq.norm_weight, bk.norm_weight] if bq.norm_weight is not None else [])
    if len({t.type.device for t in tensors} | {rq.results[0].type.device}) != 1:
        return None  # mixed devices: one fused kernel cannot span them
    if blocks.type.dtype != qkv.type.dtype:
        return None  # the unfused graph rounds roped k to qkv's dtype before the store casts it
    between = _chain_between(sk, sv, uses, len(graph.nodes))
    if between is None or any(any(o is blocks for o in n.operands) for n in between):
        return None  # moving the K store past an op touching the same cache changes what it sees
    return dict(split=split, bq=bq, bk=bk, sk=sk, freqs=freqs, nq=nq, nk=nk, d=d)


def _rewrite(sv, rw: Rewriter) -> bool:
    g = rw.graph
    uses = _Uses(g)
    m = _match(sv, uses, g)
    if m is None:
        return False
    split, bq, bk, sk, d = m["split"], m["bq"], m["bk"], m["sk"], m["d"]
    _, blocks, offs, clen, lut, _ = sv.operands
    qkv, qr = split.operands[0], bq.rope.results[0]
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    at = pos[id(sv)]
    operands = [qkv, m["freqs"], offs, clen, lut, blocks]
    attrs = {"head_dim": d, "n_heads": m["nq"] // d, "n_kv_heads": m["nk"] // d,
             "interleaved": bool(bq.rope.attrs.get("interleaved")), "layer": sv.attrs["layer"]}
    if bq.norm_weight is not None:
        operands += [bq.norm_weight, bk.norm_weight]
        attrs["qk_norm_eps"] = bq.eps
    # SSA order at the V store's point: operands defined above it, users of roped q below it.
    if any(o.node is not None and pos[id(o.node)] > at for o in operands):
        return False
    if any(pos[id(u)] < at for u in uses.all(qr)):
        return False
    try:
        types = lookup("rope_split_store").result_types(
            [o.type for o in operands] + [ChainType()], attrs)
    except (ValueError, TypeError):
        return False
    if str(types[0]) != str(qr.type):
        return False
    # The K store leaves the chain (its users now see its input chain); the fused op takes the
    # chain the V store took and hands its own to the V store's users.
    rw.replace(sk, [sk.operands[-1]])
    q_roped, chain_out = rw.create("rope_split_store", operands + [sv.operands[-1]], attrs, before=sv)
    rw.replace(sv, [chain_out])
    rw.replace(bq.rope, [q_roped])
    for n in [bk.rope] + bk.nodes[::-1] + bq.nodes[::-1] + [split]:
        rw.erase(n)
    return True


PATTERNS = [Pattern("rope-split-store", _rewrite, frozenset({"kv_cache_store"}))]


@register_pass("fuse-rope-split-store", default_position=50)
def fuse_rope_split_store(graph) -> bool:
    """Fuse split + (qk norm) + RoPE + K/V cache stores into `gir.rope_split_store`.

    Example:
        >>> from graphir.passes import run_passes
        >>> run_passes(graph, ["fuse-rope-split-store"])
    """
    return apply_patterns(graph, PATTERNS)
