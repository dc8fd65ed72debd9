"""Types and TensorValue: operators, indexing, reshape, T, cast, broadcasting, Weight, the chain
token and the networkx view; values checked through the interpreter against plain numpy."""
import networkx as nx
import numpy as np
import pytest

from graphir import ops
from graphir import (BufferType, ChainType, DeviceRef, Dim, DType, Graph, TensorType, TensorValue,
                     Weight, parse)
from graphir.opdef import REGISTRY, OpDef, register
from graphir.runtime.interpreter import run

F32 = DType.float32
rng = np.random.default_rng(1234)


def randn(*shape):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.where(np.abs(a) < 0.05, 0.5, a).astype(np.float32)  # no zeros


def build(fn, *types, **kw):
    with Graph("t", input_types=list(types), **kw) as g:
        out = fn(*g.inputs)
        g.output(*(out if isinstance(out, (list, tuple)) else [out]))
    return g


def ops_of(g):
    return [n.op for n in g.nodes]


# -- types -------------------------------------------------------------------------------------
def test_tensor_type_str_and_eq():
    t = TensorType(F32, ["seq", 64], DeviceRef.GPU(1))
    assert str(t) == "tensor<[seq, 64], f32, gpu:1>"
    assert t == TensorType(F32, [Dim("seq"), Dim(64)], DeviceRef.GPU(1))
    assert t != TensorType(F32, ["seq", 64], DeviceRef.GPU(0))
    assert t.rank == 2 and not t.is_static
    assert TensorType(DType.bfloat16, [2, 3]).static_shape() == (2, 3)
    assert str(BufferType(DType.uint8, [4])) == "buffer<[4], u8, cpu:0>"
    assert str(ChainType()) == "!chain"
    with pytest.raises(TypeError):
        TensorType("f32", [1])
    with pytest.raises(TypeError):
        TensorType(F32, 4)


def test_device_ref():
    assert str(DeviceRef.GPU(2)) == "gpu:2" and DeviceRef.parse("cpu:0") == DeviceRef.CPU()
    for bad in ("tpu:0", "gpu", "gpu:x"):
        with pytest.raises(ValueError):
            DeviceRef.parse(bad)
    with pytest.raises(ValueError):
        DeviceRef.GPU(-1)


def test_dtype_properties():
    assert DType.bfloat16.is_float and not DType.int8.is_float
    assert DType.uint32.is_integral and not DType.bool.is_integral
    assert [d.size_in_bytes for d in (DType.float8_e4m3fn, DType.bfloat16, DType.int64)] == [1, 2, 8]
    assert DType.from_short("bf16") is DType.bfloat16
    assert DType.from_numpy(np.int32) is DType.int32
    with pytest.raises(ValueError, match="unknown dtype"):
        DType.from_short("f64")


# -- graph building basics ---------------------------------------------------------------------
def test_graph_names_validated():
    with pytest.raises(ValueError, match="graph name"):
        Graph("bad name")
    with pytest.raises(ValueError, match="input_names"):
        Graph("g", input_types=[TensorType(F32, [1])], input_names=["0"])
    with pytest.raises(ValueError, match="input_names"):
        Graph("g", input_types=[TensorType(F32, [1])] * 2, input_names=["a", "a"])


def test_context_var_and_no_graph():
    with pytest.raises(RuntimeError, match="no graph"):
        ops.constant(1.0, F32)
    with Graph("outer", input_types=[TensorType(F32, [2])]) as outer:
        with Graph("inner", input_types=[TensorType(F32, [2])]) as inner:
            c = ops.constant(1.0, F32)
        d = ops.constant(2.0, F32)
        assert Graph.current() is outer
        with pytest.raises(ValueError, match="belongs to graph 'inner'"):
            outer.inputs[0] + c
    assert c.graph is inner and d.graph is outer


def test_forward_callable():
    g = Graph("fwd", lambda x: x * 2.0, input_types=[TensorType(F32, [3])])
    x = randn(3)
    np.testing.assert_allclose(run(g, x)[0], x * 2)


