"""matmul and fused_qkv_matmul compiled for the CPU match the interpreter: the packed fast path
(dynamic M with a remainder, weights pre-packed at load, packed in the call, f32/bf16, bias) and
the general batched form (broadcast batch dims, transpose flags, rank-1 lhs, ints)."""
import copy

import numpy as np
import pytest

from graphir import ops
from graphir import DType, Graph, TensorType, Weight
from graphir.runtime.interpreter import run

from .harness import assert_matches_interpreter

pytest.importorskip("mlir.ir")


def _rand(rng, shape, dt=np.float32):
    return rng.standard_normal(shape).astype(dt)


def _session_model(graph, weights, target=None):
    from graphir.runtime.session import InferenceSession

    return InferenceSession().load(graph, weights=weights, target=target)


def _host_runs(target: str) -> bool:
    from graphir.lowering.mlir_cpu.cpu_target import CpuTarget, host_cpu

    return not CpuTarget.parse(target.split(":", 1)[1]).missing_on(host_cpu())


def _check_rows(graph, model, weights, make_inputs, row_counts, tol):
    for m in row_counts:
        inputs = make_inputs(m)
        want = run(graph, *copy.deepcopy(inputs), weights=weights)
        got = model.execute(*inputs)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol,
                                       atol=tol, err_msg=f"rows={m}")


# (target, the layouts its register block gives W [48, 48] (twice) and V [48, 32], its MR)
_TARGETS = [("cpu:x86-64:avx2", ["nk16", "kn16", "kn16"], 6),
            ("cpu:x86-64:avx512", ["nk16", "kn16", "kn32"], 8)]


@pytest.mark.parametrize("target,layouts,mr", _TARGETS, ids=[t[0] for t in _TARGETS])
def test_weight_matmul_dynamic_rows_prepacked(target, layouts, mr):
    """x @ W^T and x @ V for row counts around multiples of the target's MR (block part +
    remainder), W and V packed once at load (panels as wide as N allows), W shared by two
    kernels in two layouts."""
    if not _host_runs(target):
        pytest.skip(f"this CPU cannot run {target}")
    rng = np.random.default_rng(0)
    with Graph("mm", input_types=[TensorType(DType.float32, ["n", 48])]) as g:
        x = g.inputs[0]
        w = Weight("w", DType.float32, [48, 48])
        v = Weight("v", DType.float32, [48, 32])
        y = ops.matmul(x, w, transpose_b=True)
        g.output(y, ops.matmul(y, w), ops.matmul(x, v))
    weights = {"w": _rand(rng, (48, 48)), "v": _rand(rng, (48, 32))}
    model = _session_model(g, weights, target)
    assert model.artifact.target == target
    assert model.artifact.manifest["cpu"]["matmul_block"][0] == mr
    steps = [s for s in model.plan.steps if s.op == "matmul"]
    assert [s.attrs.get("prepack") for s in steps] == [[[1, lay]] for lay in layouts]
    _check_rows(g, model, weights, lambda m: [_rand(rng, (m, 48))],
                [1, mr - 1, mr, mr + 1, 2 * mr + 3], 1e-4)


def test_matmul_activations_and_batched_forms():
    rng = np.random.default_rng(1)
    f32 = DType.float32
    with Graph("mm2", input_types=[TensorType(f32, [2, "s", 32]), TensorType(f32, [32, 16]),
                                   TensorType(f32, [3, 1, 4, 5]), TensorType(f32, [2, 5, 6]),
                                   TensorType(f32, [5]), TensorType(f32, [4, 7])]) as g:
        x3, b, p, q, vec, t = g.inputs
        g.output(ops.matmul(x3, b),                      # packed in the call, rows = 2 * s
                 ops.matmul(p, q),                       # broadcast batch dims
                 ops.matmul(vec, q),                     # rank-1 lhs
                 ops.matmul(t, p, transpose_a=True),     # [4, 7]^T @ [3, 1, 4, 5]
                 ops.matmul(q, q, transpose_b=True))     # [2, 5, 5]
    assert_matches_interpreter(g, _rand(rng, (2, 3, 32)), _rand(rng, (32, 16)),
                               _rand(rng, (3, 1, 4, 5)), _rand(rng, (2, 5, 6)), _rand(rng, 5),
                               _rand(rng, (4, 7)), rtol=1e-4, atol=1e-4)


def test_matmul_ints_and_bf16():
    rng = np.random.default_rng(2)
    with Graph("mm3", input_types=[TensorType(DType.int32, [3, 4]), TensorType(DType.int32, [4, 5]),
                                   TensorType(DType.bfloat16, ["n", 32])]) as g:
        a, b, x = g.inputs
        w = Weight("w", DType.bfloat16, [16, 32])
        g.output(ops.matmul(a, b), ops.matmul(x, w, transpose_b=True))
    weights = {"w": _rand(rng, (16, 32))}
    assert_matches_interpreter(g, rng.integers(-5, 5, (3, 4)).astype(np.int32),
                               rng.integers(-5, 5, (4, 5)).astype(np.int32),
                               _rand(rng, (6, 32)), weights=weights, rtol=2e-2, atol=2e-2)


