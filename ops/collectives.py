"""Collectives over tensors on distinct devices: allreduce (sum) and allgather.

Each takes one tensor per device and returns one result per device, result i on the device of
input i. The reference interpreter runs every device in-process, so the references are plain sums
and concatenations.

With the attribute `world_size = N` a collective is one process's part of a collective over N
processes (the rank graphs of graphir.runtime.distributed): one tensor in, one result out;
allgather's axis grows N-fold (equal pieces). Only a distributed runtime runs those.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors


def _inputs(ins, op: str):
    ts = [R.tensor(t) for t in ins]
    if not ts:
        raise ValueError(f"{op} needs at least one tensor")
    devs = [t.device for t in ts]
    if len(set(devs)) != len(devs):
        raise ValueError(f"{op} inputs must be on distinct devices, got {[str(d) for d in devs]}")
    R.same_dtype(ts)
    return ts


def _world(ts, attrs, op: str) -> int | None:
    w = attrs.get("world_size")
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"{op}: world_size must be a positive int, got {w!r}")
    if len(ts) != 1:
        raise ValueError(f"{op} with world_size (one process's part of a collective over {w} "
                         f"processes) takes one tensor, got {len(ts)}")
    return w


def _no_world(op: str, a) -> None:
    if a.get("world_size") is not None:
        raise ValueError(f"{op} with world_size = {a['world_size']} is one process's part of a "
                         f"collective over several processes; run it with "
                         f"graphir.runtime.distributed, not in one process")


def _allreduce_rule(ins, attrs):
    ts = _inputs(ins, "allreduce")
    _world(ts, attrs, "allreduce")
    for t in ts[1:]:
        if tuple(t.shape) != tuple(ts[0].shape):
            raise ValueError("allreduce inputs must have one shape, got "
                             + ", ".join(R.fmt(x.shape) for x in ts))
    return [R.like(t) for t in ts]


def _allreduce_ref(ins, a):
    _no_world("allreduce", a)
    total = np.sum(np.stack(ins), axis=0)
    return [total.copy() for _ in ins]


def _allgather_rule(ins, attrs):
    ts = _inputs(ins, "allgather")
    rank = ts[0].rank
    ax = R.axis(attrs["axis"], rank)
    world = _world(ts, attrs, "allgather")
    if world is not None:
        shape = list(ts[0].shape)
        shape[ax] = shape[ax] * world
        return [R.like(ts[0], shape=shape)]
    for t in ts[1:]:
        if t.rank != rank or any(t.shape[i] != ts[0].shape[i] for i in range(rank) if i != ax):
            raise ValueError(f"allgather on axis {ax}: shapes "
                             + ", ".join(R.fmt(x.shape) for x in ts) + " differ off that axis")
    shape = list(ts[0].shape)
    for t in ts[1:]:
        shape[ax] = shape[ax] + t.shape[ax]
    return [R.like(t, shape=shape) for t in ts]


def _allgather_ref(ins, a):
    _no_world("allgather", a)
    out = np.concatenate(ins, axis=a["axis"] % ins[0].ndim)
    return [out.copy() for _ in ins]


register(OpDef("allreduce", _allreduce_rule, _allreduce_ref, attr_names=("world_size",)))
register(OpDef("allgather", _allgather_rule, _allgather_ref, attr_names=("axis", "world_size")))


def allreduce(inputs: Sequence, signal_buffers: Sequence | None = None) -> list:
    """Sum of same-shaped tensors on distinct devices; one copy of the sum per device.

    `signal_buffers` is accepted for MAX compatibility and unused (no device sync needed here).

    Example:
        >>> outs = ops.allreduce([y0, y1])  # y0 on cpu:0, y1 on cpu:1
    """
    vals = tensors(*inputs)
    res = apply("allreduce", vals)
    return res if isinstance(res, list) else [res]


def allgather(inputs: Sequence, axis: int = 0) -> list:
    """Concatenation along `axis` of tensors on distinct devices; one copy per device.

    Example:
        >>> outs = ops.allgather([y0, y1], axis=0)
    """
    vals = tensors(*inputs)
    res = apply("allgather", vals, axis=axis)
    return res if isinstance(res, list) else [res]
