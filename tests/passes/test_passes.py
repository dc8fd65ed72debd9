"""canonicalize, cse, dce and the pass manager: before/after IR, numbers unchanged, effects kept."""
import io

import numpy as np
import pytest

from graphir import ops
from graphir import BufferType, DType, Graph, TensorType, VerificationError, parse
from graphir.opdef import REGISTRY, OpDef, register
from graphir.passes import PASSES, PassManager, register_pass, run_passes
from graphir.runtime.interpreter import run

F32 = DType.float32
rng = np.random.default_rng(99)


def randn(*shape):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.where(np.abs(a) < 0.05, 0.7, a).astype(np.float32)


def build(fn, *types):
    with Graph("p", input_types=list(types)) as g:
        out = fn(*g.inputs)
        g.output(*(out if isinstance(out, (list, tuple)) else [out]))
    return g


def body(g) -> list[str]:
    return str(g).splitlines()[1:-1]


def op_names(g):
    return [n.op for n in g.nodes]


# -- canonicalize --------------------------------------------------------------------------------
def test_constant_folding_before_after():
    def fn(x):
        a = ops.constant(np.array([1.0, 2.0, 3.0]), F32)
        b = ops.constant(np.array([0.5, 0.25, 4.0]), F32)
        return x * ops.exp(a * b - 1.0)
    g = build(fn, TensorType(F32, [3]))
    x = randn(3)
    before = run(g, x)[0]
    assert op_names(g) == ["constant", "constant", "mul", "constant", "sub", "exp", "mul"]
    run_passes(g, ["canonicalize", "dce"])
    assert op_names(g) == ["constant", "mul"]
    folded = g.nodes[0].attrs["value"]
    want = np.exp(np.array([1.0, 2.0, 3.0]) * [0.5, 0.25, 4.0] - 1.0).astype(np.float32)
    np.testing.assert_array_equal(folded, want)
    np.testing.assert_array_equal(run(g, x)[0], before)
    assert body(g) == [
        "  %0 = gir.constant {device = cpu:0, dtype = f32, value = dense<[3] : "
        f"[{float(want[0])!r}, {float(want[1])!r}, {float(want[2])!r}]>}} : tensor<[3], f32, cpu:0>",
        "  %1 = gir.mul(%arg0, %0) : tensor<[3], f32, cpu:0>",
        "  gir.output %1"]


def test_folding_rounds_to_the_result_dtype_and_respects_limit():
    def fn(x):
        c = ops.constant(np.array([1.0, 1.0 + 2 ** -7]), DType.bfloat16)
        big = ops.constant(np.ones(70000), F32)
        return [x + c * 3.0, ops.sum(big * 2.0, axis=0)]
    g = build(fn, TensorType(DType.bfloat16, [2]))
    x = randn(2)
    before = run(g, x)
    run_passes(g, ["canonicalize", "dce"])
    assert op_names(g) == ["constant", "constant", "add", "constant", "mul", "sum"]
    folded = g.nodes[1]
    assert folded.attrs["dtype"] is DType.bfloat16
    # 3 * (1 + 2^-7) = 3.0234375 is a bf16 tie: it rounds to even, 3.03125 (f32 would keep it).
    np.testing.assert_array_equal(folded.attrs["value"], [3.0, 3.03125])
    # 70000 elements exceed the fold limit: the big product stays an op (and so does its sum).
    assert g.nodes[4].results[0].type.static_shape() == (70000,)
    for a, b in zip(before, run(g, x)):
        np.testing.assert_array_equal(a, b)


def test_identity_removal():
    def fn(x, y):
        return [x * 1.0, x + 0.0, x - 0.0, x / 1.0, x.reshape([4, 6]), x.cast(F32),
                ops.permute(x, [0, 1]), ops.concat([x]), ops.split(x, [6], axis=1)[0], x[0:4, :],
                ops.broadcast_to(y, [4, 6]), x * 2.0]
    g = build(fn, TensorType(F32, [4, 6]), TensorType(F32, [4, 6]))
    x, y = randn(4, 6), randn(4, 6)
    before = run(g, x, y)
    run_passes(g, ["canonicalize", "dce"])
    assert all(o is g.inputs[0] for o in g.outputs[:10])
    assert g.outputs[10] is g.inputs[1]
    assert op_names(g) == ["constant", "mul"]  # only x * 2.0 is left
    for a, b in zip(before, run(g, x, y)):
        np.testing.assert_array_equal(a, b)


