"""Graph and Node: an SSA list of op applications, built inside `with Graph(...)`."""
from __future__ import annotations

import contextvars
import os
import re
import sys
from typing import Callable, Iterable, Sequence

import numpy as np

from .device import DeviceRef
from .dtype import DType, round_to
from .opdef import lookup
from .printer import format_attr
from .types import BufferType, ChainType, TensorType, Type
from .value import BufferValue, ChainValue, TensorValue, Value

_CURRENT: contextvars.ContextVar["Graph | None"] = contextvars.ContextVar("graphir_graph",
                                                                          default=None)
# Frames inside these packages are compiler internals; the location of an op is the first
# frame outside them (the user's line).
_INTERNAL = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + p + os.sep
                  for p in ("graphir", "ops"))


_GRAPH_NAME = re.compile(r"[A-Za-z0-9_.]+\Z")
_INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")


class Node:
    """One op application. Nodes are created by Graph.apply / Graph.insert; passes replace
    them rather than mutate their op or attributes."""

    __slots__ = ("op", "operands", "attrs", "results", "loc")

    def __init__(self, op: str, operands: Sequence[Value], attrs: dict, loc: str | None = None):
        self.op = op
        self.operands = list(operands)
        self.attrs = dict(attrs)
        self.results: list[Value] = []
        self.loc = loc

    @property
    def opdef(self):
        return lookup(self.op)

    def __repr__(self) -> str:
        return f"Node(gir.{self.op}, {len(self.operands)} operands, attrs={self.attrs})"


def _user_location() -> str | None:
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_INTERNAL) and "contextlib" not in fn:
            return f"{os.path.basename(fn)}:{f.f_lineno}"
        f = f.f_back
    return None


def _make_value(graph, node, index, t: Type) -> Value:
    if isinstance(t, ChainType):
        return ChainValue(graph, node, index, t)
    if isinstance(t, BufferType):
        return BufferValue(graph, node, index, t)
    return TensorValue(graph, node, index, t)


