"""Elementwise ops compiled for the CPU match the interpreter, across dtypes and broadcasting."""
import numpy as np
import pytest

from graphir import ops
from graphir import DType, Graph, TensorType

from .harness import assert_matches_interpreter

pytest.importorskip("mlir.ir")

UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "gelu", "cos",
         "sin", "floor"]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "mod"]


def _data(rng, shape, dt, positive=False):
    if dt.is_float:
        a = rng.standard_normal(shape) * 2
        return (np.abs(a) + 0.1 if positive else a).astype(np.float32 if dt is not DType.float16 else np.float16)
    a = rng.integers(1, 9, shape) * (1 if positive else rng.choice([-1, 1], shape))
    return a.astype(dt.storage)


@pytest.mark.parametrize("dt", [DType.float32, DType.float16, DType.bfloat16])
def test_unary_float(dt):
    rng = np.random.default_rng(1)
    with Graph("u", input_types=[TensorType(dt, ["n", 16])]) as g:
        x = g.inputs[0]
        g.output(*[getattr(ops, n)(x if n not in ("log", "sqrt", "rsqrt") else ops.abs(x) + 0.5)
                   for n in UNARY], ops.gelu(x, approximate="tanh"))
    tol = 1e-5 if dt is DType.float32 else 1e-2
    assert_matches_interpreter(g, _data(rng, (7, 16), dt), rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", [DType.float32, DType.int32, DType.int64, DType.uint32])
def test_binary_broadcast(dt):
    rng = np.random.default_rng(2)
    with Graph("b", input_types=[TensorType(dt, ["n", 1, 8]), TensorType(dt, [3, 8])]) as g:
        a, b = g.inputs
        outs = [getattr(ops, n)(a, b) for n in BINARY if not (n == "pow" and not dt.is_float)]
        outs += [ops.greater(a, b), ops.equal(a, b), ops.not_equal(a, b), ops.greater_equal(a, b)]
        g.output(*outs)
    a = _data(rng, (4, 1, 8), dt, positive=dt is DType.uint32)
    b = _data(rng, (3, 8), dt, positive=True)
    if dt.is_float:
        a[0, 0, 0] = b[0, 0]  # an exact tie for the comparisons
    assert_matches_interpreter(g, a, b)


def test_where_cast_clamp_logical():
    rng = np.random.default_rng(3)
    with Graph("w", input_types=[TensorType(DType.float32, [5, 6]), TensorType(DType.int32, [5, 6])]) as g:
        x, i = g.inputs
        c = ops.logical_or(ops.greater(x, ops.constant(0.5, DType.float32)),
                           ops.logical_and(x < 0, ops.cast(i, DType.bool)))
        g.output(ops.where(c, x, ops.cast(i, DType.float32)), ops.clamp(x, -0.5, 0.25),
                 ops.cast(x * 10.0, DType.int32), ops.cast(x, DType.bfloat16),
                 ops.cast(ops.cast(x, DType.float16), DType.float32), ops.cast(i, DType.uint8),
                 ops.clamp(i, -2, 3), ops.cast(c, DType.float32))
    assert_matches_interpreter(g, rng.standard_normal((5, 6)).astype(np.float32),
                               rng.integers(-3, 3, (5, 6)).astype(np.int32))
