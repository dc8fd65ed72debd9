"""Every op of the foundation, one table row each: built with its MAX-named builder, run by the
reference interpreter, compared with torch (CPU, float64, then rounded to the dtype) on random
shapes, dtypes and fresh random data drawn by hypothesis. Also: bf16 / float8 rounding on store
is checked bit for bit against torch's casts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import ops
from graphir import DeviceRef, DType, Graph, TensorType, parse
from graphir.dtype import bf16_bits, bf16_from_bits, round_to_bf16, round_to_f8e4m3fn
from runtime.interpreter import run

F32, F16, BF16, F8 = DType.float32, DType.float16, DType.bfloat16, DType.float8_e4m3fn
I32, I64, BOOL = DType.int32, DType.int64, DType.bool
FLOATS = (F32, F16, BF16)
INTS = (I32, I64)
TORCH = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16, F8: torch.float8_e4m3fn,
         DType.int8: torch.int8, DType.uint8: torch.uint8, I32: torch.int32, I64: torch.int64,
         DType.uint32: torch.uint32, BOOL: torch.bool}
MANT = {F32: 23, F16: 10, BF16: 7, F8: 3}
TINY = {F32: 2.0 ** -149, F16: 2.0 ** -24, BF16: 2.0 ** -133, F8: 2.0 ** -9}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- data ----------------------------------------------------------------------------------------
def shape(draw, min_rank=1, max_rank=3, max_side=5):
    return draw(st.lists(st.integers(1, max_side), min_size=min_rank, max_size=max_rank))


def floats(rng, shp, lo=0.1, hi=2.0):
    """Random floats with |x| in [lo, hi): never zero, random signs."""
    mag = rng.uniform(lo, hi, size=shp)
    return np.where(rng.random(shp) < 0.5, -mag, mag)


def positive(rng, shp, lo=0.1, hi=3.0):
    return rng.uniform(lo, hi, size=shp)


def ints(rng, shp, lo=-1000, hi=1000, nonzero=True):
    a = rng.integers(lo, hi, size=shp)
    return np.where(a == 0, 7, a) if nonzero else a


def bools(rng, shp):
    return rng.random(shp) < 0.5


def stored(a, dt: DType) -> np.ndarray:
    """The array handed to the interpreter for dtype dt (bf16/f8 as float32 data)."""
    if dt in (BF16, F8):
        return np.asarray(a, np.float32)
    return np.asarray(a).astype(dt.storage)


def as_torch(a, dt: DType) -> torch.Tensor:
    """The exact values of a stored as dt, in float64 (floats) / int64 (ints) / bool."""
    t = torch.from_numpy(np.asarray(a))
    if dt.is_float:
        return t.to(torch.float64).to(TORCH[dt]).to(torch.float64)
    if dt is BOOL:
        return t.to(torch.bool)
    return t.to(TORCH[dt]).to(torch.int64)


def assert_matches(got: np.ndarray, want: torch.Tensor, dt: DType, what: str):
    """got (interpreter) against want (float64 torch result rounded to dt by torch): equal for
    ints and bools; within one unit in the last place of dt for floats (the two float64
    computations may differ in their last bits and land on either side of a rounding tie)."""
    w = want.to(TORCH[dt])
    w = w.to(torch.float64 if dt.is_float else torch.int64 if dt is not BOOL else torch.bool).numpy()
    assert tuple(got.shape) == tuple(w.shape), f"{what}: shape {got.shape} != {w.shape}"
    if not dt.is_float:
        np.testing.assert_array_equal(got, w, err_msg=what)
        return
    g = got.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(w)
    tol = np.maximum(np.abs(w) * 2.0 ** (1 - MANT[dt]), TINY[dt])
    bad = ~both_nan & ~(np.abs(g - w) <= tol) & ~(g == w)
    assert not bad.any(), f"{what}: {dt.short} mismatch at {np.argwhere(bad)[:5].tolist()}: " \
                          f"got {g[bad][:5]}, want {w[bad][:5]}"


# -- the harness ---------------------------------------------------------------------------------
def check(op: str | tuple | None, inputs, build, ref, out_dtypes=None):
    """inputs: [(array, DType)]; build(*values) -> value(s) via ops.*; ref(*torch) -> tensor(s).
    op: the gir op the graph must record (or a tuple of acceptable ones)."""
    types = [TensorType(dt, a.shape, DeviceRef.CPU()) for a, dt in inputs]
    with Graph("case", input_types=types) as g:
        out = build(*g.inputs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        g.output(*outs)
    if op is not None:
        accepted = {op} if isinstance(op, str) else set(op)
        assert accepted & {n.op for n in g.nodes}, f"gir.{op} not recorded: {[n.op for n in g.nodes]}"
        op = sorted(accepted)[-1]
    else:
        op = "identity"
    text = str(g)
    assert str(parse(text)) == text
    # Both sides start from the same stored arrays: torch's float64 -> f16 / bf16 casts round
    # twice (via float32), so rounding the float64 originals separately could differ by an ulp.
    arrays = [stored(a, dt) for a, dt in inputs]
    got = run(g, *arrays)
    want = ref(*[as_torch(a, dt) for a, (_, dt) in zip(arrays, inputs)])
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    out_dtypes = out_dtypes or [inputs[0][1]] * len(outs)
    assert len(got) == len(want) == len(out_dtypes)
    for i, (o, w, dt) in enumerate(zip(got, want, out_dtypes)):
        assert g.outputs[i].dtype is dt, f"gir.{op} result {i}: {g.outputs[i].dtype} != {dt}"
        assert o.dtype == dt.storage
        assert_matches(o, w, dt, f"gir.{op} result {i}")


def broadcast_partner(draw, shp):
    """A shape that broadcasts with shp: some dims set to 1, some leading dims dropped."""
    drop = draw(st.integers(0, len(shp) - 1))
    return [1 if draw(st.booleans()) else d for d in shp[drop:]]


# -- the table -----------------------------------------------------------------------------------
UNARY = {
    "neg": (torch.neg, floats, FLOATS + INTS),
    "abs": (torch.abs, floats, FLOATS + INTS),
    "exp": (torch.exp, floats, FLOATS),
    "log": (torch.log, positive, FLOATS),
    "sqrt": (torch.sqrt, positive, FLOATS),
    "rsqrt": (torch.rsqrt, positive, FLOATS),
    "tanh": (torch.tanh, floats, FLOATS),
    "sigmoid": (torch.sigmoid, lambda r, s: floats(r, s, 0.1, 8.0), FLOATS),
    "silu": (F.silu, lambda r, s: floats(r, s, 0.1, 8.0), FLOATS),
    "cos": (torch.cos, lambda r, s: floats(r, s, 0.1, 6.0), FLOATS),
    "sin": (torch.sin, lambda r, s: floats(r, s, 0.1, 6.0), FLOATS),
    "floor": (torch.floor, lambda r, s: floats(r, s, 0.1, 9.0), FLOATS + INTS),
}


def _unary_data(gen, rng, shp, dt):
    return ints(rng, shp) if dt in INTS else gen(rng, shp)


@pytest.mark.parametrize("name", list(UNARY))
@SETTINGS
@given(data=st.data())
def test_unary(name, data):
    fn, gen, dtypes = UNARY[name]
    dt = data.draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x = _unary_data(gen, rng, shape(data.draw), dt)
    check(name, [(x, dt)], getattr(ops, name), fn)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@SETTINGS
@given(data=st.data())
def test_gelu(approximate, data):
    dt = data.draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    x = floats(rng, shape(data.draw), 0.1, 4.0)
    check("gelu", [(x, dt)], lambda v: ops.gelu(v, approximate=approximate),
          lambda t: F.gelu(t, approximate=approximate))


def _pow_ref(a, b):
    return torch.pow(a, b)


BINARY = {
    # name: (builder, torch reference, dtypes, lhs data, rhs data)
    "add": (ops.add, torch.add, FLOATS + INTS, floats, floats),
    "sub": (ops.sub, torch.sub, FLOATS + INTS, floats, floats),
    "mul": (ops.mul, torch.mul, FLOATS + INTS, floats, floats),
    "div": (ops.div, torch.div, FLOATS, floats, floats),
    "div_int": (ops.div, lambda a, b: torch.div(a, b, rounding_mode="floor"), INTS, floats, floats),
    "pow": (ops.pow, _pow_ref, FLOATS, positive, lambda r, s: floats(r, s, 0.1, 2.5)),
    "maximum": (ops.maximum, torch.maximum, FLOATS + INTS, floats, floats),
    "minimum": (ops.minimum, torch.minimum, FLOATS + INTS, floats, floats),
    "max2": (ops.max, torch.maximum, FLOATS, floats, floats),
    "min2": (ops.min, torch.minimum, FLOATS, floats, floats),
    "mod": (ops.mod, torch.remainder, FLOATS + INTS, lambda r, s: floats(r, s, 0.1, 9.0), floats),
}
_BIN_OP = {"div_int": "div", "max2": "maximum", "min2": "minimum"}


@pytest.mark.parametrize("name", list(BINARY))
@SETTINGS
@given(data=st.data())
def test_binary(name, data):
    build, fn, dtypes, gen_a, gen_b = BINARY[name]
    dt = data.draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sa = shape(data.draw)
    sb = broadcast_partner(data.draw, sa)
    if data.draw(st.booleans()):
        sa, sb = sb, sa
    if dt in INTS:
        a, b = ints(rng, sa), ints(rng, sb, -50, 50)
    else:
        a, b = gen_a(rng, sa), gen_b(rng, sb)
    check(_BIN_OP.get(name, name), [(a, dt), (b, dt)], build, fn)


COMPARE = {"greater": torch.gt, "greater_equal": torch.ge, "equal": torch.eq, "not_equal": torch.ne}


@pytest.mark.parametrize("name", list(COMPARE))
@SETTINGS
@given(data=st.data())
def test_compare(name, data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    a = ints(rng, shp, -5, 5) if dt in INTS else floats(rng, shp)
    b = np.where(rng.random(shp) < 0.3, a, ints(rng, shp, -5, 5) if dt in INTS else floats(rng, shp))
    check(name, [(a, dt), (b, dt)], getattr(ops, name), COMPARE[name], [BOOL])


@pytest.mark.parametrize("name, fn", [("logical_and", torch.logical_and), ("logical_or", torch.logical_or)])
@SETTINGS
@given(data=st.data())
def test_logical(name, fn, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sa = shape(data.draw)
    sb = broadcast_partner(data.draw, sa)
    check(name, [(bools(rng, sa), BOOL), (bools(rng, sb), BOOL)], getattr(ops, name), fn, [BOOL])


@SETTINGS
@given(data=st.data())
def test_where(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    sc = shape(data.draw)
    sx, sy = broadcast_partner(data.draw, sc), broadcast_partner(data.draw, sc)
    gen = (lambda s: ints(rng, s)) if dt in INTS else (lambda s: floats(rng, s))
    check("where", [(bools(rng, sc), BOOL), (gen(sx), dt), (gen(sy), dt)],
          ops.where, torch.where, [dt])


_CASTS = [(F32, F16), (F32, BF16), (F32, F8), (F32, I32), (F32, I64), (F32, DType.int8),
          (F32, DType.uint8), (F32, BOOL), (BF16, F32), (F16, BF16), (I32, F32), (I64, F16),
          (I32, I64), (I64, I32), (BOOL, F32), (BOOL, I32), (I32, BOOL), (F8, BF16)]


@pytest.mark.parametrize("src, dst", _CASTS, ids=[f"{a.short}->{b.short}" for a, b in _CASTS])
@SETTINGS
@given(data=st.data())
def test_cast(src, dst, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw)
    if src is BOOL:
        x = bools(rng, shp)
    elif src in INTS:
        x = ints(rng, shp, -3000, 3000)
    elif dst is DType.uint8:
        x = positive(rng, shp, 0.5, 250.0)
    elif dst is DType.int8:
        x = floats(rng, shp, 0.5, 120.0)
    else:
        x = floats(rng, shp, 0.01, 300.0)
    check("cast", [(x, src)], lambda v: ops.cast(v, dst), lambda t: t.to(TORCH[dst]), [dst])


@SETTINGS
@given(data=st.data())
def test_clamp(data):
    dt = data.draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    lo = data.draw(st.one_of(st.none(), st.floats(-1.5, 0.0)))
    hi = data.draw(st.one_of(st.none(), st.floats(0.0, 1.5)))
    x = floats(rng, shape(data.draw))
    check("clamp", [(x, dt)], lambda v: ops.clamp(v, lo, hi), lambda t: t if lo is None and hi is None else torch.clamp(t, lo, hi))


@SETTINGS
@given(data=st.data())
def test_constant(data):
    dt = data.draw(st.sampled_from(FLOATS + INTS + (F8, BOOL)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    shp = shape(data.draw, min_rank=0)
    val = bools(rng, shp) if dt is BOOL else ints(rng, shp) if dt in INTS else floats(rng, shp, 0.01, 100)
    x = floats(rng, [1])
    # The constant is an output next to a dummy input (a graph needs no input, but check() uses one).
    check("constant", [(x, F32)], lambda v: ops.constant(val, dt), lambda t: as_torch(val, dt), [dt])


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


# -- rounding on store, bit for bit ----------------------------------------------------------------
def _edge_f32():
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 3.0e38, -3.0e38,
                np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, -1e-45, 1e-40,
                1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -23, 255.5, 256.5, 65504.0]
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00001, 0x3F808000, 0x3F818000, 0x3F80FFFF,
                     0x00008000, 0x80018000, 0x7F7F8000, 0x7F7F7FFF], np.uint32).view(np.float32)
    return np.concatenate([np.array(specials, np.float32), bits])


def _random_f32(n, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)
    a = bits.view(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    # ties: a random bf16 value plus exactly half of its ulp
    ties = ((bits & 0xFFFF0000) | 0x8000).view(np.float32)
    return np.concatenate([a, b, ties])


@pytest.mark.parametrize("seed", [0, 1])
def test_round_to_bf16_bit_exact_vs_torch(seed):
    x = np.concatenate([_edge_f32(), _random_f32(20000, seed)])
    ours = round_to_bf16(x).view(np.uint32)
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy().view(np.uint32)
    nan = np.isnan(x)
    assert 0 < nan.sum() < len(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    # NaN (whatever its payload; torch keeps payload bits) stores as the canonical quiet NaN,
    # never as inf, which truncating a low payload would give.
    np.testing.assert_array_equal(ours[nan], np.full(nan.sum(), 0x7FC00000, np.uint32))
    assert np.isnan(theirs.view(np.float32)[nan]).all()
    np.testing.assert_array_equal(bf16_bits(x)[~nan], (theirs[~nan] >> 16).astype(np.uint16))
    np.testing.assert_array_equal(bf16_from_bits(bf16_bits(x)).view(np.uint32)[~nan], theirs[~nan])


def _bf16_exact_reference(x64: np.ndarray) -> np.ndarray:
    """Nearest-even bf16 of float64 values, written independently: the two bf16 neighbours are
    found by truncation, the nearer picked with exact float64 arithmetic."""
    out = np.empty(len(x64), np.float64)
    for k, v in enumerate(x64):
        t = np.float32(v)  # may round up or down; step to the bf16 at or below |v|
        tb = int(np.array([t], np.float32).view(np.uint32)[0]) & 0xFFFF0000
        lo = float(np.array([tb], np.uint32).view(np.float32)[0])
        if abs(lo) > abs(v):
            tb -= 0x10000
            lo = float(np.array([tb], np.uint32).view(np.float32)[0])
        hi = float(np.array([tb + 0x10000], np.uint32).view(np.float32)[0])
        dl, dh = abs(v - lo), abs(hi - v)
        out[k] = lo if dl < dh else hi if dh < dl else (lo if (tb >> 16) % 2 == 0 else hi)
    return out


def test_round_to_bf16_from_float64_rounds_once():
    rng = np.random.default_rng(7)
    base = rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 6, 3000)
    # values a hair above / below bf16 ties: float64 -> float32 -> bf16 would round twice
    b = round_to_bf16(base).astype(np.float64)
    half_ulp = np.abs(b) * 2.0 ** -8
    near_ties = np.concatenate([b + half_ulp * (1 + 2.0 ** -40), b + half_ulp * (1 - 2.0 ** -40),
                                b - half_ulp * (1 + 2.0 ** -40)])
    x = np.concatenate([base, near_ties, [1.0 + 2 ** -8 + 2 ** -30]])
    got = round_to_bf16(x).astype(np.float64)
    np.testing.assert_array_equal(got, _bf16_exact_reference(x))
    assert round_to_bf16(np.array([1.0 + 2 ** -8 + 2 ** -30]))[0] == 1.0 + 2 ** -7


@pytest.mark.parametrize("seed", [0, 1])
def test_round_to_f8e4m3fn_bit_exact_vs_torch(seed):
    rng = np.random.default_rng(seed)
    grid = np.array([m * 2.0 ** e for e in range(-10, 9) for m in np.arange(8, 16) / 8], np.float32)
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties between neighbouring codes
    x = np.concatenate([
        _edge_f32(), grid, -grid, mids, -mids, np.nextafter(mids, np.float32(0)),
        np.nextafter(mids, np.float32(np.inf)), np.array([447.0, 448.0, 460.0, 464.0, 470.0, 479.9,
                                                          480.0, 1e4, 2.0 ** -9, 2.0 ** -10,
                                                          3 * 2.0 ** -11, 2.0 ** -11], np.float32),
        (rng.standard_normal(20000) * 10.0 ** rng.integers(-4, 3, 20000)).astype(np.float32)])
    ours = round_to_f8e4m3fn(x)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    nan = np.isnan(x)
    assert np.isnan(ours[nan]).all() and np.isnan(theirs[nan]).all()
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))


def test_round_to_f8e4m3fn_saturates_like_torch():
    x = np.array([448.0, 463.9, 464.0, 480.0, 1e6, np.inf, -np.inf, -1e6], np.float32)
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(round_to_f8e4m3fn(x), want)
    np.testing.assert_array_equal(round_to_f8e4m3fn(x), [448, 448, 448, 448, 448, 448, -448, -448])


def test_bf16_store_in_a_graph_rounds_each_op():
    """Values are rounded on every store: (x*3)*3 in bf16 is not x*9 rounded once."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4096).astype(np.float32)
    with Graph("twice", input_types=[TensorType(BF16, [4096])]) as g:
        g.output(g.inputs[0] * 3.0 * 3.0)
    (got,) = run(g, x)
    t = torch.from_numpy(x).to(torch.bfloat16)
    want = ((t * 3.0) * 3.0).to(torch.float32).numpy()  # torch bf16 ops round after each op
    np.testing.assert_array_equal(got, want)
    once = (t.to(torch.float64) * 9.0).to(torch.bfloat16).to(torch.float32).numpy()
    assert (got != once).any()
    assert math.isfinite(float(got.sum()))
