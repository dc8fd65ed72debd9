"""Elementwise ops: unary math, binary arithmetic with numpy broadcasting, compare, where,
clamp and cast. One table row per op: name and float64 numpy reference."""
from __future__ import annotations

import math

import numpy as np

from graphir.dtype import DType
from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x, a):
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


_UNARY = {
    "neg": lambda x, a: -x,
    "abs": lambda x, a: np.abs(x),
    "exp": lambda x, a: np.exp(x),
    "log": lambda x, a: np.log(x),
    "sqrt": lambda x, a: np.sqrt(x),
    "rsqrt": lambda x, a: 1.0 / np.sqrt(x),
    "tanh": lambda x, a: np.tanh(x),
    "sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "silu": lambda x, a: x / (1.0 + np.exp(-x)),
    "gelu": _gelu,
    "cos": lambda x, a: np.cos(x),
    "sin": lambda x, a: np.sin(x),
    "floor": lambda x, a: np.floor(x),
}
_FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "gelu", "cos", "sin"}

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": None, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "mod": None,
}
_COMPARE = {"greater": np.greater, "greater_equal": np.greater_equal, "equal": np.equal,
            "not_equal": np.not_equal}
_LOGICAL = {"logical_and": np.logical_and, "logical_or": np.logical_or}


def _div(a, b, attrs):
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        return np.floor_divide(a, b)
    return np.divide(a, b)


def _mod(a, b, attrs):
    return np.mod(a, b)


def _unary_rule(name):
    def rule(ins, attrs):
        (t,) = ins
        R.tensor(t)
        if name in _FLOAT_ONLY and not t.dtype.is_float:
            raise ValueError(f"needs a float operand, got {t.dtype.short}")
        if t.dtype is DType.bool:
            raise ValueError(f"needs a numeric operand, got {t.dtype.short}")
        return [R.like(t)]
    return rule


def _binary_rule(result_dtype=None, bool_operands=False, numeric=False):
    def rule(ins, attrs):
        a, b = (R.tensor(t) for t in ins)
        dt = R.same_dtype([a, b])
        if bool_operands and dt is not DType.bool:
            raise ValueError(f"needs bool operands, got {dt.short}")
        if numeric and dt is DType.bool:
            raise ValueError(f"needs numeric operands, got {dt.short}")
        dev = R.same_device([a, b])
        return [R.like(a, dtype=result_dtype or dt, shape=R.broadcast_shapes(a.shape, b.shape),
                       device=dev)]
    return rule


for _n, _f in _UNARY.items():
    register(OpDef(_n, _unary_rule(_n), (lambda f: lambda ins, a: [f(ins[0], a)])(_f),
                   traits=frozenset({"elementwise"})))
for _n, _f in _BINARY.items():
    _ref = {"div": _div, "mod": _mod}.get(_n) or (lambda f: lambda x, y, a: f(x, y))(_f)
    register(OpDef(_n, _binary_rule(numeric=_n not in ("maximum", "minimum")), (lambda r: lambda ins, a: [r(ins[0], ins[1], a)])(_ref),
                   traits=frozenset({"elementwise"})))
for _n, _f in {**_COMPARE, **_LOGICAL}.items():
    register(OpDef(_n, _binary_rule(DType.bool, bool_operands=_n in _LOGICAL),
                   (lambda f: lambda ins, a: [f(ins[0], ins[1])])(_f),
                   traits=frozenset({"elementwise"})))


def _where_rule(ins, attrs):
    c, x, y = (R.tensor(t) for t in ins)
    if c.dtype is not DType.bool:
        raise ValueError(f"condition must be bool, got {c.dtype.short}")
    dt = R.same_dtype([x, y])
    dev = R.same_device([c, x, y])
    return [R.like(x, dtype=dt, shape=R.broadcast_shapes(c.shape, x.shape, y.shape), device=dev)]


register(OpDef("where", _where_rule, lambda ins, a: [np.where(ins[0], ins[1], ins[2])],
               traits=frozenset({"elementwise"})))


def _cast_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    if not isinstance(attrs.get("dtype"), DType):
        raise ValueError(f"cast needs a DType, got {attrs.get('dtype')!r}")
    return [R.like(t, dtype=attrs["dtype"])]


register(OpDef("cast", _cast_rule, lambda ins, a: [ins[0]], attr_names=("dtype",),
               traits=frozenset({"elementwise"})))


def _clamp_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    lo, hi = attrs.get("min"), attrs.get("max")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clamp min {lo} is greater than max {hi}")
    return [R.like(t)]


register(OpDef("clamp", _clamp_rule,
               lambda ins, a: [np.clip(ins[0], a.get("min"), a.get("max"))],
               attr_names=("min", "max"), traits=frozenset({"elementwise"})))


# -- builders (MAX names) --------------------------------------------------------------------
def _unary_builder(name):
    def f(x):
        (x,) = tensors(x)
        return apply(name, [x])
    f.__name__ = name
    f.__doc__ = f"Elementwise {name}. Example: `ops.{name}(x)`."
    return f


def _binary_builder(name):
    def f(lhs, rhs):
        a, b = tensors(lhs, rhs)
        return apply(name, [a, b])
    f.__name__ = name
    f.__doc__ = f"Elementwise {name} with numpy broadcasting. Example: `ops.{name}(a, b)`."
    return f


neg, abs, exp, log, sqrt, rsqrt, tanh, sigmoid, silu, cos, sin, floor = (
    _unary_builder(n) for n in ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid",
                                "silu", "cos", "sin", "floor"))
add, sub, mul, div, pow, maximum, minimum, mod = (
    _binary_builder(n) for n in ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "mod"))
greater, greater_equal, equal, not_equal, logical_and, logical_or = (
    _binary_builder(n) for n in ("greater", "greater_equal", "equal", "not_equal",
                                 "logical_and", "logical_or"))


def gelu(x, approximate: str = "none"):
    """GELU: exact (erf) or `approximate="tanh"`."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    (x,) = tensors(x)
    return apply("gelu", [x], approximate=approximate if approximate != "none" else None)


def where(condition, x, y):
    """Select x where condition else y (broadcasting)."""
    x, y = tensors(x, y)
    (c,) = tensors(condition)
    return apply("where", [c, x, y])


def cast(x, dtype: DType):
    """Convert x to dtype (floats round to nearest even; floats to ints truncate)."""
    (x,) = tensors(x)
    return apply("cast", [x], dtype=dtype)


def clamp(x, min: float | None = None, max: float | None = None):
    """Clamp x into [min, max]."""
    (x,) = tensors(x)
    return apply("clamp", [x], min=None if min is None else float(min),
                 max=None if max is None else float(max))