# -- operators ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, ref, op", [
    (lambda a, b: a + b, np.add, "add"),
    (lambda a, b: a - b, np.subtract, "sub"),
    (lambda a, b: a * b, np.multiply, "mul"),
    (lambda a, b: a / b, np.divide, "div"),
    (lambda a, b: abs(a) ** b, lambda a, b: np.abs(a) ** b, "pow"),
    (lambda a, b: a > b, np.greater, "greater"),
    (lambda a, b: a >= b, np.greater_equal, "greater_equal"),
    (lambda a, b: a < b, np.less, "greater"),
    (lambda a, b: a <= b, np.less_equal, "greater_equal"),
])
def test_binary_operators(fn, ref, op):
    t = TensorType(F32, [3, 4])
    g = build(fn, t, t)
    assert op in ops_of(g)
    a, b = randn(3, 4), randn(3, 4)
    b[0, 0] = a[0, 0]  # equal operands exercise > vs >=
    got = run(g, a, b)[0]
    want = ref(a.astype(np.float64), b.astype(np.float64))
    if want.dtype == bool:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)


def test_scalar_operands_and_reflected():
    g = build(lambda x: [2.0 - x, 3.0 * x, 1.0 / x, x + 1, -x, abs(x), 2.0 ** x], TensorType(F32, [5]))
    x = randn(5)
    outs = run(g, x)
    for got, want in zip(outs, [2 - x, 3 * x, 1 / x, x + 1, -x, np.abs(x), 2.0 ** x]):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Scalars take the tensor's dtype: the constant is f32, not f64 / i64.
    consts = [n for n in g.nodes if n.op == "constant"]
    assert consts and all(n.attrs["dtype"] is F32 for n in consts)


def test_integer_scalars_follow_integer_tensor():
    g = build(lambda x: x * 3 - 1, TensorType(DType.int32, [4]))
    x = np.array([1, -2, 3, 7], np.int32)
    np.testing.assert_array_equal(run(g, x)[0], x * 3 - 1)
    with pytest.raises(ValueError, match="gir.mul.*dtypes differ"):
        build(lambda x: x * 1.5, TensorType(DType.int32, [4]))


def test_matmul_operator_and_rmatmul():
    g = build(lambda a, b: a @ b, TensorType(F32, [2, 3, 4]), TensorType(F32, [4, 5]))
    assert g.outputs[0].shape == (2, 3, 5)
    a, b = randn(2, 3, 4), randn(4, 5)
    np.testing.assert_allclose(run(g, a, b)[0], a.astype(np.float64) @ b, rtol=1e-5)
    w = randn(3, 2)
    g = build(lambda x: w @ x, TensorType(F32, [2, 4]))
    x = randn(2, 4)
    np.testing.assert_allclose(run(g, x)[0], w.astype(np.float64) @ x, rtol=1e-5)


def test_value_has_no_truth_and_identity_equality():
    with Graph("g", input_types=[TensorType(F32, [2])]) as g:
        x = g.inputs[0]
        with pytest.raises(TypeError, match="truth"):
            bool(x)
        assert x == x and not (x == g.inputs[0] + 0.0)
        assert len({x: 1, x: 2}) == 1


# -- broadcasting ------------------------------------------------------------------------------
@pytest.mark.parametrize("sa, sb, want", [
    ([3, 1], [1, 4], [3, 4]),
    ([4], [2, 3, 4], [2, 3, 4]),
    ([1], [5], [5]),
    (["n", 1], [1, 8], ["n", 8]),
    (["n", 8], [8], ["n", 8]),
    ([], [2, 2], [2, 2]),
])
def test_broadcasting_types(sa, sb, want):
    g = build(lambda a, b: a + b, TensorType(F32, sa), TensorType(F32, sb))
    assert g.outputs[0].shape == tuple(Dim(d) for d in want)


def test_broadcasting_values():
    g = build(lambda a, b: a * b, TensorType(F32, ["n", 1, 3]), TensorType(F32, [4, 1]))
    a, b = randn(2, 1, 3), randn(4, 1)
    np.testing.assert_allclose(run(g, a, b)[0], a * b, rtol=1e-6)


