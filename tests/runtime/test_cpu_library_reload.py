"""An artifact recompiled in place and loaded again in the same process runs its own kernels.

The dynamic loader answers a library name it has loaded with the library in memory, so before
runtime/cpu.py `_dlopen` a second graph compiled to the same `out` path ran the first one's
kernels against its own manifest: the wrong function, or one compiled for other shapes."""
import numpy as np
import pytest

from graphir import DType, Graph, TensorType, ops

pytest.importorskip("mlir.ir")


def _exp(n: int) -> Graph:
    with Graph("g", input_types=[TensorType(DType.float32, [n])]) as g:
        g.output(ops.exp(g.inputs[0]))
    return g


def test_a_graph_recompiled_to_the_same_path_runs_its_own_kernels(tmp_path):
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession

    out, rng = tmp_path / "m.gart", np.random.default_rng(0)
    compile_graph(_exp(4), "cpu", out=out, use_cache=False)
    first = InferenceSession().load(out)
    x4 = rng.standard_normal(4).astype(np.float32)
    np.testing.assert_allclose(first.execute(x4)[0], np.exp(x4), rtol=1e-6)
    # the same kernel name, compiled for 64 values: the old one would fill the first 4
    compile_graph(_exp(64), "cpu", out=out, use_cache=False)
    for _ in range(2):      # and a third load of the new file shares the second's copy
        x = rng.standard_normal(64).astype(np.float32)
        np.testing.assert_allclose(InferenceSession().load(out).execute(x)[0], np.exp(x),
                                   rtol=1e-6)
    np.testing.assert_allclose(first.execute(x4)[0], np.exp(x4), rtol=1e-6)
