"""bf16 x bf16 matmuls on AVX512-BF16 (lowerings/bf16_matmul.py) and AMX (amx_matmul.py):
compiled for `cpu:x86-64:avx512+bf16` they take the vdpbf16ps kernel, for `...+amx+bf16` the
tile kernel (where K and N are multiples of 32), both with W packed in bf16 pairs at load, and
match a float64 reference of the bf16 operands, and the f32 kernel's result, on fresh random
data: fewer rows than the register block or a tile, a row remainder, a ragged last 32-row block,
several row chunks and k blocks, partial panel slices and groups, a bias, a rank-3 x, W stored
[K, N]. An odd K or a W computed per call keeps the f32 kernel. Running needs a host with
avx512_bf16 (and AMX tiles Linux grants, for the AMX target); compiling does not."""
import numpy as np
import pytest

from graphir import DeviceRef, DType, Graph, TensorType, Weight, ops
from graphir.dtype import round_to
from graphir.lowering.driver import Target, compile_graph
from graphir.lowering.mlir_cpu.backend import mlir_text
from graphir.lowering.mlir_cpu.cpu_target import host_cpu
from graphir.runtime.session import InferenceSession

from .harness import cpu_runs

BF16 = "cpu:x86-64:avx512+bf16"
AMX = "cpu:x86-64:avx512+amx+bf16"
PLAIN = "cpu:x86-64:avx512"
DEV = DeviceRef.CPU()
HAS_BF16 = {"avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq",
            "avx512cd"} <= host_cpu().flags
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16")
HAS_AMX = cpu_runs(AMX)
TARGETS = [BF16, pytest.param(AMX, marks=pytest.mark.skipif(
    not HAS_AMX, reason="this CPU (or Linux here) gives no AMX tiles"))]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))


def _bf16(rng, shape, scale=1.0):
    return round_to(rng.standard_normal(shape) * scale, DType.bfloat16).astype(np.float32)


def _matmul_graph(k: int, n: int, *, lead=("T",), transpose_b=True, bias=False, qkv=False):
    wshape = [n, k] if transpose_b else [k, n]
    with Graph("bf16_mm", input_types=[TensorType(DType.bfloat16, [*lead, k], DEV)]) as g:
        w = Weight("w", DType.bfloat16, wshape, DEV)
        x = g.inputs[0]
        if qkv:
            args = [x, w] + ([Weight("b", DType.bfloat16, [n], DEV)] if bias else [])
            g.output(ops.fused_qkv_matmul(*args))
        else:
            g.output(ops.matmul(x, w, transpose_b=transpose_b))
    return g


def _run(g, target, weights, x):
    (y,) = InferenceSession().load(compile_graph(g, target), weights=weights).execute(x)
    return np.asarray(y, np.float64)


CASES = [  # rows, K, N, kwargs
    (1, 64, 32, {}),                       # one row (a decode step), one panel
    (5, 64, 96, {}),                       # fewer rows than the 8-row block
    (37, 1030, 160, {}),                   # row remainder; K/2 = 515: 5 k blocks of 103 pairs
    (130, 512, 1280, {}),                  # 40 panels in slices of 5
    (19, 256, 96, {"transpose_b": False}),  # W stored [K, N]
    (23, 128, 192, {"qkv": True, "bias": True}),
    (11, 128, 64, {"qkv": True}),
    (64, 2048, 96, {}),                    # whole 32-row blocks, 2 k blocks, 3 panels
    (600, 128, 320, {}),                   # 2 row chunks, the last block ragged (24 rows)
    (45, 96, 288, {"qkv": True, "bias": True}),   # 3 k steps; groups of 8 and 1 panels
]


@pytest.mark.parametrize("m,k,n,kw", CASES)
def test_compiles_to_the_dot_kernel(m, k, n, kw):
    text = mlir_text(_matmul_graph(k, n, **kw), "mlir", Target.parse(BF16))
    assert "x86vector.avx512.dot" in text and "amx." not in text
    assert "x86vector" not in mlir_text(_matmul_graph(k, n, **kw), "mlir", Target.parse(PLAIN))
    amx = mlir_text(_matmul_graph(k, n, **kw), "mlir", Target.parse(AMX))
    # The tile kernel where whole k steps and panels fit, else the dot kernel.
    assert ("amx.tile_mulf" in amx) == (k % 32 == 0)
    assert ("x86vector.avx512.dot" in amx) == (k % 32 != 0)


@needs_bf16
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m,k,n,kw", CASES)
def test_matches_the_reference_and_the_f32_kernel(m, k, n, kw, target):
    rng = np.random.default_rng(m * 1000 + k + n)
    transpose_b = kw.get("transpose_b", True)
    w = _bf16(rng, (n, k) if transpose_b else (k, n), k ** -0.5)
    weights = {"w": w}
    x = _bf16(rng, (m, k))
    want = x.astype(np.float64) @ (w.T if transpose_b else w).astype(np.float64)
    if kw.get("bias"):
        weights["b"] = _bf16(rng, (n,))
        want = want + weights["b"]
    g = _matmul_graph(k, n, **kw)
    got = _run(g, target, weights, x)
    # The result is stored in bf16: within half a bf16 step of the exact value, plus f32 sums.
    np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-5 * np.abs(want).max())
    # The f32 kernel rounds its f32 sums in another order: at most a bf16 step apart.
    other = _run(g, PLAIN, weights, x)
    np.testing.assert_allclose(got, other, rtol=2 ** -7, atol=1e-6)


@needs_bf16
@pytest.mark.parametrize("target", TARGETS)
def test_rank3_rows_and_dynamic_rows(target):
    rng = np.random.default_rng(3)
    k, n = 96, 64
    w = _bf16(rng, (n, k), k ** -0.5)
    g = _matmul_graph(k, n, lead=("B", "S"))
    for b, s in ((2, 7), (3, 1), (1, 9), (5, 9), (4, 16)):   # rows 14 ... 45, 64
        x = _bf16(rng, (b, s, k))
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        np.testing.assert_allclose(_run(g, target, {"w": w}, x), want, rtol=2 ** -8,
                                   atol=1e-5 * np.abs(want).max())


def test_odd_k_and_per_call_weights_keep_the_f32_kernel():
    assert "x86vector" not in mlir_text(_matmul_graph(63, 64), "mlir", Target.parse(BF16))
    with Graph("bf16_act", input_types=[TensorType(DType.bfloat16, ["T", 64], DEV),
                                        TensorType(DType.bfloat16, [32, 64], DEV)]) as g:
        g.output(ops.matmul(g.inputs[0], g.inputs[1], transpose_b=True))
    assert "x86vector" not in mlir_text(g, "mlir", Target.parse(BF16))
    if HAS_BF16:
        rng = np.random.default_rng(4)
        x, w = _bf16(rng, (5, 64)), _bf16(rng, (32, 64))
        (y,) = InferenceSession().load(compile_graph(g, BF16)).execute(x, w)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64),
                                   rtol=2 ** -8, atol=1e-4)