def test_identity_removal_keeps_what_changes_values():
    def fn(x):
        return [x * 1.5, x + 1.0, x[1:3], x.cast(DType.float16), ops.permute(x, [1, 0]),
                x.reshape([6, 4]), x * ops.constant(np.array([1.0, 1, 1, 1, 1, 2]), F32)]
    g = build(fn, TensorType(F32, [4, 6]))
    n_before = len(g.nodes)
    run_passes(g, ["canonicalize"])
    assert len(g.nodes) == n_before
    assert not any(o is g.inputs[0] for o in g.outputs)


def test_reshape_and_permute_chains():
    def fn(x):
        r = x.reshape([6, 4]).reshape([2, 12]).reshape([24])
        p = ops.permute(ops.permute(x.reshape([2, 3, 4]), [1, 2, 0]), [2, 0, 1])  # identity
        q = ops.permute(ops.permute(x.reshape([2, 3, 4]), [1, 0, 2]), [0, 2, 1])
        return [r, p, q, x.T.T]
    g = build(fn, TensorType(F32, [4, 6]))
    x = randn(4, 6)
    before = run(g, x)
    run_passes(g, ["canonicalize", "cse", "dce"])
    text = str(g)
    assert body(g) == [
        "  %0 = gir.reshape(%arg0) {shape = [24]} : tensor<[24], f32, cpu:0>",
        "  %1 = gir.reshape(%arg0) {shape = [2, 3, 4]} : tensor<[2, 3, 4], f32, cpu:0>",
        "  %2 = gir.permute(%1) {dims = [1, 2, 0]} : tensor<[3, 4, 2], f32, cpu:0>",
        "  gir.output %0, %1, %2, %arg0"], text
    for a, b in zip(before, run(g, x)):
        np.testing.assert_array_equal(a, b)


def test_symbolic_reshape_chain():
    def fn(x):
        return x.reshape(["n", 2, 3]).reshape(["n", 6])
    g = build(fn, TensorType(F32, ["n", 6]))
    run_passes(g, ["canonicalize", "dce"])
    assert g.nodes == [] and g.outputs[0] is g.inputs[0]


# -- cse -----------------------------------------------------------------------------------------
def test_cse_merges_equal_pure_ops():
    def fn(x):
        a = ops.exp(x) + ops.exp(x)
        b = ops.softmax(x, axis=0) * ops.softmax(x, axis=0)
        c = ops.softmax(x, axis=1)  # different attribute: kept
        return [a, b, c, x * 2.0 + x * 2.0]
    g = build(fn, TensorType(F32, [3, 4]))
    x = randn(3, 4)
    before = run(g, x)
    assert op_names(g).count("exp") == 2 and op_names(g).count("constant") == 2
    assert run_passes(g, ["cse"]) is g
    names = op_names(g)
    assert names.count("exp") == 1 and names.count("softmax") == 2 and names.count("constant") == 1
    assert names.count("mul") == 2
    add = next(n for n in g.nodes if n.op == "add")
    assert add.operands[0] is add.operands[1]
    for a, b in zip(before, run(g, x)):
        np.testing.assert_array_equal(a, b)
    assert str(parse(str(g))) == str(g)


# -- effects: a test-only op that writes a buffer ---------------------------------------------------
_STORE = "test_passes_store"
if _STORE not in REGISTRY:
    register(OpDef(_STORE, lambda ins, a: [], lambda ins, a: [ins[0] + ins[1]], effects=True,
                   writes=(0,)))


def _effect_graph():
    with Graph("eff", input_types=[BufferType(F32, [4]), TensorType(F32, [4])]) as g:
        buf, x = g.inputs
        unused = ops.exp(x)  # noqa: F841  (dead)
        g.apply(_STORE, [buf, x])
        g.apply(_STORE, [buf, x])  # identical write: must not be merged by cse
        g.output(x * 3.0)
    return g


def test_dce_never_drops_effects_and_cse_never_merges_them():
    g = _effect_graph()
    b0, x = randn(4), randn(4)
    b_before = b0.copy()
    run(g, b_before, x)
    run_passes(g, ["cse", "dce"])
    assert op_names(g) == ["chain", _STORE, _STORE, "constant", "mul"]
    b_after = b0.copy()
    run(g, b_after, x)
    np.testing.assert_array_equal(b_after, b_before)
    np.testing.assert_allclose(b_after, b0 + 2 * x, rtol=1e-6)
    assert str(parse(str(g))) == str(g)


