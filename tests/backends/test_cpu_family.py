"""Every AttentionWithRope-family configuration compiled for the CPU runs a ragged prefill,
decode steps and a chunked prefill through the paged cache exactly as the interpreter does."""
import numpy as np
import pytest

from graphir import DType
from graphir.lowering import compile_graph
from graphir.passes import default_pipeline
from graphir.runtime.interpreter import run
from tests.gpu import family

pytest.importorskip("mlir.ir")


UNFUSED = [p for p in default_pipeline() if p != "fuse-rope-split-store"]


@pytest.mark.parametrize("case", sorted(family.CASES))
@pytest.mark.parametrize("dtype", [DType.float32, DType.bfloat16])
@pytest.mark.parametrize("fusion", ["fused", "unfused"])
def test_family_layer_compiled_for_cpu(case, dtype, fusion):
    # Unfused: the layer built without _fuse_rope_and_store and compiled with the fusion pass
    # off, so the separate rope / kv_cache_store kernels are what runs (the default pipeline
    # would fuse them and a bug in them would hide).
    from graphir.runtime.session import InferenceSession

    if case == "float8_dynamic" and dtype is DType.float32:
        pytest.skip("float8 layers are built in bf16")
    if fusion == "unfused" and dtype is DType.bfloat16 and case != "default":
        pytest.skip("the unfused kernels are dtype-generic; f32 covers every case")
    graph, weights = family.build(case, dtype, fuse=fusion == "fused")
    art = compile_graph(graph, "cpu", passes=None if fusion == "fused" else UNFUSED)
    if fusion == "unfused":
        steps = {s["op"] for s in art.manifest["plan"]["steps"]}
        assert "rope_split_store" not in steps and "kv_cache_store" in steps, steps
    model = InferenceSession().load(art, weights=weights)
    got, got_blocks = family.run_schedule(lambda *a: model.execute(*a)[0], dtype)
    want, want_blocks = family.run_schedule(lambda *a: run(graph, *a, weights=weights)[0], dtype)
    tol = 1e-5 if dtype is DType.float32 else 2e-2
    for step, (g, w) in enumerate(zip(got, want)):
        assert family.rel_err(g, w) <= tol, (case, step, family.rel_err(g, w))
    assert family.rel_err(got_blocks, want_blocks) <= tol
    if dtype is DType.float32:
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
