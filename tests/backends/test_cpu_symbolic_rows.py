"""Results with several symbolic dims in one reshaped group (x [B, S, K] with B and S both
symbolic through a matmul, a graph output reshaped to [B, S, 8, 8]): MLIR's expand_shape
lowering asserts on two dynamic sizes in a group, which killed the compiling process; these
take tensor.reshape instead and match the interpreter."""
import numpy as np
import pytest

from graphir import DeviceRef, DType, Graph, TensorType, Weight, ops
from graphir.lowering.driver import compile_graph
from graphir.runtime.interpreter import run
from graphir.runtime.session import InferenceSession

DEV = DeviceRef.CPU()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))


def _graph():
    with Graph("sym_rows", input_types=[TensorType(DType.float32, ["B", "S", 64], DEV)]) as g:
        x = g.inputs[0]
        y = ops.matmul(x, Weight("w", DType.float32, [32, 64], DEV), transpose_b=True)
        g.output(y, ops.reshape(ops.sin(x), [x.shape[0], x.shape[1], 8, 8]))
    return g


def test_two_symbolic_leading_dims_compile_and_match():
    g = _graph()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 64)) / 8).astype(np.float32)
    model = InferenceSession().load(compile_graph(g, "cpu"), weights={"w": w})
    for b, s in ((2, 5), (1, 1), (3, 9)):
        x = rng.standard_normal((b, s, 64)).astype(np.float32)
        got = model.execute(x)
        want = run(g, x, weights={"w": w})
        for gv, wv in zip(got, want):
            assert gv.shape == wv.shape
            np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-5)
