"""InferenceSession on the CPU: what it loads, how it binds weights, how it refuses bad calls."""
import os

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

from graphir import ops  # noqa: E402
from graphir import DeviceRef, DType, Graph, TensorType, Weight  # noqa: E402
from graphir.dtype import round_to  # noqa: E402
from graphir.types import BufferType  # noqa: E402
from graphir.lowering.artifact import load_artifact  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.runtime.interpreter import run  # noqa: E402
from graphir.runtime.session import InferenceSession  # noqa: E402

CPU = DeviceRef.CPU()


def _graph() -> Graph:
    """y = exp(x) * w + b, plus a bf16 buffer the graph reads (a stand-in KV cache)."""
    w = Weight("w", DType.float32, [4], CPU)
    b = Weight("b", DType.float32, [4], CPU)
    with Graph("sess", input_types=[TensorType(DType.float32, ["n", 4], CPU),
                                    BufferType(DType.bfloat16, [3, 4], CPU)]) as g:
        x = g.inputs[0]
        g.output(ops.exp(x) * w + b)
    return g


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """One private compile cache for the module: the graph compiles once, later loads hit it."""
    old = os.environ.get("GRAPHIR_CACHE_DIR")
    os.environ["GRAPHIR_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["GRAPHIR_CACHE_DIR"]
    else:
        os.environ["GRAPHIR_CACHE_DIR"] = old


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((5, 4)).astype(np.float32),
            "w": rng.standard_normal(4).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
            "cache": round_to(rng.standard_normal((3, 4)), DType.bfloat16).astype(np.float32)}


def _want(d):
    return np.exp(d["x"].astype(np.float64)) * d["w"] + d["b"]


def _weights(d):
    return {"w": d["w"], "b": d["b"]}


def test_load_graph_artifact_path_and_artifact(data, tmp_path):
    g = _graph()
    session = InferenceSession(devices=[CPU])
    out = tmp_path / "sess.gart"
    art = compile_graph(g, "cpu", out=out)
    models = [session.load(g, weights=_weights(data)),          # compiles (through the cache)
              session.load(str(out), weights=_weights(data)),   # a path, verified on load
              session.load(out, weights=_weights(data)),
              session.load(art, weights=_weights(data)),        # an Artifact
              session.load(load_artifact(out), weights=_weights(data))]
    ref = run(g, data["x"], data["cache"].copy(), weights=_weights(data))[0]
    for m in models:
        (y,) = m.execute(data["x"], data["cache"].copy())
        assert y.shape == (5, 4) and y.dtype == np.float32
        np.testing.assert_allclose(y, _want(data), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_copy_outputs_reaches_the_cuda_runtime_and_cpu_outputs_are_owned(data, monkeypatch,
                                                                          tmp_path):
    import graphir.runtime.cuda.executor as cuda_executor

    got = {}
    monkeypatch.setattr(cuda_executor, "load",
                        lambda art, weights, devices, **kw: got.setdefault("kw", kw))
    art = compile_graph(_graph(), "cuda:sm_90", out=tmp_path / "sess_cuda.gart")
    gpu = InferenceSession(devices=[DeviceRef.GPU()])
    assert gpu.load(art, weights=_weights(data), copy_outputs=True) == {"copy_outputs": True}
    got.clear()
    assert gpu.load(art, weights=_weights(data)) == {"copy_outputs": False}
    # The CPU's outputs are new arrays each call either way.
    m = InferenceSession(devices=[CPU]).load(_graph(), weights=_weights(data), copy_outputs=True)
    (a,) = m.execute(data["x"], data["cache"].copy())
    (b,) = m.execute(data["x"] * 2, data["cache"].copy())
    assert not np.shares_memory(a, b)
    np.testing.assert_allclose(a, _want(data), rtol=1e-5, atol=1e-5)
    # A distributed session's ranks have no such option: said before anything loads.
    dist = InferenceSession(devices=[CPU])
    dist.distributed = object()  # what init() returns, never reached here
    with pytest.raises(ValueError, match="copy_outputs is not supported by a distributed"):
        dist.load(art, weights=_weights(data), copy_outputs=True)


def test_weights_from_a_safetensors_file(data, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file(_weights(data), str(path))
    for weights in (path, str(path)):
        (y,) = InferenceSession().load(_graph(), weights=weights).execute(data["x"], data["cache"])
        np.testing.assert_allclose(y, _want(data), rtol=1e-5, atol=1e-5)


def test_weights_are_copied_at_load(data):
    want = _want(data)
    w = {k: v.copy() for k, v in _weights(data).items()}
    model = InferenceSession().load(_graph(), weights=w)
    w["w"][:] = 1000.0  # changing the caller's array afterwards does not change the model
    (y,) = model.execute(data["x"], data["cache"])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights, exc, msg", [
    ({"w": None}, ValueError, "weight 'b' (tensor<[4], f32, cpu:0>) was not given"),
    ({"w": np.ones(5, np.float32), "b": np.ones(4, np.float32)}, ValueError,
     "weight 'w': expected shape [4], got [5]"),
    ({"w": np.ones(4, np.int32), "b": np.ones(4, np.float32)}, TypeError,
     "weight 'w': expected float data for f32, got int32"),
    ("weights.bin", ValueError, "cannot read weights from 'weights.bin'"),
])
def test_weight_errors(data, weights, exc, msg):
    if isinstance(weights, dict) and weights.get("w") is None:
        weights = {"w": data["w"]}
    with pytest.raises(exc) as e:
        InferenceSession().load(_graph(), weights=weights)
    assert msg in str(e.value)