class Graph:
    """A computation graph. Use as a context manager; ops called inside record nodes into it.

    Example:
        >>> with Graph("scale", input_types=[TensorType(DType.float32, ["n", 4])]) as g:
        ...     g.output(g.inputs[0] * 3.0)
        >>> print(g)  # the textual IR
    """

    def __init__(self, name: str, forward: Callable | None = None,
                 input_types: Iterable[Type] = (), *, input_names: Sequence[str] | None = None):
        if not isinstance(name, str) or not _GRAPH_NAME.match(name):
            raise ValueError(f"graph name must be ASCII letters, digits, '_' or '.', got {name!r}")
        self.name = name
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._chain: ChainValue | None = None
        self._weights: dict[str, Value] = {}
        self._tokens: list = []
        types = list(input_types)
        for t in types:
            if not isinstance(t, (TensorType, ChainType)):
                raise TypeError(f"graph input types must be TensorType/BufferType, got {t!r}")
        self.inputs: list[Value] = [_make_value(self, None, i, t) for i, t in enumerate(types)]
        self.input_names = list(input_names) if input_names else None
        if self.input_names is not None:
            # Results print as %0, %1, ...: an input name must not look like one, or the text
            # would be ambiguous.
            bad = [n for n in self.input_names if not isinstance(n, str) or not _INPUT_NAME.match(n)]
            if bad or len(set(self.input_names)) != len(self.input_names) \
                    or len(self.input_names) != len(self.inputs):
                raise ValueError(f"input_names must be {len(self.inputs)} distinct names starting "
                                 f"with a letter or '_', got {self.input_names}")
        if forward is not None:
            with self:
                out = forward(*self.inputs)
                self.output(*(out if isinstance(out, (list, tuple)) else [out]))

    # -- context -------------------------------------------------------------------------
    def __enter__(self) -> "Graph":
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _CURRENT.reset(self._tokens.pop())

    @staticmethod
    def current() -> "Graph":
        g = _CURRENT.get()
        if g is None:
            raise RuntimeError("no graph is being built: use ops inside `with Graph(...)`")
        return g

    # -- building ------------------------------------------------------------------------
    def apply(self, op: str, operands: Sequence[Value], attrs: dict | None = None) -> list[Value]:
        """Record `op` applied to operands; returns its results (the chain handled for effects)."""
        opdef = lookup(op)
        attrs = {k: v for k, v in (attrs or {}).items() if v is not None}
        operands = list(operands)
        for i, v in enumerate(operands):
            if not isinstance(v, Value):
                raise TypeError(f"gir.{op}: operand {i} is {type(v).__name__}, not a graph value")
            if v.graph is not self:
                raise ValueError(f"gir.{op}: operand {i} belongs to graph {v.graph.name!r}, "
                                 f"not {self.name!r}")
        if opdef.effects:
            operands.append(self.chain)
        loc = _user_location()
        shapes = lambda: ", ".join(str(v.type) for v in operands  # noqa: E731
                                   if not isinstance(v, ChainValue))
        where = f" (at {loc})" if loc else ""
        for k, v in attrs.items():
            try:
                format_attr(v)
            except TypeError:
                raise TypeError(f"gir.{op}: attribute {k} = {v!r:.80} is not a constant (an int, "
                                f"float, bool, str, DType, DeviceRef, Dim, array or a list of "
                                f"those){where}") from None
            if not _ints_fit(v):
                raise ValueError(f"gir.{op}: attribute {k} = {v!r:.80} holds an integer outside "
                                 f"the 64-bit range{where}")
        try:
            types = opdef.result_types([v.type for v in operands], attrs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"gir.{op}: {e}; operands: ({shapes()}){where}") from None
        except KeyError as e:
            raise ValueError(f"gir.{op}: missing attribute {e}; operands: ({shapes()}){where}") \
                from None
        except (IndexError, OverflowError, ZeroDivisionError) as e:
            # The type rule indexed or sized with a value the user gave (an index past a dim).
            raise ValueError(f"gir.{op}: {e}; operands: ({shapes()}){where}") from None
        node = Node(op, operands, attrs, loc)
        node.results = [_make_value(self, node, i, t) for i, t in enumerate(types)]
        self.nodes.append(node)
        if opdef.effects:
            self._chain = node.results[-1]
            return node.results[:-1]
        return node.results

    @property
    def chain(self) -> ChainValue:
        """The current side-effect token (created at the top of the graph on first use)."""
        if self._chain is None:
            node = Node("chain", [], {})
            node.results = [ChainValue(self, node, 0, ChainType())]
            self.nodes.insert(0, node)
            self._chain = node.results[0]
        return self._chain

    def constant(self, value, dtype: DType, device: DeviceRef | None = None) -> TensorValue:
        if not isinstance(dtype, DType):
            raise TypeError(f"gir.constant: dtype must be a DType, got {dtype!r}")
        device = DeviceRef.coerce(device) if device is not None else DeviceRef.CPU()
        try:
            arr = round_to(np.asarray(value), dtype)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"gir.constant: cannot make a {dtype.short} constant of "
                             f"{value!r:.60}: {e}") from None
        return self.apply("constant", [], {"value": arr, "dtype": dtype, "device": device})[0]

    def add_weight(self, weight) -> TensorValue:
        """The graph value of a Weight (one `gir.weight` node per name)."""
        if weight.name in self._weights:
            v = self._weights[weight.name]
            if v.type != weight.type:
                raise ValueError(f"weight {weight.name!r} used with two types: {v.type} "
                                 f"and {weight.type}")
            return v
        attrs = {"name": weight.name, "dtype": weight.dtype, "shape": tuple(weight.shape),
                 "device": weight.device}
        if weight.quantization_encoding is not None:
            attrs["encoding"] = str(weight.quantization_encoding)
        v = self.apply("weight", [], attrs)[0]
        self._weights[weight.name] = v
        return v

    def output(self, *values) -> None:
        from .value import as_tensor

        self.outputs = [v if isinstance(v, Value) else as_tensor(v) for v in values]
        self.verify()

    # -- analysis ------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, Value]:
        return {n.attrs["name"]: n.results[0] for n in self.nodes if n.op == "weight"}

    def verify(self) -> None:
        from .verifier import verify

        verify(self)

    def to_networkx(self):
        """A DiGraph over node indices (plus ('input', i) and 'output'); edges carry the value."""
        from .optional import require

        nx = require("networkx", "Graph.to_networkx")

        g = nx.DiGraph()
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for i in range(len(self.inputs)):
            g.add_node(("input", i), op="input")
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op, node=n)
            for v in n.operands:
                src = ("input", v.index) if v.node is None else index[id(v.node)]
                g.add_edge(src, i, value=v)
        g.add_node("output", op="output")
        for v in self.outputs:
            src = ("input", v.index) if v.node is None else index[id(v.node)]
            g.add_edge(src, "output", value=v)
        return g

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> nodes using it (the graph's output counts as no node)."""
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.operands:
                out.setdefault(id(v), []).append(n)
        return out

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.operands = [new if v is old else v for v in n.operands]
        self.outputs = [new if v is old else v for v in self.outputs]
        if self._chain is old:
            self._chain = new

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return str(self)


def _ints_fit(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_ints_fit(x) for x in v)
    return not isinstance(v, int) or -2 ** 63 <= v < 2 ** 64


def make_node(graph: Graph, op: str, operands: Sequence[Value], attrs: dict,
              loc: str | None = None, result_types: Sequence[Type] | None = None) -> Node:
    """A node not yet placed in graph.nodes (for passes and the parser)."""
    node = Node(op, operands, {k: v for k, v in attrs.items() if v is not None}, loc)
    if result_types is None:
        result_types = lookup(op).result_types([v.type for v in operands], node.attrs)
    node.results = [_make_value(graph, node, i, t) for i, t in enumerate(result_types)]
    return node

