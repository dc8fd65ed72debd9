"""MLIR CPU toolchain: modules built with the Python builders, compiled AOT to .so, called
through runtime/cpu.py in a subprocess that never imports mlir, compared with numpy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

ir = pytest.importorskip("mlir.ir")
from mlir.dialects import arith, func, linalg, math, tensor  # noqa: E402

from graphir.lowering.mlir_cpu import schedules, toolchain  # noqa: E402
from graphir.runtime.cpu_executor import pack_operand  # noqa: E402

# Runs in a fresh interpreter: loads the .so, calls it, checks mlir was never imported.
_RUNNER = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from graphir.runtime.cpu import CpuLibrary
spec = json.loads(sys.argv[2])
fn = CpuLibrary(spec["so"]).function(spec["name"], len(spec["inputs"]), len(spec["outputs"]))
ins = [np.load(p) for p in spec["inputs"]]
outs = [np.zeros(s, dtype=d) for s, d in spec["outputs"]]
fn(ins, outs)
for p, o in zip(spec["out_paths"], outs):
    np.save(p, o)
assert "mlir" not in sys.modules, "runtime imported mlir"
print("MLIR_FREE")
"""


def _run_isolated(tmp_path: Path, so: Path, name: str, inputs, out_specs, threads=None):
    in_paths = []
    for i, a in enumerate(inputs):
        p = tmp_path / f"in{i}.npy"
        np.save(p, a)
        in_paths.append(str(p))
    out_paths = [str(tmp_path / f"out{i}.npy") for i in range(len(out_specs))]
    spec = {"so": str(so), "name": name, "inputs": in_paths,
            "outputs": [[list(s), d] for s, d in out_specs], "out_paths": out_paths}
    env = dict(os.environ, GRAPHIR_NUM_THREADS=str(threads)) if threads else None
    res = subprocess.run([sys.executable, "-c", _RUNNER, str(ROOT), json.dumps(spec)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "MLIR_FREE" in res.stdout
    return [np.load(p) for p in out_paths]


def _t(shape, el=None):
    return ir.RankedTensorType.get(shape, el or ir.F32Type.get())


def _generic(inputs, init, maps, iterators, body):
    """linalg.generic via the builders; body(args) returns the value to yield."""
    iters = ir.ArrayAttr.get([ir.Attribute.parse(f"#linalg.iterator_type<{x}>")
                              for x in iterators])
    op = linalg.GenericOp([init.type], inputs, [init],
                          ir.ArrayAttr.get([ir.AffineMapAttr.get(m) for m in maps]), iters)
    block = op.regions[0].blocks.append(
        *[ir.RankedTensorType(v.type).element_type for v in list(inputs) + [init]])
    with ir.InsertionPoint(block):
        linalg.YieldOp([body(block.arguments)])
    return op.result


def _d(*idx):
    return [ir.AffineDimExpr.get(i) for i in idx]


def _compile(build, tmp_path, schedule=False):
    with toolchain.new_context(), ir.Location.unknown():
        module = ir.Module.create()
        with ir.InsertionPoint(module.body):
            build()
        if schedule:
            assert schedules.apply_matmul_schedule(module) == 1
        assert "llvm.func" in toolchain.stage_text(module, "llvm")
        return toolchain.compile_to_shared_object(module, tmp_path / "k.so")


def test_linear_transposed_b_plus_bias(tmp_path):
    m, k, n = 5, 12, 7

    def build():
        f32 = ir.F32Type.get()

        @func.FuncOp.from_py_func(_t([m, k]), _t([n, k]), _t([n]), name="linear")
        def linear(x, w, b):
            zero = arith.constant(f32, 0.0)
            acc = linalg.fill(zero, outs=[tensor.empty([m, n], f32)])
            maps = [ir.AffineMap.get(3, 0, _d(*p))
                    for p in ((0, 2), (1, 2), (0, 1))]
            y = linalg.matmul(x, w, outs=[acc], indexing_maps=maps)
            d2 = ir.AffineMap.get(2, 0, _d(0, 1))
            return _generic([y, b], tensor.empty([m, n], f32),
                            [d2, ir.AffineMap.get(2, 0, _d(1)), d2], ["parallel", "parallel"],
                            lambda a: arith.addf(a[0], a[1]))

    so = _compile(build, tmp_path)
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (n,)))
    (out,) = _run_isolated(tmp_path, so, "linear", [x, w, b], [((m, n), "float32")])
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T + b, rtol=1e-5, atol=1e-5)


