"""How builders record ops: one call into the current graph."""
from __future__ import annotations

from graphir.graph import Graph
from graphir.value import TensorValue, Value, as_tensor


def graph_of(*vals) -> Graph:
    for v in vals:
        if isinstance(v, Value):
            return v.graph
    return Graph.current()


def apply(op: str, operands, **attrs):
    """Record op; returns one value or a list when the op has several results."""
    g = graph_of(*operands)
    res = g.apply(op, operands, attrs)
    return res[0] if len(res) == 1 else res


def tensors(*xs):
    """Turn Weights, arrays and scalars into TensorValues next to the first real value."""
    if not xs:
        raise ValueError("needs at least one tensor, got none")
    like = next((x for x in xs if isinstance(x, TensorValue)), None)
    if like is None:
        first = as_tensor(xs[0])
        return [first] + [as_tensor(x, like=first) for x in xs[1:]]
    return [as_tensor(x, like=like) for x in xs]
