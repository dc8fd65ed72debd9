"""Shared pieces of the op reference tests: dtypes, random data, and `check()` which builds
one op with its MAX-named builder, runs the interpreter and compares with torch."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, settings, strategies as st

from graphir import DeviceRef, DType, Graph, TensorType, parse
from graphir.runtime.interpreter import run

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
