"""Symbolic values: what ops take and return while a graph is being built."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .device import DeviceRef
from .dim import Dim
from .dtype import DType
from .types import BufferType, ChainType, TensorType, Type

if TYPE_CHECKING:
    from .graph import Graph, Node


class Value:
    """An SSA value: a graph input (node is None) or result `index` of `node`."""

    __slots__ = ("graph", "node", "index", "type", "__weakref__")

    def __init__(self, graph: "Graph", node: "Node | None", index: int, type: Type):
        self.graph = graph
        self.node = node
        self.index = index
        self.type = type

    def __repr__(self) -> str:
        where = f"input {self.index}" if self.node is None else f"gir.{self.node.op}#{self.index}"
        return f"{type(self).__name__}({where}: {self.type})"


class ChainValue(Value):
    """The side-effect token."""

    __slots__ = ()


class _Shaped(Value):
    __slots__ = ()

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.type.shape

    @property
    def device(self) -> DeviceRef:
        return self.type.device

    @property
    def rank(self) -> int:
        return len(self.type.shape)


class BufferValue(_Shaped):
    """A mutable buffer (e.g. the paged KV-cache blocks); written only by chained ops."""

    __slots__ = ()

    def __getitem__(self, index):
        raise TypeError("buffers are read through ops (e.g. ops.buffer_load), not by indexing")


class TensorValue(_Shaped):
    """An immutable tensor. Operators record ops in the value's graph.

    Example:
        >>> with Graph("g", input_types=[TensorType(DType.float32, [4, 8])]) as g:
        ...     x = g.inputs[0]
        ...     g.output((x * 2.0 + 1.0).T)
    """

    __slots__ = ()
    # numpy must not turn a value into an object array: `array @ x` and `array * x` defer to
    # TensorValue's reflected operators.
    __array_ufunc__ = None

    # -- shape helpers ---------------------------------------------------------------------
    @property
    def T(self) -> "TensorValue":
        if self.rank < 2:
            raise ValueError(f"T needs rank >= 2, got shape {_fmt(self.shape)}")
        return self.transpose(-1, -2)

    def transpose(self, dim_1: int, dim_2: int) -> "TensorValue":
        perm = list(range(self.rank))
        where = f"gir.permute (transpose of {_fmt(self.shape)})"
        a, b = _axis(dim_1, self.rank, where), _axis(dim_2, self.rank, where)
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(perm)

    def permute(self, dims: Sequence[int]) -> "TensorValue":
        return _op1("permute", [self], dims=tuple(int(d) for d in dims))

    def reshape(self, shape: Sequence) -> "TensorValue":
        return _op1("reshape", [self], shape=tuple(Dim(d) if not isinstance(d, int) or d >= 0
                                                   else d for d in shape))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "TensorValue":
        s, e = _axis(start_dim, self.rank, "flatten"), _axis(end_dim, self.rank, "flatten")
        merged = Dim(1)
        for d in self.shape[s:e + 1]:
            merged = merged * d
        return self.reshape(list(self.shape[:s]) + [merged] + list(self.shape[e + 1:]))

    def cast(self, dtype: DType) -> "TensorValue":
        return _op1("cast", [self], dtype=dtype)

    def to(self, device: DeviceRef) -> "TensorValue":
        return _op1("transfer_to", [self], device=device)

    def broadcast_to(self, shape: Sequence) -> "TensorValue":
        return _op1("broadcast_to", [self], shape=tuple(Dim(d) for d in shape))

    def __getitem__(self, index) -> "TensorValue":
        from .indexing import getitem

        return getitem(self, index)

    def __iter__(self):
        # Without this, Python would iterate through __getitem__ until an IndexError, which a
        # symbolic first dimension never raises: an endless loop recording ops.
        raise TypeError(f"a TensorValue ({self.type}) is not iterable; index it (x[i]) or use "
                        f"ops.split to take it apart")

    # -- arithmetic ------------------------------------------------------------------------
    def __add__(self, o): return _bin("add", self, o)
    def __radd__(self, o): return _bin("add", o, self)
    def __sub__(self, o): return _bin("sub", self, o)
    def __rsub__(self, o): return _bin("sub", o, self)
    def __mul__(self, o): return _bin("mul", self, o)
    def __rmul__(self, o): return _bin("mul", o, self)
    def __truediv__(self, o): return _bin("div", self, o)
    def __rtruediv__(self, o): return _bin("div", o, self)
    def __pow__(self, o): return _bin("pow", self, o)
    def __rpow__(self, o): return _bin("pow", o, self)
    def __matmul__(self, o): return _op1("matmul", [self, as_tensor(o, like=self)])
    def __rmatmul__(self, o): return _op1("matmul", [as_tensor(o, like=self), self])
    def __neg__(self): return _op1("neg", [self])
    def __abs__(self): return _op1("abs", [self])
    def __gt__(self, o): return _bin("greater", self, o)
    def __ge__(self, o): return _bin("greater_equal", self, o)
    def __lt__(self, o): return _bin("greater", o, self)
    def __le__(self, o): return _bin("greater_equal", o, self)

    # Equality stays identity-based: values are dict keys throughout the compiler.
    __hash__ = Value.__hash__

    def __eq__(self, other):
        return self is other

    def __bool__(self):
        raise TypeError("a symbolic TensorValue has no truth value")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _axis(a: int, rank: int, op: str) -> int:
    if not -rank <= a < rank:
        raise ValueError(f"{op}: axis {a} out of range for rank {rank}")
    return a % rank


def _current(*vals) -> "Graph":
    from .graph import Graph

    for v in vals:
        if isinstance(v, Value):
            return v.graph
    return Graph.current()


def as_tensor(x, like: TensorValue | None = None, dtype: DType | None = None,
              device: DeviceRef | None = None) -> TensorValue:
    """A TensorValue for x: values pass through, Weights materialize, scalars and arrays become
    constants (dtype and device taken from `like` when given)."""
    if isinstance(x, TensorValue):
        return x
    if isinstance(x, Value):
        raise TypeError(f"expected a tensor, got {x!r}")
    if hasattr(x, "__tensor_value__"):
        return x.__tensor_value__()
    g = _current(like)
    if isinstance(x, (bool, int, float, np.generic)) or isinstance(x, np.ndarray):
        arr = np.asarray(x)
        if dtype is None:
            if like is not None and (like.dtype.is_float or arr.dtype.kind in "iub"):
                dtype = like.dtype
            else:
                dtype = DType.float32 if arr.dtype.kind == "f" else DType.from_numpy(arr.dtype)
        dev = device or (like.device if like is not None else DeviceRef.CPU())
        return g.constant(arr, dtype, dev)
    raise TypeError(f"cannot use {type(x).__name__} {x!r} as a tensor")


def _op1(op: str, operands, **attrs) -> TensorValue:
    g = _current(*operands)
    return g.apply(op, operands, attrs)[0]


def _bin(op: str, a, b) -> TensorValue:
    like = a if isinstance(a, TensorValue) else b
    return _op1(op, [as_tensor(a, like=like), as_tensor(b, like=like)])


__all__ = ["Value", "TensorValue", "BufferValue", "ChainValue", "as_tensor",
           "TensorType", "BufferType", "ChainType"]
