"""elementwise-fusion: group chains of elementwise ops that share one iteration shape.

A group is a set of elementwise nodes (OpDef trait "elementwise") with identical result shapes
and devices, connected producer -> consumer, that a backend can run as one kernel: values
inside the group never touch memory. The pass does not rewrite the IR (groups are not ops of
the registry, so every backend keeps the same op set); it records the groups on the graph as
`graph.fusion_groups` and returns False. Backends that fuse (the Triton backend) call
`find_groups` themselves; the pass has no default position.

Legality: a node joins its producer's group only when none of its other operands depends on a
member of that group through a node outside it (the group would then have to run both before
and after that node). Groups therefore contract to a DAG, so a backend can schedule them as
single steps in a topological order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from graphir.types import ChainType

from . import register_pass


@dataclass
class FusionGroup:
    """Members in graph order; inputs are values read from outside; outputs are member results
    read outside the group (or graph outputs)."""

    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def shape(self):
        return self.nodes[0].results[0].type.shape

    def __repr__(self) -> str:
        ops = ", ".join(n.op for n in self.nodes)
        return f"FusionGroup([{ops}], {len(self.inputs)} inputs, {len(self.outputs)} outputs)"


def is_elementwise(node) -> bool:
    """An op the grouping may fuse: elementwise trait, one tensor result."""
    if node.op in ("chain", "weight", "constant"):
        return False
    return "elementwise" in node.opdef.traits and len(node.results) == 1


def find_groups(graph, exclude=frozenset()) -> list[FusionGroup]:
    """Fusion groups of `graph`; nodes whose id() is in `exclude` stay out of every group."""
    producer = {}
    for n in graph.nodes:
        for r in n.results:
            producer[id(r)] = n
    users: dict[int, list] = {}
    for n in graph.nodes:
        for v in n.operands:
            p = producer.get(id(v))
            if p is not None:
                users.setdefault(id(p), []).append(n)

    def descendants(ids) -> set[int]:
        seen: set[int] = set()
        stack = [u for i in ids for u in users.get(i, [])]
        while stack:
            u = stack.pop()
            if id(u) not in seen:
                seen.add(id(u))
                stack.extend(users.get(id(u), []))
        return seen

    def legal(ids: set[int]) -> bool:
        # No path leaves the set and comes back: the set can run as one step.
        out = descendants(ids) - ids
        return not (descendants(out) & ids)

    group_of: dict[int, int] = {}
    members: dict[int, list] = {}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if id(n) in exclude or not is_elementwise(n):
            continue
        t = n.results[0].type
        merged = {id(n)}
        gids: list[int] = []
        for v in n.operands:
            p = producer.get(id(v))
            if p is None or id(p) not in group_of or group_of[id(p)] in gids:
                continue
            gid = group_of[id(p)]
            head = members[gid][0].results[0].type
            if head.shape != t.shape or head.device != t.device:
                continue
            trial = merged | {id(m) for m in members[gid]}
            if legal(trial):
                merged = trial
                gids.append(gid)
        new = gids[0] if gids else len(order) + len(members)
        nodes = [n] + [m for g in gids for m in members.pop(g)]
        members[new] = sorted(nodes, key=lambda m: order[id(m)])
        for m in nodes:
            group_of[id(m)] = new
    members = [members[k] for k in sorted(members, key=lambda k: order[id(members[k][0])])]
    return [_describe(graph, ms, users, producer) for ms in members]


def _describe(graph, ms, users, producer) -> FusionGroup:
    inside = {id(m) for m in ms}
    inputs, seen = [], set()
    for m in ms:
        for v in m.operands:
            if isinstance(v.type, ChainType):
                continue
            p = producer.get(id(v))
            if (p is None or id(p) not in inside) and id(v) not in seen:
                seen.add(id(v))
                inputs.append(v)
    graph_outs = {id(v) for v in graph.outputs}
    outputs = []
    for m in ms:
        r = m.results[0]
        used_outside = any(id(u) not in inside and any(o is r for o in u.operands)
                           for u in users.get(id(m), []))
        if used_outside or id(r) in graph_outs:
            outputs.append(r)
    return FusionGroup(list(ms), inputs, outputs)


@register_pass("elementwise-fusion")
def elementwise_fusion(graph) -> bool:
    """Record `graph.fusion_groups`; the IR itself is unchanged (returns False)."""
    graph.fusion_groups = find_groups(graph)
    return False