def test_dce_removes_dead_code_and_an_unused_chain():
    with Graph("dead", input_types=[TensorType(F32, [4])]) as g:
        x = g.inputs[0]
        _ = g.chain  # a chain token nobody uses
        a = ops.exp(x)
        ops.log(a)  # dead
        g.output(a)
    assert op_names(g) == ["chain", "exp", "log"]
    assert PASSES["dce"](g) is True
    assert op_names(g) == ["exp"] and g._chain is None
    assert PASSES["dce"](g) is False


# -- the pass manager ------------------------------------------------------------------------------
def test_print_after_all():
    g = build(lambda x: ops.exp(x) * 1.0 + ops.exp(x), TensorType(F32, [2]))
    out = io.StringIO()
    pm = PassManager(["canonicalize", "cse", "dce", "dce"], print_after_all=True, out=out)
    pm.run(g)
    text = out.getvalue()
    headers = [ln for ln in text.splitlines() if ln.startswith("// -----//")]
    assert headers == ["// -----// IR after canonicalize //----- //",
                       "// -----// IR after cse //----- //",
                       "// -----// IR after dce //----- //",
                       "// -----// IR after dce (no change) //----- //"]
    assert text.endswith(str(g))
    assert text.count("graph @p(") == 4
    assert [t[0] for t in pm.timings] == ["canonicalize", "cse", "dce", "dce"]
    assert [t[2] for t in pm.timings] == [True, True, True, False]


_BROKEN = "test-broken-pass"
if _BROKEN not in PASSES:
    @register_pass(_BROKEN)
    def _broken(graph) -> bool:
        graph.nodes.reverse()  # uses before definitions
        return True


def test_verification_failure_after_a_broken_pass():
    g = build(lambda x: ops.exp(ops.neg(x)), TensorType(F32, [2]))
    with pytest.raises(VerificationError, match=f"after pass '{_BROKEN}': node 0 \\(gir.exp.*used before"):
        run_passes(g, ["cse", _BROKEN, "dce"])
    g2 = build(lambda x: ops.exp(ops.neg(x)), TensorType(F32, [2]))
    run_passes(g2, [_BROKEN], verify=False)  # not verified: no error


def test_unknown_pass_name():
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['cannonicalize'\]; known: .*'canonicalize'"):
        PassManager(["cannonicalize", "dce"])


def test_default_pipeline_runs():
    g = build(lambda x: ops.exp(x) + ops.exp(x) * 1.0, TensorType(F32, [2]))
    run_passes(g)
    assert op_names(g) == ["exp", "add"]


# -- numbers unchanged by the passes ---------------------------------------------------------------
def _graphs():
    yield build(lambda x, w: ops.softmax(ops.matmul(x, w, transpose_b=True) * (1 / 8) + 0.0, axis=-1)
                + ops.softmax(ops.matmul(x, w, transpose_b=True) * (1 / 8), axis=-1),
                TensorType(F32, ["n", 8]), TensorType(F32, [5, 8])), [(3, 8), (5, 8)]
    yield build(lambda x: ops.rms_norm(x.reshape([-1, 4]).reshape(["n", 2, 4]),
                                       ops.constant(np.linspace(0.5, 1.5, 4), F32), 1e-6)
                * ops.constant(np.array(2.0), F32) / 1.0,
                TensorType(F32, ["n", 8])), [(3, 8)]
    g = build(lambda x: ops.concat(ops.split(x, [2, 3], axis=1)[::-1], axis=1).T[1:, ::2],
              TensorType(F32, [4, 5]))
    g.name = "p3"  # nothing to canonicalize here
    yield g, [(4, 5)]


@pytest.mark.parametrize("passes", [["canonicalize"], ["cse"], ["dce"], ["canonicalize", "cse", "dce"]])
def test_numbers_unchanged_by_passes(passes):
    for g, shapes in _graphs():
        ins = [randn(*s) for s in shapes]
        before = run(g, *ins)
        ir_before = str(g)
        run_passes(g, passes)
        after = run(g, *ins)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        if passes[0] == "canonicalize" and g.name != "p3":
            assert str(g) != ir_before
        assert str(parse(str(g))) == str(g)
