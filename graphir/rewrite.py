"""The pattern-rewrite engine: named (pattern -> rewrite) rules applied to a fixpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .graph import Graph, Node, make_node
from .value import Value


class Rewriter:
    """What a pattern may do to the graph while it is being walked."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.changed = False

    def create(self, op: str, operands: Sequence[Value], attrs: dict | None = None, *,
               before: Node, loc: str | None = None) -> list[Value]:
        """Insert a new node just before `before`; returns its results (incl. a chain)."""
        node = make_node(self.graph, op, operands, attrs or {}, loc or before.loc)
        self.graph.nodes.insert(self.graph.nodes.index(before), node)
        self.changed = True
        return node.results

    def replace(self, node: Node, new_values: Sequence[Value]) -> None:
        """Redirect every use of node's results to new_values, then drop node."""
        if len(new_values) != len(node.results):
            raise ValueError(f"replacing gir.{node.op}: {len(node.results)} results, "
                             f"{len(new_values)} replacements")
        for old, new in zip(node.results, new_values):
            if old is not new:
                self.graph.replace_all_uses(old, new)
        self.erase(node)

    def erase(self, node: Node) -> None:
        self.graph.nodes.remove(node)
        self.changed = True


@dataclass(frozen=True)
class Pattern:
    """A named rule: `rewrite(node, rewriter)` returns True when it changed the graph."""

    name: str
    rewrite: Callable[[Node, Rewriter], bool]
    ops: frozenset | None = None  # only try nodes of these ops (None: all)


def apply_patterns(graph: Graph, patterns: Sequence[Pattern], max_iterations: int = 50) -> bool:
    """Apply patterns until none fires; returns whether anything changed."""
    any_change = False
    for _ in range(max_iterations):
        rw = Rewriter(graph)
        for node in list(graph.nodes):
            if node not in graph.nodes:  # erased by an earlier rewrite this sweep
                continue
            for p in patterns:
                if p.ops is not None and node.op not in p.ops:
                    continue
                if p.rewrite(node, rw):
                    break
        if not rw.changed:
            return any_change
        any_change = True
    raise RuntimeError(f"rewrites did not reach a fixpoint in {max_iterations} sweeps")