def test_input_errors(data):
    model = InferenceSession().load(_graph(), weights=_weights(data))
    with pytest.raises(ValueError, match=r"graph 'sess' takes 2 inputs, got 1"):
        model.execute(data["x"])
    with pytest.raises(ValueError, match=r"graph 'sess' takes 2 inputs, got 3"):
        model.execute(data["x"], data["cache"], data["x"])
    with pytest.raises(TypeError, match=r"input 0: expected dtype float32 .* got float64"):
        model.execute(data["x"].astype(np.float64), data["cache"])
    with pytest.raises(TypeError, match=r"input 0 must be a numpy array, got list"):
        model.execute(data["x"].tolist(), data["cache"])
    with pytest.raises(ValueError, match=r"input 0: expected rank 2"):
        model.execute(data["x"][0], data["cache"])
    with pytest.raises(ValueError, match=r"input 1: dim 0 is 2 but the type says 3"):
        model.execute(data["x"], data["cache"][:2])
    with pytest.raises(TypeError, match=r"input 1: expected bf16 data as floats, got int32"):
        model.execute(data["x"], data["cache"].astype(np.int32))


def test_session_device_errors():
    with pytest.raises(ValueError, match="a session runs on one kind of device"):
        InferenceSession(devices=[DeviceRef.CPU(), DeviceRef.GPU()])


def test_failed_call_leaves_the_buffer_unchanged(data):
    model = InferenceSession().load(_graph(), weights=_weights(data))
    cache = data["cache"].copy()
    before = cache.copy()
    for bad_x in (data["x"].astype(np.float64), data["x"][:, :3], np.zeros((2, 2, 4), np.float32)):
        with pytest.raises((TypeError, ValueError)):
            model.execute(bad_x, cache)
        assert np.array_equal(cache, before) and cache.dtype == np.float32
    model.execute(data["x"], cache)  # and a good call still works afterwards
    assert np.array_equal(cache, before)  # this graph only reads its buffer


def _llama_missing_ops():
    import graphir.lowering.mlir_cpu.backend  # noqa: F401  (registers the lowerings)
    from graphir.tools.demo import cpu_gaps, _example

    return cpu_gaps(_example("llama_attention").build_tiny())


def test_failed_call_leaves_the_kv_cache_unchanged():
    """The attention layer writes the paged cache; a call refused on bad input must not."""
    missing = _llama_missing_ops()
    if missing:
        pytest.skip(f"the attention layer does not compile for the CPU yet (missing {missing})")
    from graphir.runtime.kv_cache import PagedKVCacheManager
    from graphir.tools.demo import _example

    llama = _example("llama_attention")
    g = llama.build_tiny()
    model = InferenceSession().load(g, weights=llama.random_weights(g))
    rng = np.random.default_rng(3)
    mgr = PagedKVCacheManager(num_layers=2, n_kv_heads=2, head_dim=16, page_size=4, total_num_pages=6)
    mgr.blocks = rng.standard_normal(mgr.blocks_shape).astype(np.float32)
    s = mgr.claim()
    step = mgr.prepare_step([s], [6])
    x = rng.standard_normal((6, 64)).astype(np.float32)
    args = [step.input_row_offsets, mgr.blocks, step.cache_lengths, step.lookup_table, step.max_lengths]
    before = mgr.blocks.copy()
    with pytest.raises(TypeError, match="input 1: expected dtype uint32"):
        model.execute(x, step.input_row_offsets.astype(np.int64), *args[1:])
    with pytest.raises(TypeError, match="input 0: expected dtype float32"):
        model.execute(x.astype(np.float64), *args)
    assert np.array_equal(mgr.blocks, before)
    model.execute(x, *args)  # the same call with good inputs writes the cache
    assert not np.array_equal(mgr.blocks, before)
