"""Run a graph on a backend: the interpreter, or compiled for the CPU through a session.

Tests parameterised with `backend` run the same checks on every backend; compiled results are
compared against the interpreter by the tests themselves.
"""
from __future__ import annotations

import numpy as np
import pytest

from graphir.runtime.interpreter import run

BACKENDS = ["interp", "cpu"]


def execute(backend: str, graph, *inputs, weights=None) -> list[np.ndarray]:
    if backend == "interp":
        return run(graph, *inputs, weights=weights)
    if backend == "cpu":
        pytest.importorskip("mlir.ir")
        from graphir.runtime.session import InferenceSession

        model = InferenceSession().load(graph, weights=weights or {})
        return model.execute(*inputs)
    raise ValueError(f"unknown backend {backend!r}")


def assert_matches_interpreter(graph, *inputs, weights=None, rtol=1e-5, atol=1e-5):
    """Compile for the CPU and compare every output (and buffer) with the interpreter."""
    import copy

    ref_inputs = [copy.deepcopy(a) for a in inputs]
    want = run(graph, *ref_inputs, weights=weights)
    got = execute("cpu", graph, *inputs, weights=weights)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"output {i}")
    for i, (a, r) in enumerate(zip(inputs, ref_inputs)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(r, np.float64), rtol=rtol,
                                   atol=atol, err_msg=f"buffer/input {i} after the call")
    return got


def cpu_runs(target: str) -> bool:
    """Whether this host runs code built for `target` (the runtime's own check: the ISA's
    flags, and for amx Linux's grant of the tile state)."""
    from graphir.lowering.mlir_cpu.cpu_target import check_host

    try:
        check_host(target)
    except ValueError:
        return False
    return True
