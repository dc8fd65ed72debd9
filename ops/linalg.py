"""matmul (batched, numpy broadcasting over batch axes, transpose flags)."""
from __future__ import annotations

import numpy as np

from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors


def _matmul_rule(ins, attrs):
    a, b = (R.tensor(t) for t in ins)
    dt, dev = R.same_dtype([a, b]), R.same_device([a, b])
    if a.rank < 1 or b.rank < 2:
        raise ValueError(f"matmul needs lhs rank >= 1 and rhs rank >= 2, got {R.fmt(a.shape)} @ {R.fmt(b.shape)}")
    if attrs.get("transpose_a") and a.rank < 2:
        raise ValueError(f"matmul transpose_a needs lhs rank >= 2, got {R.fmt(a.shape)}")
    ash = list(a.shape) if a.rank >= 2 else [1] + list(a.shape)
    bsh = list(b.shape)
    if attrs.get("transpose_a"):
        ash[-1], ash[-2] = ash[-2], ash[-1]
    if attrs.get("transpose_b"):
        bsh[-1], bsh[-2] = bsh[-2], bsh[-1]
    if ash[-1] != bsh[-2]:
        raise ValueError(f"contracting dims differ: {R.fmt(a.shape)} @ {R.fmt(b.shape)}"
                         + (" (transpose_b)" if attrs.get("transpose_b") else ""))
    batch = R.broadcast_shapes(ash[:-2], bsh[:-2])
    out = list(batch) + ([ash[-2]] if a.rank >= 2 else []) + [bsh[-1]]
    return [R.like(a, dtype=dt, shape=out, device=dev)]


def _matmul_ref(ins, attrs):
    a, b = ins
    if attrs.get("transpose_a"):
        a = np.swapaxes(a, -1, -2)
    if attrs.get("transpose_b"):
        b = np.swapaxes(b, -1, -2)
    return [np.matmul(a, b)]


register(OpDef("matmul", _matmul_rule, _matmul_ref, attr_names=("transpose_a", "transpose_b")))


def matmul(lhs, rhs, *, transpose_a: bool = False, transpose_b: bool = False):
    """Matrix product with numpy batch broadcasting; `transpose_b=True` computes lhs @ rhs^T
    without materializing the transpose (weights are stored [out, in]).

    Example:
        >>> y = ops.matmul(x, w, transpose_b=True)
    """
    a, b = tensors(lhs, rhs)
    return apply("matmul", [a, b], transpose_a=transpose_a or None, transpose_b=transpose_b or None)
