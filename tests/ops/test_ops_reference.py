"""Elementwise ops, one table row each: built with the MAX-named builder, run by the reference
interpreter, compared with torch (float64, rounded to the dtype) on hypothesis-drawn shapes,
dtypes and fresh random data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from graphir import ops
from graphir import DType
from tests.ops.reference_harness import (
    BF16, BOOL, F16, F32, F8, FLOATS, I32, I64, INTS, SETTINGS, TORCH, as_torch, bools,
    broadcast_partner, check, floats, ints, positive, shape)


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
