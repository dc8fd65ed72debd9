"""Every AttentionWithRope-family configuration compiled for the CPU runs a ragged prefill,
decode steps and a chunked prefill through the paged cache exactly as the interpreter does."""
import numpy as np
import pytest

from graphir import DType
from graphir.runtime.interpreter import run
from tests.gpu import family

pytest.importorskip("mlir.ir")


@pytest.mark.parametrize("case", sorted(family.CASES))
@pytest.mark.parametrize("dtype", [DType.float32, DType.bfloat16])
def test_family_layer_compiled_for_cpu(case, dtype):
    from graphir.runtime.session import InferenceSession

    if case == "float8_dynamic" and dtype is DType.float32:
        pytest.skip("float8 layers are built in bf16")
    graph, weights = family.build(case, dtype, fuse=True)
    model = InferenceSession().load(graph, weights=weights)
    got, got_blocks = family.run_schedule(lambda *a: model.execute(*a)[0], dtype)
    want, want_blocks = family.run_schedule(lambda *a: run(graph, *a, weights=weights)[0], dtype)
    tol = 1e-5 if dtype is DType.float32 else 2e-2
    for step, (g, w) in enumerate(zip(got, want)):
        assert family.rel_err(g, w) <= tol, (case, step, family.rel_err(g, w))
    assert family.rel_err(got_blocks, want_blocks) <= tol
    if dtype is DType.float32:
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