@pytest.mark.parametrize("sa, sb", [([3], [4]), (["n"], ["m"]), ([2, 3], [3, 2])])
def test_broadcasting_rejects(sa, sb):
    with pytest.raises(ValueError, match=r"gir.add: shapes .* do not broadcast"):
        build(lambda a, b: a + b, TensorType(F32, sa), TensorType(F32, sb))


# -- indexing ----------------------------------------------------------------------------------
_IDX = [
    np.s_[1], np.s_[-1], np.s_[1:3], np.s_[-3:-1], np.s_[::2], np.s_[1::3], np.s_[..., 0],
    np.s_[:, None, 1:], np.s_[None], np.s_[2, ..., -2], np.s_[0, 1, 2], np.s_[4:2], np.s_[:100],
    np.s_[-100:2], np.s_[:, -1:], np.s_[1:-1, ::2, 3],
]


@pytest.mark.parametrize("idx", _IDX, ids=[str(i) for i in range(len(_IDX))])
def test_indexing_static_matches_numpy(idx):
    x = randn(4, 5, 6)
    g = build(lambda v: v[idx], TensorType(F32, [4, 5, 6]))
    want = x[idx]
    assert tuple(int(d) for d in g.outputs[0].shape) == want.shape
    np.testing.assert_array_equal(run(g, x)[0], want)
    s = str(g)
    assert str(parse(s)) == s


def test_indexing_full_is_free():
    g = build(lambda v: v[:, ...], TensorType(F32, [3, 4]))
    assert g.nodes == [] and g.outputs[0] is g.inputs[0]


def test_indexing_symbolic():
    n = Dim("n")
    g = build(lambda v: [v[-1], v[1:], v[:-2], v[-3:], v[2:5]], TensorType(F32, ["n", 4]))
    shapes = [o.shape for o in g.outputs]
    assert shapes == [(Dim(4),), (n - 1, Dim(4)), (n - 2, Dim(4)), (Dim(3), Dim(4)), (Dim(3), Dim(4))]
    x = randn(7, 4)
    for got, want in zip(run(g, x), [x[-1], x[1:], x[:-2], x[-3:], x[2:5]]):
        np.testing.assert_array_equal(got, want)
    assert "n-1" in str(g)
    assert str(parse(str(g))) == str(g)


@pytest.mark.parametrize("idx, exc, msg", [
    (np.s_[4], IndexError, "out of range"),
    (np.s_[-5], IndexError, "out of range"),
    (np.s_[0, 0, 0], ValueError, "too many indices"),
    (np.s_[..., ...], ValueError, "one Ellipsis"),
    (np.s_[::-1], ValueError, "step must be positive"),
    (np.s_["a"], TypeError, "unsupported index"),
])
def test_indexing_errors(idx, exc, msg):
    with pytest.raises(exc, match=msg):
        build(lambda v: v[idx], TensorType(F32, [4, 5]))


# -- reshape / T / transpose / cast ------------------------------------------------------------
@pytest.mark.parametrize("src, new, want", [
    ([2, 3, 4], [-1], [24]),
    ([2, 3, 4], [6, -1], [6, 4]),
    ([2, 3, 4], [-1, 2, 2], [6, 2, 2]),
    (["n", 4], ["n", -1], ["n", 4]),
    (["n", 4], [-1], ["4*n"]),
    (["n", 4], [-1, 2], ["2*n", 2]),
    (["n", 6], [2, -1], [2, "3*n"]),
    (["b", "s", 8], ["b", -1], ["b", "8*s"]),
])
def test_reshape_infers_minus_one(src, new, want):
    g = build(lambda v: v.reshape(new), TensorType(F32, src))
    assert g.outputs[0].shape == tuple(Dim(d) for d in want)
    env = {"n": 3, "b": 2, "s": 5}
    shape = [Dim(d).evaluate(env) for d in src]
    x = randn(*shape)
    np.testing.assert_array_equal(run(g, x)[0], x.reshape([Dim(d).evaluate(env) for d in want]))
    assert str(parse(str(g))) == str(g)


