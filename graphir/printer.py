"""The textual IR (.gir): stable, readable, parsed back by graphir.parser."""
from __future__ import annotations

import json
import math

import numpy as np

from .device import DeviceRef
from .dim import Dim
from .dtype import DType
from .types import ChainType


def format_attr(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _format_float(float(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, DType):
        return v.short
    if isinstance(v, DeviceRef):
        return str(v)
    if isinstance(v, Dim):
        return str(int(v)) if v.is_static else str(v)
    if isinstance(v, np.ndarray):
        return _format_dense(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if hasattr(v, "value") and isinstance(getattr(v, "value"), str):  # enums
        return json.dumps(v.value)
    raise TypeError(f"cannot print attribute value {v!r} ({type(v).__name__})")


def _format_float(f: float) -> str:
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    r = repr(f)
    return r if any(c in r for c in ".e") else r + ".0"


def _format_dense(a: np.ndarray) -> str:
    shape = ", ".join(str(d) for d in a.shape)
    flat = a.reshape(-1)
    if a.dtype.kind == "f":
        body = ", ".join(_format_float(float(x)) for x in flat)
    else:
        body = ", ".join(str(int(x)) for x in flat)
    return f"dense<[{shape}] : [{body}]>"


def _types(ts) -> str:
    ts = [str(t) for t in ts]
    return ts[0] if len(ts) == 1 else "(" + ", ".join(ts) + ")"


def _elided(a: np.ndarray) -> str:
    shape = ", ".join(str(d) for d in a.shape)
    return f"dense<[{shape}] : ...{a.size} values...>"


def print_graph(graph, locs: bool = False, elide_over: int | None = None) -> str:
    """The textual IR. `elide_over=N` prints dense constants of more than N elements as
    `dense<[shape] : ...K values...>` (for reading dumps; such text does not parse back)."""
    names: dict[int, str] = {}
    args = []
    for i, v in enumerate(graph.inputs):
        nm = graph.input_names[i] if graph.input_names else f"arg{i}"
        names[id(v)] = "%" + nm
        args.append(f"%{nm}: {v.type}")
    lines = [f"graph @{graph.name}(" + ", ".join(args) + ") {"]
    counter = 0
    for n in graph.nodes:
        res = []
        for r in n.results:
            names[id(r)] = f"%{counter}"
            res.append(f"%{counter}")
            counter += 1
        try:
            ops = ", ".join(names[id(v)] for v in n.operands)
        except KeyError:
            raise ValueError(f"gir.{n.op} uses a value defined after it or outside the graph") from None
        text = "  " + (", ".join(res) + " = " if res else "") + f"gir.{n.op}"
        if n.operands:
            text += f"({ops})"
        attrs = {k: v for k, v in n.attrs.items() if v is not None}
        if attrs:
            text += " {" + ", ".join(
                f"{k} = {_elided(attrs[k]) if _big(attrs[k], elide_over) else format_attr(attrs[k])}"
                for k in sorted(attrs)) + "}"
        if n.results:
            text += " : " + _types(r.type for r in n.results)
        if locs and n.loc:
            text += f" loc({json.dumps(n.loc)})"
        lines.append(text)
    outs = ", ".join(names.get(id(v), "%?") for v in graph.outputs)
    lines.append(f"  gir.output {outs}".rstrip())
    lines.append("}")
    return "\n".join(lines) + "\n"


def _big(v, limit: int | None) -> bool:
    return limit is not None and isinstance(v, np.ndarray) and v.size > limit


__all__ = ["print_graph", "format_attr", "ChainType"]
