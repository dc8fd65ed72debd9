"""Reductions (keeping the reduced axis as size 1, as MAX does) and softmax."""
from __future__ import annotations

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors

_REDUCE = {"sum": np.sum, "mean": np.mean, "reduce_max": np.max, "reduce_min": np.min}


def _reduce_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    if t.rank == 0:
        raise ValueError("cannot reduce a rank-0 tensor")
    ax = R.axis(attrs["axis"], t.rank)
    shape = list(t.shape)
    shape[ax] = Dim(1)
    return [R.like(t, shape=shape)]


def _argmax_rule(ins, attrs):
    (out,) = _reduce_rule(ins, attrs)
    return [R.like(out, dtype=DType.int64)]


def _softmax_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    if not t.dtype.is_float:
        raise ValueError(f"softmax needs a float operand, got {t.dtype.short}")
    R.axis(attrs["axis"], t.rank)
    return [R.like(t)]


def _softmax_ref(ins, a):
    x = ins[0]
    m = np.max(x, axis=a["axis"], keepdims=True)
    e = np.exp(x - m)
    return [e / np.sum(e, axis=a["axis"], keepdims=True)]


for _n, _f in _REDUCE.items():
    register(OpDef(_n, _reduce_rule,
                   (lambda f: lambda ins, a: [f(ins[0], axis=a["axis"], keepdims=True)])(_f),
                   attr_names=("axis",), traits=frozenset({"reduction"})))
register(OpDef("argmax", _argmax_rule,
               lambda ins, a: [np.expand_dims(np.argmax(ins[0], axis=a["axis"]), a["axis"])],
               attr_names=("axis",), traits=frozenset({"reduction"})))
register(OpDef("softmax", _softmax_rule, _softmax_ref, attr_names=("axis",)))


def sum(x, axis: int = -1):
    """Sum over axis (kept as size 1)."""
    (x,) = tensors(x)
    return apply("sum", [x], axis=axis)


def mean(x, axis: int = -1):
    """Mean over axis (kept as size 1)."""
    (x,) = tensors(x)
    return apply("mean", [x], axis=axis)


def max(x, y=None, /, axis: int | None = None):
    """With two tensors: elementwise maximum; with one: the max over axis (default -1)."""
    if y is not None:
        from .elementwise import maximum
        return maximum(x, y)
    (x,) = tensors(x)
    return apply("reduce_max", [x], axis=-1 if axis is None else axis)


def min(x, y=None, /, axis: int | None = None):
    """With two tensors: elementwise minimum; with one: the min over axis (default -1)."""
    if y is not None:
        from .elementwise import minimum
        return minimum(x, y)
    (x,) = tensors(x)
    return apply("reduce_min", [x], axis=-1 if axis is None else axis)


def argmax(x, axis: int = -1):
    """Index of the maximum over axis (kept as size 1), int64."""
    (x,) = tensors(x)
    return apply("argmax", [x], axis=axis)


def softmax(value, axis: int = -1):
    """Numerically stable softmax over axis."""
    (x,) = tensors(value)
    return apply("softmax", [x], axis=axis)