@pytest.mark.parametrize("src, new, msg", [
    ([2, 3], [5], "cannot reshape"),
    ([2, 3], [-1, -1], "at most one -1"),
    ([2, 3], [4, -1], "cannot infer -1"),
    (["n", 6], [4, -1], "cannot infer -1"),
    (["n"], ["m"], "cannot reshape"),
])
def test_reshape_errors(src, new, msg):
    with pytest.raises(ValueError, match="gir.reshape.*" + msg):
        build(lambda v: v.reshape(new), TensorType(F32, src))


def test_T_transpose_permute_flatten():
    x = randn(2, 3, 4)
    g = build(lambda v: [v.T, v.transpose(0, 2), v.permute([1, 2, 0]), v.flatten(), v.flatten(1)],
              TensorType(F32, [2, 3, 4]))
    wants = [np.swapaxes(x, -1, -2), np.swapaxes(x, 0, 2), x.transpose(1, 2, 0), x.reshape(-1),
             x.reshape(2, 12)]
    for got, want in zip(run(g, x), wants):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="T needs rank >= 2"):
        build(lambda v: v.T, TensorType(F32, [3]))
    with pytest.raises(ValueError, match="axis 3 out of range"):
        build(lambda v: v.transpose(0, 3), TensorType(F32, [2, 3]))


