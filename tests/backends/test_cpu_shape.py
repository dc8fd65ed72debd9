"""Shape ops compiled for the CPU match the interpreter: reshape (as a view and as a kernel),
permute, broadcast_to, concat, split, slice (symbolic bounds, steps), gather, scatter, range."""
import numpy as np
import pytest

from graphir import ops
from graphir import DType, Graph, TensorType, Weight
from graphir.dim import Dim

from .harness import assert_matches_interpreter

pytest.importorskip("mlir.ir")


def _data(rng, shape, dt):
    if dt.is_float:
        return (rng.standard_normal(shape) * 3).astype(
            np.float16 if dt is DType.float16 else np.float32)
    if dt is DType.bool:
        return rng.random(shape) < 0.5
    lo = 0 if dt in (DType.uint8, DType.uint32) else -100
    return rng.integers(lo, 100, shape).astype(dt.storage)


def _plan_ops(graph) -> dict[str, list[str]]:
    """op -> the kernel of each of its steps ("view" or a compiled symbol)."""
    from graphir.lowering.driver import compile_graph

    out: dict[str, list[str]] = {}
    for s in compile_graph(graph, "cpu").manifest["plan"]["steps"]:
        out.setdefault(s["op"], []).append(s["kernel"])
    return out


def test_reshape_views_and_kernels():
    rng = np.random.default_rng(20)
    n = Dim("n")
    with Graph("rs", input_types=[TensorType(DType.float32, ["n", 6]),
                                  TensorType(DType.bfloat16, ["n", 2, 3]),
                                  TensorType(DType.int32, [1, 1])]) as g:
        x, xb, s = g.inputs
        w = Weight("w", DType.float32, [2, 3])
        y = x * 2.0
        view_of_intermediate = ops.reshape(y, [n * 6]) + 1.0        # view, consumed by a kernel
        view_of_input = ops.sum(ops.reshape(x, [n, 3, 2]), -1)      # view of a graph input
        view_of_weight = ops.reshape(w, [3, 2]) * 3.0               # view of a weight
        g.output(view_of_intermediate, view_of_input, view_of_weight,
                 ops.reshape(x, [n, 2, 3]),                         # kernel: input -> output
                 ops.reshape(y, [2, n, 3]),                         # kernel: intermediate -> output
                 ops.reshape(w, [6]),                               # kernel: weight -> output
                 ops.reshape(xb, [-1, 6]),                          # kernel, bf16
                 ops.reshape(s, []),                                # rank 0 result
                 ops.reshape(ops.reshape(s * 2, []) + 1, [1, 1, 1]))  # view to rank 0; rank 0 input
    kernels = _plan_ops(g)["reshape"]
    assert kernels.count("view") == 4 and len(kernels) == 10, kernels
    assert_matches_interpreter(g, _data(rng, (5, 6), DType.float32),
                               _data(rng, (5, 2, 3), DType.bfloat16),
                               _data(rng, (1, 1), DType.int32),
                               weights={"w": _data(rng, (2, 3), DType.float32)})


@pytest.mark.parametrize("dt", [DType.float32, DType.bfloat16, DType.int64])
def test_permute_broadcast_concat_split_slice(dt):
    rng = np.random.default_rng(21)
    n = Dim("n")
    with Graph("sh", input_types=[TensorType(dt, ["n", 3, 4]), TensorType(dt, [2, 4])]) as g:
        x, y = g.inputs
        both = ops.concat([x, x[:2]], axis=0)                           # [n + 2, 3, 4]
        first, rest = ops.split(both, [n, 2], axis=0)                   # symbolic sizes
        a, b, c = ops.split(x, [1, 2, 1], axis=-1)
        p, q = ops.split(x * 2, [2, 2], axis=-1)                        # results in slots
        g.output(ops.permute(x, [2, 0, 1]), ops.permute(x, [-2, -1, 0]), x.transpose(0, 2),
                 ops.broadcast_to(y, [3, 2, 4]), ops.broadcast_to(x[:, :1, :], [n, 3, 4]),
                 ops.broadcast_to(y[:1], [n, 3, 4]),
                 both, ops.concat([x, x[..., :2], x[..., 1:2]], axis=-1),
                 ops.concat([y, x[0, :2]], axis=-2), first, rest, a, b, c,
                 x[1:, ::2, 1:3], x[:-1], x[n - 2:], x[n - 4:n - 1:2, 1:, ::3], x[:, 2],
                 x[None, :, 1:, None], p - q)
    assert_matches_interpreter(g, _data(rng, (5, 3, 4), dt), _data(rng, (2, 4), dt))


def test_gather_scatter_range():
    rng = np.random.default_rng(22)
    n = Dim("n")
    f32, i32_t, i64_t = DType.float32, DType.int32, DType.int64
    types = [TensorType(f32, ["n", 3, 4]), TensorType(i32_t, [2, 5]), TensorType(i64_t, ["k"]),
             TensorType(DType.uint32, [3]), TensorType(i64_t, ["n", 3, 2]),
             TensorType(f32, ["n", 3, 2]), TensorType(DType.bfloat16, [6, 4]),
             TensorType(i32_t, [2, 4])]
    with Graph("gs", input_types=types) as g:
        x, i32, i64, u32, sidx, upd, xb, rows = g.inputs
        along_1 = ops.cast(x[:, :1] > 0, i64_t) + 1                     # data-dependent indices
        g.output(ops.gather(x, i32, axis=1), ops.gather(x, i64, axis=0),
                 ops.gather(x, u32, axis=-1), ops.gather(xb, rows, axis=0),
                 ops.gather(x, i32[1, 2], axis=1),                      # a rank-0 index
                 ops.scatter(x, upd, sidx, axis=-1),
                 ops.scatter(x, x[:, :1] * 2.0, along_1, axis=1),
                 ops.range(0, n, 1, dtype=i64_t), ops.range(1.5, n, 0.25, dtype=DType.bfloat16),
                 ops.range(-3, n, 2.5, dtype=i32_t, out_dim=n),
                 ops.range(0.5, n, 0.75, dtype=f32))
    sidx_v = np.stack([np.stack([rng.permutation(4)[:2] for _ in range(3)]) for _ in range(5)])
    sidx_v[0, 0] -= 4  # negative indices count from the end
    assert_matches_interpreter(
        g, _data(rng, (5, 3, 4), DType.float32), rng.integers(-3, 3, (2, 5)).astype(np.int32),
        rng.integers(-5, 5, (7,)).astype(np.int64), rng.integers(0, 4, (3,)).astype(np.uint32),
        sidx_v.astype(np.int64), _data(rng, (5, 3, 2), DType.float32),
        _data(rng, (6, 4), DType.bfloat16), rng.integers(0, 6, (2, 4)).astype(np.int32))


def test_shape_ops_on_bool_and_uint8():
    rng = np.random.default_rng(23)
    with Graph("bu", input_types=[TensorType(DType.bool, ["n", 4]),
                                  TensorType(DType.uint8, [4, "n"]),
                                  TensorType(DType.int32, [3])]) as g:
        m, u, i = g.inputs
        g.output(ops.permute(m, [1, 0]), ops.concat([m, m[:1]], 0), ops.gather(u, i, 0),
                 ops.split(u, [1, 3], 0)[1], u[::2, 1:], ops.broadcast_to(m[:1], [3, 4]),
                 ops.reshape(m, [-1]))
    assert_matches_interpreter(g, _data(rng, (5, 4), DType.bool), _data(rng, (4, 5), DType.uint8),
                               rng.integers(-4, 4, (3,)).astype(np.int32))
