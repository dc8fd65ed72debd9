"""Shared pieces of type rules: shape formatting, broadcasting, dtype and device checks."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.types import BufferType, TensorType


def fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def tensor(t, what: str = "operand") -> TensorType:
    if not isinstance(t, TensorType):
        raise ValueError(f"{what} must be a tensor, got {t}")
    return t


def same_device(ts: Sequence[TensorType]):
    devs = {t.device for t in ts}
    if len(devs) > 1:
        raise ValueError(f"operands are on different devices: {sorted(map(str, devs))}")
    return ts[0].device


def same_dtype(ts: Sequence[TensorType]) -> DType:
    dts = {t.dtype for t in ts}
    if len(dts) > 1:
        raise ValueError(f"operand dtypes differ: {', '.join(t.dtype.short for t in ts)}")
    return ts[0].dtype


def broadcast_shapes(*shapes) -> tuple[Dim, ...]:
    """numpy broadcasting over (possibly symbolic) dims."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        ds = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        non1 = [d for d in ds if d != 1]
        if not non1:
            out.append(Dim(1))
            continue
        if any(d != non1[0] for d in non1):
            raise ValueError("shapes " + " and ".join(fmt(s) for s in shapes)
                             + " do not broadcast")
        out.append(non1[0])
    return tuple(out)


def axis(a: int, rank: int) -> int:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {a!r}")
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"axis {a} is out of range for rank {rank}")
    return int(a) % max(rank, 1)


def like(t: TensorType, dtype=None, shape=None, device=None) -> TensorType:
    cls = TensorType  # results of ops are values, never buffers
    return cls(dtype or t.dtype, t.shape if shape is None else shape, device or t.device)


def is_buffer(t) -> bool:
    return isinstance(t, BufferType)


def product(dims) -> Dim:
    p = Dim(1)
    for d in dims:
        p = p * d
    return p