def test_softmax_rows(tmp_path):
    m, n = 6, 33

    def build():
        f32 = ir.F32Type.get()

        @func.FuncOp.from_py_func(_t([m, n]), name="softmax")
        def softmax(x):
            full, row = ir.AffineMap.get(2, 0, _d(0, 1)), ir.AffineMap.get(2, 0, _d(0))
            red = ["parallel", "reduction"]
            ninf = arith.constant(f32, float("-inf"))
            mx = _generic([x], linalg.fill(ninf, outs=[tensor.empty([m], f32)]), [full, row], red,
                          lambda a: arith.maximumf(a[0], a[1]))
            e = _generic([x, mx], tensor.empty([m, n], f32), [full, row, full],
                         ["parallel", "parallel"],
                         lambda a: math.exp(arith.subf(a[0], a[1])))
            zero = arith.constant(f32, 0.0)
            s = _generic([e], linalg.fill(zero, outs=[tensor.empty([m], f32)]), [full, row], red,
                         lambda a: arith.addf(a[0], a[1]))
            return _generic([e, s], tensor.empty([m, n], f32), [full, row, full],
                            ["parallel", "parallel"], lambda a: arith.divf(a[0], a[1]))

    so = _compile(build, tmp_path)
    x = (np.random.default_rng(2).standard_normal((m, n)) * 4).astype(np.float32)
    (out,) = _run_isolated(tmp_path, so, "softmax", [x], [((m, n), "float32")])
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_dynamic_rows_scale(tmp_path):
    rows = 9

    def build():
        f32 = ir.F32Type.get()
        dyn = ir.ShapedType.get_dynamic_size()

        @func.FuncOp.from_py_func(_t([dyn, 64]), _t([64]), name="scale")
        def scale(x, g):
            n = tensor.dim(x, arith.constant(ir.IndexType.get(), 0))
            full = ir.AffineMap.get(2, 0, _d(0, 1))
            return _generic([x, g], tensor.EmptyOp([n, 64], f32).result,
                            [full, ir.AffineMap.get(2, 0, _d(1)), full],
                            ["parallel", "parallel"], lambda a: arith.mulf(a[0], a[1]))

    so = _compile(build, tmp_path)
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((rows, 64)).astype(np.float32), rng.standard_normal(64).astype(
        np.float32)
    (out,) = _run_isolated(tmp_path, so, "scale", [x, g], [((rows, 64), "float32")])
    np.testing.assert_allclose(out, x * g, rtol=1e-6)


@pytest.mark.parametrize("dtype,mlir_type", [("int8", "i8"), ("uint8", "i8"), ("int32", "i32"),
                                             ("uint32", "i32"), ("int64", "i64"),
                                             ("float16", "f16"), ("bool", "i8")])
def test_dtypes_and_0d(tmp_path, dtype, mlir_type):
    """Rows reversed, plus x[0, 0] as a 0-d result: byte layout per dtype, rank-0 descriptors."""

    def build():
        el = ir.Type.parse(mlir_type)
        rev = ir.AffineMap.get(2, 0, [ir.AffineExpr.get_constant(3) - ir.AffineDimExpr.get(0),
                                      ir.AffineDimExpr.get(1)])

        @func.FuncOp.from_py_func(_t([4, 3], el), name="rev")
        def rev_fn(x):
            r = _generic([x], tensor.empty([4, 3], el), [rev, ir.AffineMap.get(2, 0, _d(0, 1))],
                         ["parallel", "parallel"], lambda a: a[0])
            c0 = arith.constant(ir.IndexType.get(), 0)
            s = tensor.from_elements(_t([], el), [tensor.extract(x, [c0, c0])])
            return r, s

    so = _compile(build, tmp_path)
    rng = np.random.default_rng(4)
    if dtype == "bool":
        x = rng.integers(0, 2, (4, 3)).astype(bool)
    elif dtype == "float16":
        x = rng.standard_normal((4, 3)).astype(np.float16)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -1000), min(info.max, 1000), (4, 3)).astype(dtype)
    r, s = _run_isolated(tmp_path, so, "rev", [x], [((4, 3), dtype), ((), dtype)])
    np.testing.assert_array_equal(r, x[::-1])
    assert s.shape == () and s == x[0, 0]


