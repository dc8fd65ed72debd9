"""Shape ops: reshape, permute/transpose, broadcast_to, concat, split, slice, gather, scatter."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors

_INDEX_DTYPES = (DType.int32, DType.int64, DType.uint32)


def _reshape_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    shape = list(attrs["shape"])
    total = R.product(t.shape)
    holes = [i for i, d in enumerate(shape) if isinstance(d, int) and d == -1]
    if len(holes) > 1:
        raise ValueError(f"reshape to {R.fmt(shape)}: at most one -1")
    if holes:
        known = R.product(d for d in shape if not (isinstance(d, int) and d == -1))
        q = total.exact_div(known) if known != 0 else None
        if q is None:
            raise ValueError(f"cannot infer -1 reshaping {R.fmt(t.shape)} to {R.fmt(shape)}")
        shape[holes[0]] = q
    new = [Dim(d) for d in shape]
    if R.product(new) != total:
        raise ValueError(f"cannot reshape {R.fmt(t.shape)} ({total} elements) to {R.fmt(new)}")
    return [R.like(t, shape=new)]


def _reshape_ref(ins, a):
    return [ins[0].reshape(a["_out_shapes"][0])]


def _permute_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    perm = [int(p) for p in attrs["dims"]]
    if sorted(p % max(t.rank, 1) if -t.rank <= p < t.rank else -99 for p in perm) != list(range(t.rank)):
        raise ValueError(f"permutation {perm} is not a permutation of rank {t.rank}")
    return [R.like(t, shape=[t.shape[p] for p in perm])]


def _broadcast_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    shape = tuple(Dim(d) for d in attrs["shape"])
    try:
        ok = len(shape) >= t.rank and R.broadcast_shapes(t.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"cannot broadcast {R.fmt(t.shape)} to {R.fmt(shape)}")
    return [R.like(t, shape=shape)]


def _concat_rule(ins, attrs):
    ts = [R.tensor(t) for t in ins]
    if not ts:
        raise ValueError("concat needs at least one tensor")
    dt, dev = R.same_dtype(ts), R.same_device(ts)
    ranks = {t.rank for t in ts}
    if len(ranks) != 1:
        raise ValueError("concat operands have different ranks: "
                         + ", ".join(R.fmt(t.shape) for t in ts))
    if ranks == {0}:
        raise ValueError("concat needs tensors of rank >= 1, got scalars")
    ax = R.axis(attrs["axis"], ts[0].rank)
    for t in ts[1:]:
        if any(t.shape[i] != ts[0].shape[i] for i in range(t.rank) if i != ax):
            raise ValueError(f"concat on axis {ax}: shapes "
                             + ", ".join(R.fmt(x.shape) for x in ts) + " differ off that axis")
    shape = list(ts[0].shape)
    shape[ax] = R.product([]) * 0
    for t in ts:
        shape[ax] = shape[ax] + t.shape[ax]
    return [R.like(ts[0], dtype=dt, shape=shape, device=dev)]


def _split_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    if t.rank == 0:
        raise ValueError("split needs a tensor of rank >= 1, got a scalar")
    ax = R.axis(attrs["axis"], t.rank)
    sizes = [Dim(s) for s in attrs["sizes"]]
    total = Dim(0)
    for s in sizes:
        total = total + s
    if total != t.shape[ax]:
        raise ValueError(f"split sizes {[str(s) for s in sizes]} sum to {total}, "
                         f"not axis {ax} of {R.fmt(t.shape)}")
    out = []
    for s in sizes:
        shape = list(t.shape)
        shape[ax] = s
        out.append(R.like(t, shape=shape))
    return out


def _split_ref(ins, a):
    x = ins[0]
    ax = a["axis"] % x.ndim
    cuts = np.cumsum([int(s) for s in a["sizes"]])[:-1]
    return list(np.split(x, cuts, axis=ax))


def _slice_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    starts, stops, steps = attrs["starts"], attrs["stops"], attrs["steps"]
    if not len(starts) == len(stops) == len(steps) == t.rank:
        raise ValueError(f"slice needs one start/stop/step per axis of {R.fmt(t.shape)}")
    shape = []
    for i, (a, b, s) in enumerate(zip(starts, stops, steps)):
        a, b, s = Dim(a), Dim(b), int(s)
        if s <= 0:
            raise ValueError(f"slice step must be positive, got {s} on axis {i}")
        n = b - a
        if n.is_static and int(n) < 0 or (t.shape[i].is_static and b.is_static
                                          and int(b) > int(t.shape[i])):
            raise ValueError(f"slice [{a}:{b}] is out of range for axis {i} of {R.fmt(t.shape)}")
        shape.append(n if s == 1 else Dim(-(-int(n) // s)))
    return [R.like(t, shape=shape)]


def _slice_ref(ins, a):
    idx = tuple(slice(int(x), int(y), int(s)) for x, y, s in zip(a["starts"], a["stops"], a["steps"]))
    return [ins[0][idx]]


def _gather_rule(ins, attrs):
    t, idx = (R.tensor(x) for x in ins)
    if idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"gather indices must be integers, got {idx.dtype.short}")
    R.same_device([t, idx])
    ax = R.axis(attrs["axis"], t.rank)
    return [R.like(t, shape=list(t.shape[:ax]) + list(idx.shape) + list(t.shape[ax + 1:]))]


def _check_index(i, n, what):
    i = np.asarray(i).astype(np.int64)
    if i.size and (i.min() < -n or i.max() >= n):
        raise IndexError(f"{what}: index out of range [{-n}, {n}) (got {i.min()}..{i.max()})")
    return np.where(i < 0, i + n, i)


def _gather_ref(ins, a):
    x, i = ins
    ax = a["axis"] % x.ndim
    return [np.take(x, _check_index(i, x.shape[ax], "gather"), axis=ax)]


def _scatter_rule(ins, attrs):
    t, upd, idx = (R.tensor(x) for x in ins)
    if idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"scatter indices must be integers, got {idx.dtype.short}")
    if upd.dtype != t.dtype:
        raise ValueError(f"scatter updates dtype {upd.dtype.short} differs from input {t.dtype.short}")
    if tuple(upd.shape) != tuple(idx.shape) or upd.rank != t.rank:
        raise ValueError(f"scatter updates {R.fmt(upd.shape)} and indices {R.fmt(idx.shape)} "
                         f"must match and have the input's rank {t.rank}")
    ax = R.axis(attrs["axis"], t.rank)
    for d in range(t.rank):
        if d != ax and t.shape[d].is_static and idx.shape[d].is_static and int(idx.shape[d]) > int(t.shape[d]):
            raise ValueError(f"scatter indices {R.fmt(idx.shape)} exceed input {R.fmt(t.shape)} "
                             f"on axis {d}")
    R.same_device([t, upd, idx])
    return [R.like(t)]


def _scatter_ref(ins, a):
    x, upd, idx = ins
    out = np.array(x, copy=True)
    ax = a["axis"] % x.ndim
    i = _check_index(idx, x.shape[ax], "scatter")
    # out[..., i[p], ...] = upd[p] for every position p of the (possibly smaller) index tensor.
    where = list(np.indices(i.shape, sparse=True))
    where[ax] = i
    out[tuple(where)] = upd
    return [out]


register(OpDef("reshape", _reshape_rule, _reshape_ref, attr_names=("shape",)))
register(OpDef("permute", _permute_rule,
               lambda ins, a: [np.transpose(ins[0], [int(p) for p in a["dims"]])], attr_names=("dims",)))
register(OpDef("broadcast_to", _broadcast_rule,
               lambda ins, a: [np.broadcast_to(ins[0], a["_out_shapes"][0]).copy()],
               attr_names=("shape",)))
register(OpDef("concat", _concat_rule,
               lambda ins, a: [np.concatenate(ins, axis=a["axis"] % ins[0].ndim)], attr_names=("axis",)))
register(OpDef("split", _split_rule, _split_ref, attr_names=("axis", "sizes")))
register(OpDef("slice", _slice_rule, _slice_ref, attr_names=("starts", "stops", "steps")))
register(OpDef("gather", _gather_rule, _gather_ref, attr_names=("axis",)))
register(OpDef("scatter", _scatter_rule, _scatter_ref, attr_names=("axis",)))


# -- builders --------------------------------------------------------------------------------
def reshape(x, shape: Sequence):
    """Reshape x (one -1 allowed). Example: `ops.reshape(x, [n, 32, 128])`."""
    (x,) = tensors(x)
    return x.reshape(shape)


def permute(x, dims: Sequence[int]):
    """Reorder axes: result axis i is input axis dims[i]."""
    (x,) = tensors(x)
    return x.permute(dims)


def transpose(x, dim_1: int, dim_2: int):
    """Swap two axes."""
    (x,) = tensors(x)
    return x.transpose(dim_1, dim_2)


def broadcast_to(x, shape: Sequence):
    """Broadcast x to shape (numpy rules)."""
    (x,) = tensors(x)
    return x.broadcast_to(shape)


def concat(original_vals: Sequence, axis: int = 0):
    """Concatenate tensors along axis."""
    vals = tensors(*original_vals)
    return apply("concat", vals, axis=axis)


def split(x, split_sizes: Sequence, axis: int = 0) -> list:
    """Split x along axis into pieces of the given sizes."""
    (x,) = tensors(x)
    res = apply("split", [x], axis=axis, sizes=tuple(Dim(s) for s in split_sizes))
    return res if isinstance(res, list) else [res]


def slice_tensor(x, indices):
    """x[indices] as in numpy basic indexing (ints, slices, ..., None)."""
    (x,) = tensors(x)
    return x[indices]


def gather(input, indices, axis: int):
    """Take entries of `input` along `axis` at `indices` (any shape)."""
    (x,) = tensors(input)
    (i,) = tensors(indices)
    return apply("gather", [x, i], axis=axis)


def scatter(input, updates, indices, axis: int = -1):
    """Copy of input with updates written at indices along axis (put_along_axis)."""
    x, u = tensors(input, updates)
    (i,) = tensors(indices)
    return apply("scatter", [x, u, i], axis=axis)
