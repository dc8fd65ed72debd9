"""Each op's type rule rejects bad operands with a ValueError naming the op (gir.NAME) and the
operand shapes."""
import numpy as np
import pytest

from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType, parse

F32, BF16, I32, I64, BOOL = DType.float32, DType.bfloat16, DType.int32, DType.int64, DType.bool


def T(shape, dtype=F32, dev=None):
    return TensorType(dtype, shape, dev or DeviceRef.CPU())


_UNARY_FLOAT = ["exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "cos", "sin"]

CASES = [
    # (id, input types, build, op, message fragments)
    *[(f"{u}-int", [T([2, 3], I32)], (lambda u: lambda x: getattr(ops, u)(x))(u), u,
       ["needs a float operand, got i32", "tensor<[2, 3], i32, cpu:0>"]) for u in _UNARY_FLOAT],
    ("gelu-int", [T([4], I64)], lambda x: ops.gelu(x), "gelu", ["needs a float", "tensor<[4], i64, cpu:0>"]),
    ("neg-bool", [T([4], BOOL)], lambda x: ops.neg(x), "neg", ["numeric", "tensor<[4], bool, cpu:0>"]),
    ("add-shapes", [T([2, 3]), T([4])], lambda a, b: ops.add(a, b), "add",
     ["shapes [2, 3] and [4] do not broadcast"]),
    ("mul-symbolic", [T(["n", 3]), T(["m", 3])], lambda a, b: ops.mul(a, b), "mul",
     ["shapes [n, 3] and [m, 3] do not broadcast"]),
    ("sub-dtypes", [T([3]), T([3], BF16)], lambda a, b: ops.sub(a, b), "sub",
     ["dtypes differ: f32, bf16", "tensor<[3], f32, cpu:0>, tensor<[3], bf16, cpu:0>"]),
    ("div-devices", [T([3]), T([3], F32, DeviceRef.GPU(0))], lambda a, b: ops.div(a, b), "div",
     ["different devices", "tensor<[3], f32, gpu:0>"]),
    ("pow-bool", [T([3], BOOL), T([3], BOOL)], lambda a, b: ops.pow(a, b), "pow", ["numeric", "[3]"]),
    ("maximum-shapes", [T([2]), T([3])], lambda a, b: ops.maximum(a, b), "maximum", ["[2] and [3]"]),
    ("minimum-dtypes", [T([2], I32), T([2])], lambda a, b: ops.minimum(a, b), "minimum", ["i32, f32"]),
    ("mod-shapes", [T([2, 2]), T([3, 2])], lambda a, b: ops.mod(a, b), "mod", ["[2, 2] and [3, 2]"]),
    ("greater-dtypes", [T([2], I32), T([2], I64)], lambda a, b: ops.greater(a, b), "greater", ["i32, i64"]),
    ("equal-shapes", [T([5]), T([4])], lambda a, b: ops.equal(a, b), "equal", ["[5] and [4]"]),
    ("logical_and-float", [T([2]), T([2])], lambda a, b: ops.logical_and(a, b), "logical_and",
     ["needs bool operands, got f32", "tensor<[2], f32, cpu:0>"]),
    ("logical_or-shapes", [T([2], BOOL), T([3], BOOL)], lambda a, b: ops.logical_or(a, b), "logical_or",
     ["[2] and [3]"]),
    ("where-cond", [T([3]), T([3]), T([3])], lambda c, x, y: ops.where(c, x, y), "where",
     ["condition must be bool, got f32", "tensor<[3], f32, cpu:0>"]),
    ("where-shapes", [T([3], BOOL), T([4]), T([3])], lambda c, x, y: ops.where(c, x, y), "where",
     ["[3] and [4] and [3] do not broadcast"]),
    ("cast-dtype", [T([3])], lambda x: ops.cast(x, "f16"), "cast", ["needs a DType", "[3]"]),
    ("clamp-order", [T([3])], lambda x: ops.clamp(x, 2.0, 1.0), "clamp",
     ["min 2.0 is greater than max 1.0", "tensor<[3], f32, cpu:0>"]),
    ("range-step", [], lambda: ops.range(0, 5, 0), "range", ["step must not be 0"]),
    ("matmul-contract", [T([2, 3]), T([4, 5])], lambda a, b: ops.matmul(a, b), "matmul",
     ["contracting dims differ: [2, 3] @ [4, 5]"]),
    ("matmul-transpose_b", [T([2, 3]), T([4, 5])], lambda a, b: ops.matmul(a, b, transpose_b=True),
     "matmul", ["[2, 3] @ [4, 5] (transpose_b)"]),
    ("matmul-rank", [T([3]), T([3])], lambda a, b: ops.matmul(a, b), "matmul",
     ["rhs rank >= 2, got [3] @ [3]"]),
    ("matmul-batch", [T([2, 3, 4]), T([5, 4, 6])], lambda a, b: ops.matmul(a, b), "matmul",
     ["[2] and [5] do not broadcast", "tensor<[2, 3, 4], f32, cpu:0>, tensor<[5, 4, 6], f32, cpu:0>"]),
    ("matmul-transpose_a-vector", [T([3]), T([3, 2])], lambda a, b: ops.matmul(a, b, transpose_a=True),
     "matmul", ["transpose_a needs lhs rank >= 2, got [3]"]),
    ("matmul-dtypes", [T([2, 3]), T([3, 2], BF16)], lambda a, b: ops.matmul(a, b), "matmul", ["f32, bf16"]),
    ("reshape-count", [T([2, 3])], lambda x: ops.reshape(x, [4, 2]), "reshape",
     ["cannot reshape [2, 3] (6 elements) to [4, 2]"]),
    ("reshape-infer", [T(["n", 6])], lambda x: ops.reshape(x, [4, -1]), "reshape",
     ["cannot infer -1 reshaping [n, 6] to [4, -1]"]),
    ("permute-perm", [T([2, 3])], lambda x: ops.permute(x, [0, 0]), "permute",
     ["[0, 0] is not a permutation of rank 2", "tensor<[2, 3], f32, cpu:0>"]),
    ("transpose-axis", [T([2, 3])], lambda x: ops.transpose(x, 0, 2), "permute",
     ["transpose of [2, 3]", "axis 2 out of range for rank 2"]),
    ("broadcast_to", [T([3, 2])], lambda x: ops.broadcast_to(x, [3, 4]), "broadcast_to",
     ["cannot broadcast [3, 2] to [3, 4]"]),
    ("broadcast_to-rank", [T([3, 2])], lambda x: ops.broadcast_to(x, [2]), "broadcast_to",
     ["cannot broadcast [3, 2] to [2]"]),
    ("concat-off-axis", [T([2, 3]), T([2, 4])], lambda a, b: ops.concat([a, b], axis=0), "concat",
     ["shapes [2, 3], [2, 4] differ off that axis"]),
    ("concat-rank", [T([2, 3]), T([3])], lambda a, b: ops.concat([a, b], axis=0), "concat",
     ["different ranks: [2, 3], [3]"]),
    ("concat-axis", [T([2, 3]), T([2, 3])], lambda a, b: ops.concat([a, b], axis=2), "concat",
     ["axis 2 is out of range for rank 2", "tensor<[2, 3], f32, cpu:0>"]),
    ("split-sizes", [T([4, 6])], lambda x: ops.split(x, [2, 3], axis=1), "split",
     ["sum to 5, not axis 1 of [4, 6]"]),
    ("slice-range", [T([4, 6])], lambda x: x.graph.apply("slice", [x], {"starts": (0, 2), "stops": (4, 9),
                                                                       "steps": (1, 1)}), "slice",
     ["slice [2:9] is out of range for axis 1 of [4, 6]"]),
    ("slice-arity", [T([4, 6])], lambda x: x.graph.apply("slice", [x], {"starts": (0,), "stops": (4,),
                                                                       "steps": (1,)}), "slice",
     ["one start/stop/step per axis of [4, 6]"]),
    ("gather-index-dtype", [T([4, 6]), T([2])], lambda x, i: ops.gather(x, i, axis=0), "gather",
     ["indices must be integers, got f32", "tensor<[4, 6], f32, cpu:0>, tensor<[2], f32, cpu:0>"]),
    ("gather-axis", [T([4, 6]), T([2], I64)], lambda x, i: ops.gather(x, i, axis=2), "gather",
     ["axis 2 is out of range for rank 2"]),
    ("scatter-shapes", [T([4, 6]), T([2, 3]), T([2, 2], I64)], lambda x, u, i: ops.scatter(x, u, i, axis=1),
     "scatter", ["updates [2, 3] and indices [2, 2] must match"]),
    ("scatter-too-big", [T([4, 6]), T([5, 3]), T([5, 3], I64)], lambda x, u, i: ops.scatter(x, u, i, axis=1),
     "scatter", ["indices [5, 3] exceed input [4, 6] on axis 0"]),
    ("scatter-dtype", [T([4, 6]), T([4, 6], BF16), T([4, 6], I64)],
     lambda x, u, i: ops.scatter(x, u, i, axis=1), "scatter", ["updates dtype bf16 differs from input f32"]),
    *[(f"{r}-axis", [T([4, 6])], (lambda f: lambda x: f(x, axis=5))(f), r,
       ["axis 5 is out of range for rank 2", "tensor<[4, 6], f32, cpu:0>"])
      for r, f in [("sum", ops.sum), ("mean", ops.mean), ("reduce_max", ops.max), ("reduce_min", ops.min),
                   ("argmax", ops.argmax), ("softmax", ops.softmax)]],
    ("sum-rank0", [T([])], lambda x: ops.sum(x, axis=0), "sum", ["rank-0", "tensor<[], f32, cpu:0>"]),
    ("softmax-int", [T([4], I32)], lambda x: ops.softmax(x), "softmax", ["float operand, got i32"]),
    ("rms_norm-weight", [T(["n", 8]), T([4])], lambda x, w: ops.rms_norm(x, w, 1e-6), "rms_norm",
     ["weight [4] must be [8] for input [n, 8]"]),
    ("rms_norm-int", [T([2, 8], I32), T([8], I32)], lambda x, w: ops.rms_norm(x, w, 1e-6), "rms_norm",
     ["float input, got i32"]),
    ("rms_norm-eps", [T([2, 8]), T([8])], lambda x, w: ops.rms_norm(x, w, -1.0), "rms_norm",
     ["epsilon must be >= 0"]),
    ("layer_norm-beta", [T([2, 8]), T([8]), T([2, 8])], lambda x, g, b: ops.layer_norm(x, g, b, 1e-5),
     "layer_norm", ["weight [2, 8] must be [8] for input [2, 8]"]),
    ("layer_norm-device", [T([2, 8]), T([8], F32, DeviceRef.GPU(0)), T([8])],
     lambda x, g, b: ops.layer_norm(x, g, b, 1e-5), "layer_norm", ["different devices"]),
    ("transfer_to", [T([3])], lambda x: ops.transfer_to(x, 0), "transfer_to",
     ["needs a DeviceRef", "tensor<[3], f32, cpu:0>"]),
]


@pytest.mark.parametrize("types, build, op, frags", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_type_rule_rejects(types, build, op, frags):
    with Graph("bad", input_types=types) as g:
        with pytest.raises(ValueError) as ei:
            build(*g.inputs)
    msg = str(ei.value)
    assert msg.startswith(f"gir.{op}"), msg
    for f in frags:
        assert f in msg, (f, msg)
    assert g.nodes == [n for n in g.nodes if n.op in ("constant", "chain")]  # nothing bad recorded


def test_error_names_the_users_source_line():
    with Graph("bad", input_types=[T([2, 3]), T([4])]) as g:
        with pytest.raises(ValueError, match=r"\(at test_type_errors.py:\d+\)"):
            ops.add(*g.inputs)


def test_constant_needs_a_dtype():
    with Graph("bad", input_types=[]):
        with pytest.raises(TypeError, match="constant needs a DType"):
            ops.constant(np.ones(3), "f32")


def test_gelu_approximate_checked():
    with Graph("bad", input_types=[T([3])]) as g:
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
            ops.gelu(g.inputs[0], approximate="fast")


def test_device_strings_are_devices():
    with Graph("dev", input_types=[T([3])]) as g:
        y = ops.transfer_to(g.inputs[0], "gpu:1")
        c = ops.constant(1.0, F32, "cpu")
        g.output(y, c)
    assert y.type.device == DeviceRef.GPU(1) and c.type.device == DeviceRef.CPU(0)
    assert str(parse(str(g))) == str(g)  # prints as cpu:0 / gpu:1 and parses back
    with Graph("dev2", input_types=[T([3])]) as g:
        with pytest.raises(ValueError, match="ops.transfer_to: bad device 'tpu:0'"):
            ops.transfer_to(g.inputs[0], "tpu:0")
        with pytest.raises(TypeError, match="axis must be an int, got True"):
            ops.sum(g.inputs[0], axis=True)
        with pytest.raises(ValueError, match="ops.concat: .*needs at least one tensor"):
            ops.concat([])
        with pytest.raises(ValueError, match="range stop must be a finite number"):
            ops.range(0, float("inf"))
        with pytest.raises(TypeError, match="not iterable"):
            list(g.inputs[0])
