"""The CPU kernels' vector exp (lowerings/attention.vexp), compiled for 8 lanes (AVX2 targets:
the integer 2^n route) and 16 lanes (AVX-512: vscalefps), against numpy's float64 exp over
the whole float32 range, including the special values softmax relies on."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

from graphir.lowering.mlir_cpu.cpu_target import CpuTarget  # noqa: E402
from graphir.lowering.mlir_cpu.lowerings.attention import Text, vexp  # noqa: E402

from ...backends.harness import cpu_runs  # noqa: E402


def _compiled_exp(lanes: int, target: str, tmp_path):
    """exp(in) -> out over a 1-D memref whose length is a multiple of `lanes`."""
    from mlir import ir

    from graphir.lowering.mlir_cpu import toolchain
    from graphir.runtime.cpu import CpuLibrary

    t = Text()
    v = f"vector<{lanes}xf32>"
    x = t(f"vector.load %in[%i] : memref<?xf32>, {v}")
    t.stmt(f"vector.store {vexp(t, x, lanes)}, %out[%i] : memref<?xf32>, {v}")
    body = "\n".join(t.prologue() + t.lines)
    text = f"""func.func @vexp(%in: memref<?xf32>, %out: memref<?xf32>) attributes {{llvm.emit_c_interface}} {{
  %c0 = arith.constant 0 : index
  %n = memref.dim %in, %c0 : memref<?xf32>
  %step = arith.constant {lanes} : index
  scf.for %i = %c0 to %n step %step {{
{body}
  }}
  return
}}"""
    so = tmp_path / f"vexp{lanes}.so"
    with toolchain.new_context(), ir.Location.unknown():
        toolchain.compile_to_shared_object(ir.Module.parse(text), so,
                                           target=CpuTarget.parse(target))
    return CpuLibrary(so).function("vexp", 1, 1)


@pytest.mark.parametrize("lanes,target", [(8, "x86-64:avx2"), (16, "x86-64:avx512")])
def test_vexp_matches_exp(lanes, target, tmp_path):
    if not cpu_runs(f"cpu:{target}"):
        pytest.skip(f"this CPU cannot run {target}")
    fn = _compiled_exp(lanes, target, tmp_path)
    rng = np.random.default_rng(lanes)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 88.3, 88.5, 100.0, -87.0, -88.3, -90.0,
               -103.0, -110.0, 1e-30, -1e-30]
    x = np.concatenate([np.linspace(-120, 100, 40_003), rng.standard_normal(4000) * 30,
                        special]).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal((-x.size) % lanes).astype(np.float32)])
    out = np.full_like(x, 7.0)
    fn([x], [out])
    want = np.exp(x.astype(np.float64))
    normal = (x > -87.3) & (x < 88.37)          # results in float32's normal range
    rel = np.abs(out[normal] - want[normal]) / want[normal]
    assert rel.max() < 2e-7                     # ~1.4 ulp: Cephes' polynomial
    assert np.isnan(out[np.isnan(x)]).all()     # a NaN score stays NaN through softmax
    assert (out[x == -np.inf] == 0).all() and (out[x <= -110] == 0).all()
    assert (out[x == 0] == 1).all()
    big = out[x >= 88.38]                       # clamped to e^88.376, finite, not inf
    assert np.isfinite(big).all() and (big > 2.4e38).all()
    low = (x <= -87.3) & (x > -110)             # float32's subnormal range
    assert (out[low] >= 0).all() and (out[low] <= want[low] * (1 + 2e-7) + 2.0 ** -149).all()
    if lanes == 16:   # vscalefps keeps subnormals: off by the polynomial's error + half a step
        assert (np.abs(out[low] - want[low]) <= 2e-7 * want[low] + 2.0 ** -149).all()
    else:             # the integer route flushes below e^-87.3 (2^-126) to zero
        assert (out[x < -88.4] == 0).all()
