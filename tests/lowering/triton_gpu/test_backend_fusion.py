"""The elementwise-fusion grouping pass and the backend's use of it (no compilation)."""

from graphir import ops
from graphir import DType, Graph, TensorType
from graphir.passes.elementwise_fusion import elementwise_fusion, find_groups


def graph(fn, *shapes):
    with Graph("g", input_types=[TensorType(DType.float32, s) for s in shapes]) as g:
        out = fn(*g.inputs)
        g.output(*(out if isinstance(out, (list, tuple)) else [out]))
    return g


def ops_of(group):
    return [n.op for n in group.nodes]


def test_a_same_shape_chain_is_one_group_and_broadcast_producers_stay_apart():
    g = graph(lambda x, y: ops.exp(x * ops.sigmoid(y) + 1.0) - ops.tanh(x), ["n", 8], [1, 8])
    groups = find_groups(g)
    assert sorted(map(ops_of, groups)) == [["mul", "add", "exp", "tanh", "sub"], ["sigmoid"]]
    big = next(gr for gr in groups if len(gr.nodes) > 1)
    assert len(big.outputs) == 1 and big.outputs[0] is g.outputs[0]
    assert sorted(str(v.type.shape[0]) for v in big.inputs if v.type.rank == 2) == ["1", "n"]


def test_a_path_through_a_non_elementwise_op_blocks_fusion():
    # c = a + softmax(a): putting a and c in one group would need softmax inside it.
    g = graph(lambda x: (lambda a: a + ops.softmax(a))(ops.exp(x)), [4, 8])
    groups = find_groups(g)
    assert sorted(map(ops_of, groups)) == [["add"], ["exp"]]
    (exp_group,) = [gr for gr in groups if ops_of(gr) == ["exp"]]
    assert len(exp_group.outputs) == 1  # read by softmax and by add


def test_the_pass_records_groups_without_changing_the_ir():
    g = graph(lambda x: ops.exp(x) * 2.0, [3, 3])
    before = str(g)
    assert elementwise_fusion(g) is False
    assert str(g) == before and [ops_of(gr) for gr in g.fusion_groups] == [["exp", "mul"]]


def test_backend_schedules_groups_after_their_inputs():
    from graphir.lowering.triton_gpu.backend import lower

    def f(x, w):
        a = ops.exp(x)
        s = ops.softmax(a)
        return ops.matmul(a + s, w, transpose_b=True) * 0.5

    g = graph(f, ["n", 16], [8, 16])
    plan = lower(g).plan
    assert [s.op for s in plan.steps] == ["fused:exp", "softmax", "fused:add", "matmul",
                                          "fused:mul"]
    produced = {v.id for v in plan.values if v.kind in ("input", "constant", "weight")}
    for s in plan.steps:
        assert set(s.inputs) <= produced, s
        produced.update(s.outputs)
