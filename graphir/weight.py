"""Weight: a named parameter, bound at load time and never inlined into the graph."""
from __future__ import annotations

from typing import Sequence

from .device import DeviceRef
from .dim import Dim
from .dtype import DType
from .types import TensorType


class Weight:
    """A named parameter of a model. Used inside a graph it becomes one `gir.weight` node.

    Example:
        >>> w = Weight("q_proj.weight", DType.float32, [64, 32], DeviceRef.CPU())
        >>> with Graph("g", input_types=[TensorType(DType.float32, ["n", 32])]) as g:
        ...     g.output(g.inputs[0] @ w.T)
    """

    def __init__(self, name: str, dtype: DType, shape: Sequence, device: DeviceRef | None = None,
                 quantization_encoding=None, align: int | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"weight name must be a non-empty string, got {name!r}")
        self.name = name
        self.dtype = dtype
        self.shape = tuple(Dim(d) for d in shape)
        for d in self.shape:
            if not d.is_static:
                raise ValueError(f"weight {name!r} must have a static shape, got {list(map(str, self.shape))}")
        self.device = device or DeviceRef.CPU()
        self.quantization_encoding = quantization_encoding
        self.align = align

    @property
    def type(self) -> TensorType:
        return TensorType(self.dtype, self.shape, self.device)

    def __tensor_value__(self):
        from .graph import Graph

        return Graph.current().add_weight(self)

    def __getattr__(self, item):
        # Everything a TensorValue offers (T, reshape, operators via __tensor_value__) works
        # on a Weight inside a graph.
        if item.startswith("__"):
            raise AttributeError(item)
        return getattr(self.__tensor_value__(), item)

    def __repr__(self) -> str:
        return f"Weight({self.name!r}, {self.type})"

    def _bin(name):
        def f(self, other):
            return getattr(self.__tensor_value__(), name)(other)
        return f

    __add__, __radd__, __sub__, __rsub__ = _bin("__add__"), _bin("__radd__"), _bin("__sub__"), _bin("__rsub__")
    __mul__, __rmul__, __truediv__, __matmul__ = _bin("__mul__"), _bin("__rmul__"), _bin("__truediv__"), _bin("__matmul__")
    __rmatmul__, __rtruediv__, __pow__ = _bin("__rmatmul__"), _bin("__rtruediv__"), _bin("__pow__")
    __getitem__ = _bin("__getitem__")
    del _bin
    __array_ufunc__ = None  # `array @ weight` defers to the weight, as for TensorValue

    def __neg__(self):
        return -self.__tensor_value__()