def test_fused_qkv_matmul_concat_weights_bias():
    """The qkv weight is a concat of three weights: computed once at load, then packed."""
    rng = np.random.default_rng(3)
    with Graph("qkv", input_types=[TensorType(DType.float32, ["t", 32])]) as g:
        x = g.inputs[0]
        ws = [Weight(n, DType.float32, [s, 32]) for n, s in (("q", 32), ("k", 16), ("v", 16))]
        bias = Weight("bias", DType.float32, [64])
        wqkv = ops.concat(ws, axis=0)
        g.output(ops.fused_qkv_matmul(x, wqkv), ops.fused_qkv_matmul(x, wqkv, bias))
    weights = {"q": _rand(rng, (32, 32)), "k": _rand(rng, (16, 32)), "v": _rand(rng, (16, 32)),
               "bias": _rand(rng, 64)}
    model = _session_model(g, weights)
    ops_at_load = {s.op for s in model.plan.steps if s.attrs.get("at_load")}
    assert ops_at_load == {"concat"}
    from graphir.lowering.mlir_cpu.cpu_target import host_target
    from graphir.lowering.mlir_cpu.schedules import MatmulConfig

    nr = MatmulConfig.for_target(host_target()).panel_width(64)
    assert all(s.attrs.get("prepack") == [[1, f"nk{nr}"]] for s in model.plan.steps
               if s.op == "fused_qkv_matmul")
    _check_rows(g, model, weights, lambda m: [_rand(rng, (m, 32))], [3, 4, 9], 1e-4)


def test_fused_qkv_matmul_general_path():
    """N = 12, no multiple of an AVX2/AVX-512 vector: the generic form, bias broadcast."""
    rng = np.random.default_rng(4)
    with Graph("qkv2", input_types=[TensorType(DType.float32, ["t", 8]), TensorType(DType.float32, [12, 8]),
                                    TensorType(DType.float32, [12])]) as g:
        x, w, b = g.inputs
        g.output(ops.fused_qkv_matmul(x, w, b))
    assert_matches_interpreter(g, _rand(rng, (5, 8)), _rand(rng, (12, 8)), _rand(rng, 12),
                               rtol=1e-5, atol=1e-5)


def test_pack_operand_layouts_and_errors():
    from graphir.runtime.cpu_executor import pack_operand

    w = _rand(np.random.default_rng(5), (64, 24))
    nk = pack_operand(w, "nk32")             # W [N=64, K=24] used transposed
    kn = pack_operand(w.T, "kn32")           # the same W^T stored [K, N]
    assert nk.shape == kn.shape == (2, 24, 32)
    np.testing.assert_array_equal(nk, kn)
    np.testing.assert_array_equal(nk[1, 5], w[32:64, 5])
    # Panels start on a cache line (numpy alone puts a large array 16 bytes past one).
    big = pack_operand(_rand(np.random.default_rng(6), (256, 1024)), "nk32")
    for p in (nk, kn, big):
        assert p.ctypes.data % 64 == 0 and p.flags.c_contiguous and p.dtype == np.float32
    with pytest.raises(ValueError, match="unknown pack layout 'nk'"):
        pack_operand(w, "nk")
    with pytest.raises(ValueError, match=r"'nk32': N = 24 is not a multiple of 32"):
        pack_operand(w.T, "nk32")
    # bf16 pairs: lane j of a panel's k-pair row holds W[p*32 + j, 2kk] and W[p*32 + j, 2kk + 1]
    wb = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)      # bf16-exact values
    pairs = pack_operand(wb, "nk32p")
    assert pairs.shape == (2, 12, 64) and pairs.dtype == np.uint16 and pairs.ctypes.data % 64 == 0
    as_f32 = (pairs.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(as_f32[1, 5, 0::2], wb[32:64, 10])
    np.testing.assert_array_equal(as_f32[1, 5, 1::2], wb[32:64, 11])
    np.testing.assert_array_equal(pack_operand(wb.T, "kn32p"), pairs)
    with pytest.raises(ValueError, match="K = 23 is odd"):
        pack_operand(wb[:, :23], "nk32p")
    # Packing into given memory (what pack_operand does): the wrong buffer is refused.
    from graphir.lowering.mlir_cpu.pack_layout import pack_numpy
    with pytest.raises(ValueError, match=r"out must be C-contiguous float32 \(2, 24, 32\)"):
        pack_numpy(w, "nk32", out=np.empty((2, 24, 32), np.float64))
