"""The CPU runtime's per-call path: shapes worked out once per set of bound dims (cached, evicted
past a bound) and descriptors packed into one buffer must give every call the numbers the
interpreter gives, whatever order the shapes come in."""
import numpy as np
import pytest

from graphir import DeviceRef, DType, Graph, TensorType, ops
from graphir.lowering.driver import compile_graph
from graphir.runtime.cpu_executor import CpuModel
from graphir.runtime.interpreter import run
from graphir.runtime.session import InferenceSession


def _graph():
    """Symbolic rows and columns, a slot-sized intermediate, a matmul, a split and a concat:
    kernels with symbol arguments, views and slot memory, all sized by the bound dims."""
    dev = DeviceRef.CPU()
    w = np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32)
    with Graph("call_path", input_types=[TensorType(DType.float32, ["rows", 16], dev),
                                         TensorType(DType.float32, ["rows", "cols"], dev)]) as g:
        x, y = g.inputs
        h = ops.matmul(ops.sin(x), ops.constant(w, DType.float32, dev), transpose_b=True)
        a, b = ops.split(h, [8, 16], axis=1)
        z = ops.concat([a * 2.0, b.reshape([b.shape[0], 16])], axis=1)
        g.output(z, ops.concat([y, y + 1.0], axis=1))
    return g


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import os

    old = os.environ.get("GRAPHIR_CACHE_DIR")
    os.environ["GRAPHIR_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        g = _graph()
        return g, InferenceSession().load(compile_graph(g, "cpu"))
    finally:
        if old is None:
            del os.environ["GRAPHIR_CACHE_DIR"]
        else:
            os.environ["GRAPHIR_CACHE_DIR"] = old


def test_shapes_in_any_order_match_the_interpreter(model):
    g, m = model
    rng = np.random.default_rng(1)
    # Revisit shapes after others ran (a cached layout reused), and more distinct shapes
    # than the cache holds (layouts evicted and rebuilt).
    ex = m
    assert isinstance(ex, CpuModel)
    limit = ex._MAX_LAYOUTS
    shapes = [(5, 3), (1, 1), (5, 3), (7, 2), (1, 1)] + \
        [(r, c) for r in range(1, 12) for c in range(1, 8)][:limit + 6] + [(5, 3), (0, 4)]
    for rows, cols in shapes:
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        y = rng.standard_normal((rows, cols)).astype(np.float32)
        got = m.execute(x, y)
        want = run(g, x, y)
        for gv, wv in zip(got, want):
            assert gv.shape == wv.shape
            np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-5)
    assert len(ex._layouts) <= limit


def test_outputs_do_not_alias_between_calls(model):
    """Slot memory is reused across calls; what a call returned must not change after."""
    g, m = model
    rng = np.random.default_rng(2)
    x1, y1 = (rng.standard_normal((4, n)).astype(np.float32) for n in (16, 3))
    first = [o.copy() for o in m.execute(x1, y1)]
    kept = m.execute(x1, y1)
    m.execute(*(rng.standard_normal((4, n)).astype(np.float32) for n in (16, 3)))
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


def test_every_output_is_the_callers_own_memory(tmp_path, monkeypatch):
    """Results are handed over without a copy only where nothing else holds their memory: one
    value returned twice, an input returned as is and a constant come back as separate arrays
    that share no memory with the inputs, each other or the executor, and writing to one changes
    nothing the next call computes."""
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))
    dev = DeviceRef.CPU()
    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    with Graph("owned", input_types=[TensorType(DType.float32, ["rows", 3], dev)]) as g:
        (x,) = g.inputs
        h = ops.sin(x) * 2.0
        g.output(h, h, x, ops.constant(c, DType.float32, dev), h.reshape([-1]))
    m = InferenceSession().load(compile_graph(g, "cpu"))
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((4, 3)).astype(np.float32)
    got = m.execute(x1)
    want = run(g, x1)
    for gv, wv in zip(got, want):
        np.testing.assert_allclose(gv, wv, rtol=1e-6, atol=1e-6)
    arrays = got + [x1]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)
    for a in got:
        a[...] = 7.0
    again = m.execute(x1)
    for gv, wv in zip(again, want):
        np.testing.assert_allclose(gv, wv, rtol=1e-6, atol=1e-6)


def test_bf16_inputs_as_bits_match_floats_and_update_the_cache_in_place(tmp_path, monkeypatch):
    """A bf16 layer given its input and KV cache as uint16 bits computes what it computes from
    floats, and writes the new K/V into the very bits array (no per-call conversion)."""
    from graphir import DType
    from graphir.dtype import from_bits, round_to, to_bits
    from graphir.examples.llama_attention import build_tiny, random_weights

    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))
    g = build_tiny(dtype=DType.bfloat16)
    m = InferenceSession().load(compile_graph(g, "cpu"), weights=random_weights(g, seed=1))
    rng = np.random.default_rng(5)
    shape = [9] + [int(d) for d in g.inputs[2].type.shape[1:]]
    cache = round_to(rng.standard_normal(shape), DType.bfloat16).astype(np.float32)
    x = round_to(rng.standard_normal((5, 64)), DType.bfloat16).astype(np.float32)
    offs, clen = np.array([0, 3, 5], np.uint32), np.array([6, 0], np.uint32)
    lut = np.array([[0, 1, 2], [3, 4, 5]], np.uint32)
    maxl = np.array([[3, 9]], np.uint32)
    floats = cache.copy()
    bits = to_bits(cache, DType.bfloat16).copy()
    (y_f,) = m.execute(x, offs, floats, clen, lut, maxl)
    (y_b,) = m.execute(to_bits(x, DType.bfloat16), offs, bits, clen, lut, maxl)
    np.testing.assert_array_equal(y_b, y_f)
    np.testing.assert_array_equal(from_bits(bits, DType.bfloat16), floats)
    assert not np.array_equal(floats, cache)      # the step did write K/V
