"""Creation, linear algebra, shape, reduction and norm ops against torch, as in
test_ops_reference.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from graphir import ops
from graphir import DeviceRef, DType
from tests.ops.reference_harness import (
    BF16, F32, FLOATS, I32, I64, INTS, SETTINGS, broadcast_partner, check, floats, ints, shape)


@SETTINGS
@given(data=st.data())
def test_range(data):
    dt = data.draw(st.sampled_from((F32, I32, I64, BF16)))
    start = data.draw(st.integers(-20, 20))
    n = data.draw(st.integers(1, 12))
    if dt.is_float:
        step = data.draw(st.sampled_from([0.25, 0.5, 1.5, -0.75]))
        start = float(start)
    else:
        step = data.draw(st.sampled_from([1, 2, 3, -1, -4]))
    stop = start + n * step
    x = floats(np.random.default_rng(0), [1])
    check("range", [(x, F32)], lambda v: ops.range(start, stop, step, dtype=dt),
          lambda t: torch.arange(start, stop, step, dtype=torch.float64), [dt])


@SETTINGS
@given(data=st.data())
def test_matmul(data):
    dt = data.draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    m, k, n = (data.draw(st.integers(1, 6)) for _ in range(3))
    ta, tb = data.draw(st.booleans()), data.draw(st.booleans())
    kind = data.draw(st.sampled_from(["2d", "vec", "batched", "broadcast"]))
    if kind == "vec":
        ta = False
    batch_a = {"2d": [], "vec": [], "batched": [2], "broadcast": [3, 1]}[kind]
    batch_b = {"2d": [], "vec": [], "batched": [2], "broadcast": [2]}[kind]
    sa = batch_a + ([k] if kind == "vec" else [k, m] if ta else [m, k])
    sb = batch_b + ([n, k] if tb else [k, n])
    a, b = floats(rng, sa, 0.1, 1.0), floats(rng, sb, 0.1, 1.0)

    def ref(x, y):
        if ta:
            x = x.transpose(-1, -2)
        if tb:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)

    check("matmul", [(a, dt), (b, dt)],
          lambda x, y: ops.matmul(x, y, transpose_a=ta, transpose_b=tb), ref)


def _factor(draw, total):
    """A random list of sizes whose product is total."""
    dims = []
    while total > 1 and len(dims) < 3:
        divs = [d for d in range(2, total + 1) if total % d == 0]
        d = draw(st.sampled_from(divs))
        dims.append(d)
        total //= d
    return dims + ([total] if total > 1 else []) or [1]


@SETTINGS
@given(data=st.data())
def test_reshape(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    new = _factor(data.draw, int(np.prod(shp)))
    if data.draw(st.booleans()):
        new[data.draw(st.integers(0, len(new) - 1))] = -1
    x = ints(rng, shp) if dt in INTS else floats(rng, shp)
    check("reshape", [(x, dt)], lambda v: ops.reshape(v, new), lambda t: t.reshape(new))


@SETTINGS
@given(data=st.data())
def test_permute_and_transpose(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw, min_rank=2, max_rank=4)
    perm = data.draw(st.permutations(range(len(shp))))
    a, b = data.draw(st.integers(-len(shp), len(shp) - 1)), data.draw(st.integers(-len(shp), len(shp) - 1))
    x = ints(rng, shp) if dt in INTS else floats(rng, shp)
    check("permute", [(x, dt)], lambda v: [ops.permute(v, perm), ops.transpose(v, a, b)],
          lambda t: [t.permute(perm), t.transpose(a, b)], [dt, dt])


@SETTINGS
@given(data=st.data())
def test_broadcast_to(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    target = shape(data.draw)
    src = broadcast_partner(data.draw, target)
    if src == target:
        src = [1] + src[1:]
    target = [data.draw(st.integers(1, 3))] * data.draw(st.integers(0, 1)) + target
    x = ints(rng, src) if dt in INTS else floats(rng, src)
    check("broadcast_to", [(x, dt)], lambda v: ops.broadcast_to(v, target),
          lambda t: torch.broadcast_to(t, target))


@SETTINGS
@given(data=st.data())
def test_concat(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    base = shape(data.draw)
    ax = data.draw(st.integers(-len(base), len(base) - 1))
    shapes = []
    for _ in range(data.draw(st.integers(1, 3))):
        s = list(base)
        s[ax] = data.draw(st.integers(1, 4))
        shapes.append(s)
    xs = [(ints(rng, s) if dt in INTS else floats(rng, s), dt) for s in shapes]
    check("concat", xs, lambda *vs: ops.concat(list(vs), axis=ax), lambda *ts: torch.cat(ts, dim=ax))


@SETTINGS
@given(data=st.data())
def test_split(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    ax = data.draw(st.integers(-len(shp), len(shp) - 1))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    shp[ax] = sum(sizes)
    x = ints(rng, shp) if dt in INTS else floats(rng, shp)
    check("split", [(x, dt)], lambda v: ops.split(v, sizes, axis=ax),
          lambda t: list(torch.split(t, sizes, dim=ax)), [dt] * len(sizes))


def _index_strategy(draw, shp):
    idx = []
    for d in shp:
        kind = draw(st.sampled_from(["int", "slice", "full"]))
        if kind == "int":
            idx.append(draw(st.integers(-d, d - 1)))
        elif kind == "slice":
            idx.append(slice(draw(st.one_of(st.none(), st.integers(-d - 1, d + 1))),
                             draw(st.one_of(st.none(), st.integers(-d - 1, d + 1))),
                             draw(st.one_of(st.none(), st.integers(1, 3)))))
        else:
            idx.append(slice(None))
    if draw(st.booleans()):
        idx.insert(draw(st.integers(0, len(idx))), None)
    return tuple(idx)


@SETTINGS
@given(data=st.data())
def test_slice(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw, max_side=6)
    idx = _index_strategy(data.draw, shp)
    # A slice op is recorded unless the index is the identity or only adds axes.
    if all(i is None or i == slice(None) for i in idx):
        idx = (slice(1, None),) + idx[1:] if idx[0] is not None else (None, slice(1, None)) + idx[2:]
    x = ints(rng, shp) if dt in INTS else floats(rng, shp)
    # Selecting every element (x[0] of a [1, ...] tensor) is only a reshape, or nothing at all
    # when the shape does not change either (x[None, 0] of a [1] tensor).
    op = None if x[idx].shape == x.shape else ("slice", "reshape") if x[idx].size == x.size else "slice"
    check(op, [(x, dt)], lambda v: ops.slice_tensor(v, idx), lambda t: t[idx])


@SETTINGS
@given(data=st.data())
def test_gather(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    it = data.draw(st.sampled_from((I32, I64, DType.uint32)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    ax = data.draw(st.integers(-len(shp), len(shp) - 1))
    ishp = shape(data.draw, min_rank=1, max_rank=2)
    n = shp[ax]
    idx = rng.integers(0 if it is DType.uint32 else -n, n, size=ishp)
    x = ints(rng, shp) if dt in INTS else floats(rng, shp)

    def ref(t, i):
        i = torch.remainder(i, n)  # negative indices count from the end
        out = torch.index_select(t, ax, i.reshape(-1))
        a = ax % t.dim()
        return out.reshape(list(t.shape[:a]) + ishp + list(t.shape[a + 1:]))

    check("gather", [(x, dt), (idx, it)], lambda v, i: ops.gather(v, i, axis=ax), ref, [dt])


@SETTINGS
@given(data=st.data())
def test_scatter(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    ax = data.draw(st.integers(-len(shp), len(shp) - 1))
    a = ax % len(shp)
    ishp = [data.draw(st.integers(1, d)) for d in shp]
    # Distinct targets along the axis for every position (duplicates have no defined order).
    perm = np.argsort(rng.random(list(shp[:a]) + [shp[a]] + list(shp[a + 1:])), axis=a)
    idx = np.take(perm, np.arange(ishp[a]), axis=a)[tuple(slice(0, s) for s in ishp)]
    x = ints(rng, shp) if dt in INTS else floats(rng, shp)
    upd = ints(rng, ishp) if dt in INTS else floats(rng, ishp)
    check("scatter", [(x, dt), (upd, dt), (idx, I64)],
          lambda v, u, i: ops.scatter(v, u, i, axis=ax),
          lambda t, u, i: torch.scatter(t, ax, i, u), [dt])


REDUCE = {
    "sum": (lambda v, ax: ops.sum(v, axis=ax), lambda t, ax: torch.sum(t, dim=ax, keepdim=True), FLOATS + INTS),
    "mean": (lambda v, ax: ops.mean(v, axis=ax), lambda t, ax: torch.mean(t, dim=ax, keepdim=True), FLOATS),
    "reduce_max": (lambda v, ax: ops.max(v, axis=ax), lambda t, ax: torch.amax(t, dim=ax, keepdim=True), FLOATS + INTS),
    "reduce_min": (lambda v, ax: ops.min(v, axis=ax), lambda t, ax: torch.amin(t, dim=ax, keepdim=True), FLOATS + INTS),
    "argmax": (lambda v, ax: ops.argmax(v, axis=ax), lambda t, ax: torch.argmax(t, dim=ax, keepdim=True), FLOATS + INTS),
    "softmax": (lambda v, ax: ops.softmax(v, axis=ax), lambda t, ax: torch.softmax(t, dim=ax), FLOATS),
}


@pytest.mark.parametrize("name", list(REDUCE))
@SETTINGS
@given(data=st.data())
def test_reductions(name, data):
    build, fn, dtypes = REDUCE[name]
    dt = data.draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    ax = data.draw(st.integers(-len(shp), len(shp) - 1))
    x = ints(rng, shp) if dt in INTS else floats(rng, shp, 0.1, 4.0)
    check(name, [(x, dt)], lambda v: build(v, ax), lambda t: fn(t, ax),
          [I64] if name == "argmax" else [dt])


@SETTINGS
@given(data=st.data())
def test_rms_norm(data):
    dt = data.draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw, max_side=8)
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    offset = data.draw(st.sampled_from([0.0, 1.0]))
    x, w = floats(rng, shp), floats(rng, shp[-1:])
    check("rms_norm", [(x, dt), (w, dt)], lambda v, ww: ops.rms_norm(v, ww, eps, offset),
          lambda t, ww: F.rms_norm(t, (shp[-1],), ww + offset, eps))


@SETTINGS
@given(data=st.data())
def test_layer_norm(data):
    dt = data.draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw, max_side=8)
    shp[-1] = max(shp[-1], 2)
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    x, gm, bt = floats(rng, shp), floats(rng, shp[-1:]), floats(rng, shp[-1:])
    check("layer_norm", [(x, dt), (gm, dt), (bt, dt)], lambda v, g, b: ops.layer_norm(v, g, b, eps),
          lambda t, g, b: F.layer_norm(t, (shp[-1],), g, b, eps))


@SETTINGS
@given(data=st.data())
def test_transfer_to(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x = ints(rng, shape(data.draw)) if dt in INTS else floats(rng, shape(data.draw))
    dev = DeviceRef.GPU(data.draw(st.integers(0, 3)))

    def build(v):
        y = ops.transfer_to(v, dev)
        assert y.device == dev and y.type.shape == v.type.shape
        return y

    check("transfer_to", [(x, dt)], build, lambda t: t.clone())
