"""Reductions, softmax, rms_norm and layer_norm compiled for the CPU match the interpreter:
every axis (negative too), symbolic dims, floats (f32/f16/bf16), ints and bool."""
import numpy as np
import pytest

from graphir import ops
from graphir import DType, Graph, TensorType, Weight

from .harness import assert_matches_interpreter

pytest.importorskip("mlir.ir")

FLOATS = [DType.float32, DType.float16, DType.bfloat16]


def _tol(dt):
    return {DType.float32: 2e-5, DType.float16: 2e-3}.get(dt, 1e-2)


def _data(rng, shape, dt):
    if dt.is_float:
        a = rng.standard_normal(shape) * 3
        return a.astype(np.float16 if dt is DType.float16 else np.float32)
    if dt is DType.bool:
        return rng.random(shape) < 0.3
    lo = 0 if dt in (DType.uint8, DType.uint32) else -9
    return rng.integers(lo, 10, shape).astype(dt.storage)


def _reductions(x):
    outs = []
    for ax in (0, 1, -1):
        outs += [ops.sum(x, ax), ops.mean(x, ax), ops.max(x, axis=ax), ops.min(x, axis=ax),
                 ops.argmax(x, ax)]
    return outs


@pytest.mark.parametrize("dt", FLOATS + [DType.int32, DType.int64, DType.uint32, DType.uint8,
                                          DType.bool])
def test_reductions_every_axis(dt):
    rng = np.random.default_rng(10)
    with Graph("red", input_types=[TensorType(dt, ["n", 5, 33]), TensorType(dt, ["k"])]) as g:
        x, v = g.inputs
        g.output(*_reductions(x), ops.sum(v, 0), ops.max(v, axis=-1), ops.argmax(v, 0))
    a = _data(rng, (4, 5, 33), dt)
    if dt.is_float:
        a[1, 2, 20] = a[1, 2, 5] = np.abs(a).max() + 1  # a tie for argmax: the first one wins
    b = _data(rng, (37,), dt)
    assert_matches_interpreter(g, a, b, rtol=_tol(dt), atol=_tol(dt))


@pytest.mark.parametrize("dt", FLOATS)
def test_softmax_and_norms(dt):
    rng = np.random.default_rng(11)
    with Graph("sm", input_types=[TensorType(dt, ["n", 3, 40]), TensorType(dt, [40]),
                                  TensorType(dt, [40]), TensorType(dt, ["m"]),
                                  TensorType(dt, ["m"])]) as g:
        x, w, b, v, v2 = g.inputs  # v2: norms over a symbolic last axis
        g.output(ops.softmax(x), ops.softmax(x, axis=0), ops.softmax(x, axis=-2),
                 ops.softmax(v, axis=0), ops.rms_norm(x, w, 1e-6),
                 ops.rms_norm(x, w, 1e-5, weight_offset=1.0), ops.layer_norm(x, w, b, 1e-5),
                 ops.rms_norm(v2, v2, 1e-6), ops.layer_norm(v2, v2, v2, 1e-5))
    tol = _tol(dt)
    v = _data(rng, (9,), dt) * 40  # exp reaches its underflow range; masked (-inf) entries
    v[:2] = -np.inf
    inputs = [_data(rng, (6, 3, 40), dt), _data(rng, (40,), dt), _data(rng, (40,), dt), v,
              _data(rng, (9,), dt)]
    assert_matches_interpreter(g, *inputs, rtol=tol, atol=tol)


def test_norms_with_weights_rank1_and_large_rows():
    """Weights bound at load time, a rank-1 input, rows long enough for the vector loops.
    The f32 norms are held to f32 accuracy; only the bf16 graph gets a bf16 tolerance."""
    rng = np.random.default_rng(12)
    with Graph("nw32", input_types=[TensorType(DType.float32, [64])]) as g:
        (v,) = g.inputs
        gamma = Weight("g", DType.float32, [64])
        beta = Weight("b", DType.float32, [64])
        g.output(ops.rms_norm(v, gamma, 1e-6), ops.layer_norm(v, gamma, beta, 1e-5))
    weights = {"g": rng.standard_normal(64).astype(np.float32),
               "b": rng.standard_normal(64).astype(np.float32)}
    assert_matches_interpreter(g, rng.standard_normal(64).astype(np.float32), weights=weights,
                               rtol=2e-5, atol=2e-5)
    with Graph("nw16", input_types=[TensorType(DType.bfloat16, ["n", 515])]) as g:
        (x,) = g.inputs
        w = Weight("w", DType.bfloat16, [515])
        g.output(ops.rms_norm(x, w, 1e-6, weight_offset=1.0), ops.softmax(x), ops.sum(x, -1),
                 ops.mean(x, -1))
    assert_matches_interpreter(g, rng.standard_normal((3, 515)).astype(np.float32),
                               weights={"w": rng.standard_normal(515).astype(np.float32)},
                               rtol=1e-2, atol=1e-2)