def test_cast_and_to():
    x = (randn(6) * 10).astype(np.float32)
    g = build(lambda v: [v.cast(DType.int32), v.cast(DType.bfloat16), v.cast(DType.bool),
                         v.to(DeviceRef.GPU(0))], TensorType(F32, [6]))
    i, b, z, moved = run(g, x)
    np.testing.assert_array_equal(i, np.trunc(x).astype(np.int32))
    assert g.outputs[3].device == DeviceRef.GPU(0) and g.outputs[1].dtype is DType.bfloat16
    import torch
    np.testing.assert_array_equal(b, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(z, x != 0)
    np.testing.assert_array_equal(moved, x)


# -- weights -----------------------------------------------------------------------------------
def test_weight_use():
    w = Weight("layer.w", F32, [4, 3])
    bias = Weight("layer.b", F32, [4])
    left = randn(2, 4)
    g = build(lambda x: [x @ w.T + bias, w * 2.0, w.reshape([12]), -w[1:], left @ w],
              TensorType(F32, ["n", 3]))
    assert ops_of(g).count("weight") == 2  # one node per weight name however often it is used
    assert set(g.weights) == {"layer.w", "layer.b"}
    x, wv, bv = randn(5, 3), randn(4, 3), randn(4)
    y, w2, flat, neg, lw = run(g, x, weights={"layer.w": wv, "layer.b": bv})
    np.testing.assert_array_equal(neg, -wv[1:])
    np.testing.assert_allclose(lw, left.astype(np.float64) @ wv, rtol=1e-5)
    np.testing.assert_allclose(y, x.astype(np.float64) @ wv.T + bv, rtol=1e-5)
    np.testing.assert_allclose(w2, wv * 2)
    np.testing.assert_array_equal(flat, wv.reshape(12))
    assert 'gir.weight {device = cpu:0, dtype = f32, name = "layer.w", shape = [4, 3]}' in str(g)
    assert str(parse(str(g))) == str(g)
    with pytest.raises(ValueError, match="'layer.b'.*was not given"):
        run(g, x, weights={"layer.w": wv})
    with pytest.raises(ValueError, match="expected shape"):
        run(g, x, weights={"layer.w": wv.T, "layer.b": bv})


def test_weight_errors():
    with pytest.raises(ValueError, match="static shape"):
        Weight("w", F32, ["n", 3])
    with pytest.raises(ValueError, match="non-empty"):
        Weight("", F32, [3])
    a, b = Weight("same", F32, [3]), Weight("same", F32, [4])
    with pytest.raises(ValueError, match="used with two types"):
        build(lambda x: x + a + b[:3], TensorType(F32, [3]))


# -- chain token and side effects --------------------------------------------------------------
_STORE = "test_types_values_store"


def _store_rule(ins, attrs):
    buf, x = ins
    if not isinstance(buf, BufferType) or buf.shape != x.shape:
        raise ValueError("store needs a buffer and a value of its shape")
    return []


def _store_ref(ins, attrs):
    buf, x = ins
    return [buf + x]  # the new buffer contents (writes=(0,))


if _STORE not in REGISTRY:
    register(OpDef(_STORE, _store_rule, _store_ref, effects=True, writes=(0,)))


def _store(buf, x):
    return buf.graph.apply(_STORE, [buf, x])


def test_chain_threads_effects_in_program_order():
    bt = BufferType(F32, [4])
    with Graph("eff", input_types=[bt, TensorType(F32, [4])]) as g:
        buf, x = g.inputs
        _store(buf, x)
        y = x * 2.0
        _store(buf, y)
        g.output(y)
    stores = [n for n in g.nodes if n.op == _STORE]
    assert g.nodes[0].op == "chain"
    assert stores[0].operands[-1] is g.nodes[0].results[0]
    assert stores[1].operands[-1] is stores[0].results[-1]  # second write waits for the first
    assert g._chain is stores[1].results[-1]
    assert all(isinstance(n.results[-1].type, ChainType) for n in stores)
    text = str(g)
    assert "%0 = gir.chain : !chain" in text and "!chain" in text
    assert str(parse(text)) == text
    b0, xv = randn(4), randn(4)
    b = b0.copy()
    (out,) = run(g, b, xv)
    np.testing.assert_allclose(b, b0 + xv + 2 * xv, rtol=1e-6)  # buffer updated in place
    np.testing.assert_allclose(out, 2 * xv)


def test_chain_is_not_an_output_and_buffer_not_indexable():
    with Graph("eff2", input_types=[BufferType(F32, [4])]) as g:
        with pytest.raises(TypeError, match="buffers are read through ops"):
            g.inputs[0][0]
        g.outputs = [g.chain]
        with pytest.raises(ValueError, match="chain token"):
            g.verify()


def test_to_networkx_topological_order():
    bt = BufferType(F32, [4])
    with Graph("nx", input_types=[bt, TensorType(F32, [4])]) as g:
        buf, x = g.inputs
        a = ops.exp(x)
        _store(buf, a)
        b = a + x
        _store(buf, b)
        g.output(b * a)
    dg = g.to_networkx()
    assert nx.is_directed_acyclic_graph(dg)
    order = list(nx.topological_sort(dg))
    pos = {k: i for i, k in enumerate(order)}
    for u, v in dg.edges:
        assert pos[u] < pos[v]
    stores = [i for i, n in enumerate(g.nodes) if n.op == _STORE]
    assert dg.has_edge(stores[0], stores[1])  # the chain edge orders the two writes
    assert pos[stores[0]] < pos[stores[1]]
    assert dg.nodes[stores[0]]["op"] == _STORE and dg.nodes["output"]["op"] == "output"
    assert dg.in_degree("output") == 1
    assert set(dg.successors(("input", 1))) == {i for i, n in enumerate(g.nodes)
                                              if any(v is x for v in n.operands)}
    # Any topological order of the op nodes is a valid program order: the interpreter agrees.
    perm_nodes = [g.nodes[k] for k in order if isinstance(k, int)]
    b0, xv = randn(4), randn(4)
    b1, b2 = b0.copy(), b0.copy()
    want = run(g, b1, xv)[0]
    g.nodes = perm_nodes
    g.verify()
    np.testing.assert_array_equal(run(g, b2, xv)[0], want)
    np.testing.assert_array_equal(b1, b2)


def test_as_tensor_type_errors():
    with Graph("g", input_types=[TensorType(F32, [2])]) as g:
        with pytest.raises(TypeError, match="cannot use"):
            g.inputs[0] + "x"
        c = ops.constant(np.arange(3), DType.int64)
        assert isinstance(c, TensorValue) and c.dtype is DType.int64 and c.shape == (Dim(3),)
