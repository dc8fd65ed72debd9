"""The CPU kernels' thread pool reads GRAPHIR_NUM_THREADS and GRAPHIR_SPIN_US with C's atoi,
where a typo silently meant every CPU (or no spin): loading a CPU artifact now names the
variable and what it takes."""
import numpy as np
import pytest

from graphir import DType, Graph, TensorType, ops

pytest.importorskip("mlir.ir")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from graphir.lowering.driver import compile_graph

    with Graph("g", input_types=[TensorType(DType.float32, [8])]) as g:
        g.output(ops.exp(g.inputs[0]))
    out = tmp_path_factory.mktemp("pool") / "m.gart"
    compile_graph(g, "cpu", out=out, use_cache=False)
    return out


@pytest.mark.parametrize("name,value", [("GRAPHIR_NUM_THREADS", "two"),
                                        ("GRAPHIR_NUM_THREADS", "0"),
                                        ("GRAPHIR_NUM_THREADS", "4x"),
                                        ("GRAPHIR_SPIN_US", "-5"),
                                        ("GRAPHIR_SPIN_US", "1e3")])
def test_a_bad_pool_variable_is_refused_by_name(artifact, monkeypatch, name, value):
    from graphir.runtime.session import InferenceSession

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r}: expected a whole number"):
        InferenceSession().load(artifact)


@pytest.mark.parametrize("name,value", [("GRAPHIR_NUM_THREADS", "2"),
                                        ("GRAPHIR_NUM_THREADS", ""),
                                        ("GRAPHIR_SPIN_US", "0")])
def test_good_pool_variables_load(artifact, monkeypatch, name, value):
    from graphir.runtime.session import InferenceSession

    monkeypatch.setenv(name, value)
    x = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    np.testing.assert_allclose(InferenceSession().load(artifact).execute(x)[0], np.exp(x),
                               rtol=1e-6)
