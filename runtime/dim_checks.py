"""Run-time checks of what a graph's symbolic dimensions promise.

A graph built over symbolic dims (`x[5]` on `[m, 4]`, a slice `x[: n - 1]`) is typed before the
sizes are known, so its type rules could not check that index 5 exists or that `n - 1` is not
negative. Once a call binds the dims, `DimCheck(graph).check(env)` does: every slice stays inside
its input (0 <= start <= stop <= size on every axis) and every value's shape is non-negative. The
compiled kernels index with these numbers unchecked, so a runtime calls this before any kernel.
The constraints are collected once per graph; a check is a few integer evaluations.
"""
from __future__ import annotations

from typing import Mapping

from graphir.dim import Dim
from graphir.types import ChainType


class DimCheck:
    """The size constraints of one graph that only a call's dims can decide."""

    def __init__(self, graph):
        self._slices = []   # (node description, axis, start, stop, size)
        self._shapes = []   # (node description, result index, dim)
        seen: set[Dim] = set()
        for n in graph.nodes:
            where = f"gir.{n.op}" + (f" (at {n.loc})" if getattr(n, "loc", None) else "")
            if n.op == "slice":
                t = n.operands[0].type
                for ax, (a, b) in enumerate(zip(n.attrs["starts"], n.attrs["stops"])):
                    a, b, size = Dim(a), Dim(b), t.shape[ax]
                    if not (a.is_static and b.is_static and size.is_static):
                        self._slices.append((where, ax, a, b, size))
            for i, r in enumerate(n.results):
                if isinstance(r.type, ChainType):
                    continue
                for d in r.type.shape:
                    if not d.is_static and d not in seen and _may_be_negative(d):
                        seen.add(d)
                        self._shapes.append((where, i, d))

    def __bool__(self) -> bool:
        return bool(self._slices or self._shapes)

    def check(self, env: Mapping[str, int]) -> None:
        """Raise ValueError naming the op, the axis and the bound sizes on the first violation."""
        for where, ax, a, b, size in self._slices:
            start, stop, n = a.evaluate(env), b.evaluate(env), size.evaluate(env)
            if not 0 <= start <= stop <= n:
                raise ValueError(f"{where}: slice [{a}:{b}] = [{start}:{stop}] is out of range for "
                                 f"axis {ax} of size {size} = {n} ({_bound(env, a, b, size)})")
        for where, i, d in self._shapes:
            if d.evaluate(env) < 0:
                raise ValueError(f"{where}: result {i} has a dimension {d} = {d.evaluate(env)} < 0 "
                                 f"({_bound(env, d)})")


def _may_be_negative(d: Dim) -> bool:
    # A sum of symbols with non-negative coefficients is never negative.
    return any(c < 0 for c in d._terms.values())


def _bound(env: Mapping[str, int], *dims: Dim) -> str:
    names = sorted(set().union(*(d.symbols for d in dims)))
    return ", ".join(f"{s} = {env[s]}" for s in names if s in env) or "static"