@pytest.mark.parametrize("rows,prepacked,threads", [(8, True, 3), (5, False, 1)])
def test_scheduled_packed_matmul(tmp_path, rows, prepacked, threads):
    """Four parallel slices of panels, dynamically scheduled: run by 3 threads (more than the
    compile-time 2, and not a divisor of 4) and by 1 (the serial path)."""
    k, n = 64, 64

    def build():
        dyn = ir.ShapedType.get_dynamic_size() if rows == 5 else rows

        @func.FuncOp.from_py_func(_t([dyn, k]), _t([n // 16, k, 16] if prepacked else [n, k]),
                                  name="linear")
        def linear(x, w):
            bp = w if prepacked else schedules.emit_pack_weight(w)
            return schedules.emit_packed_matmul(x, bp)

    so = _compile(build, tmp_path, schedule=True)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal(
        (n, k)).astype(np.float32)
    w_in = pack_operand(w, "nk16") if prepacked else w
    (out,) = _run_isolated(tmp_path, so, "linear", [x, w_in], [((rows, n), "float32")], threads)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_schedule_vectorizes_and_parallelizes():
    with toolchain.new_context(), ir.Location.unknown():
        module = ir.Module.create()
        with ir.InsertionPoint(module.body):
            @func.FuncOp.from_py_func(_t([8, 64]), _t([4, 64, 16]), name="linear")
            def linear(x, w):
                return schedules.emit_packed_matmul(x, w)
        schedules.apply_matmul_schedule(module)
        text = toolchain.stage_text(module, "bufferized")
        llvm_ir = toolchain.stage_text(module, "llvmir")
    assert "scf.forall" in text and "vector.fma" in text
    assert "__kmpc_fork_call" in llvm_ir and "__kmpc_dispatch_next_8u" in llvm_ir


def test_bad_inputs_rejected(tmp_path):
    from graphir.runtime.cpu import CpuLibrary

    with pytest.raises(ValueError, match="unknown stage"):
        with toolchain.new_context(), ir.Location.unknown():
            toolchain.stage_text(ir.Module.create(), "ptx")
    with pytest.raises(ValueError, match="no such file"):
        CpuLibrary(tmp_path / "missing.so")


def test_parallel_runtime_is_built_in_the_compile_cache(tmp_path, monkeypatch):
    # $GRAPHIR_CACHE_DIR moves everything graphir writes between runs, the CPU parallel
    # runtime's object and library included: nothing lands under $HOME.
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(cache))
    for kind in ("o", "so"):
        path = toolchain._runtime_artifact(kind)
        assert path.parent == cache / "cpu_rt" and path.stat().st_size > 0
    assert not any(home.iterdir())


_IDLE_RUNNER = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from graphir.runtime.cpu import CpuLibrary
fn = CpuLibrary(sys.argv[2]).function("linear", 2, 1)
x, w = np.ones((8, 64), np.float32), np.ones((4, 64, 16), np.float32)
out = np.zeros((8, 64), np.float32)
time.sleep(0.3)   # numpy's own BLAS threads spin for a while after its import
for _ in range(2):
    fn([x, w], [out])
assert (out == 64).all()
t0 = time.process_time()
time.sleep(0.3)
print("IDLE_CPU_MS", (time.process_time() - t0) * 1e3)
"""


@pytest.mark.parametrize("spin_us,busy", [(1000, False), (150000, True)])
def test_idle_workers_spin_only_as_long_as_asked(tmp_path, spin_us, busy):
    # After a parallel region the pool's workers spin GRAPHIR_SPIN_US (default 200 us) for the
    # next one, then sleep: a process that runs torch or numpy next gets its cores back. The
    # CPU time the idle process burns in 0.3 s shows which.
    def build():
        @func.FuncOp.from_py_func(_t([8, 64]), _t([4, 64, 16]), name="linear")
        def linear(x, w):
            return schedules.emit_packed_matmul(x, w)

    so = _compile(build, tmp_path, schedule=True)
    env = dict(os.environ, GRAPHIR_NUM_THREADS="2", GRAPHIR_SPIN_US=str(spin_us))
    res = subprocess.run([sys.executable, "-c", _IDLE_RUNNER, str(ROOT), str(so)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    idle_ms = float(res.stdout.split("IDLE_CPU_MS")[1])
    assert (idle_ms > 30) if busy else (idle_ms < 15), idle_ms
