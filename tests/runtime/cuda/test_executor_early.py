"""A kernel that reads before its PDL wait (the one-row qkv GEMV, matmul_skinny's LATE_WAIT) is
launched early only where nothing ahead of it writes what it reads: inside a captured graph,
with x a device tensor (copied in or bound before the graph starts) and the weights loaded. A
numpy x arrives through the upload at the graph's head, so there it launches the ordinary way,
as it does in an eager run. On the real CudaDevice over the fake libcuda
(graphir.tools.host_profile), with the 8B-shaped bf16 layer, whose qkv projection at one row is
such a GEMV; the PTX side is tests/lowering/triton_gpu/test_pdl.py."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from graphir.examples.llama_attention import build  # noqa: E402
from graphir.tools.host_profile import FakeDriver, cuda_like, load_layer, step_args  # noqa: E402


@pytest.fixture(scope="module")
def graph():
    return build()


@pytest.fixture
def fake():
    with FakeDriver() as f, cuda_like():
        yield f


def record_launches(ex):
    """[(kernel name, PDL launch?, capturing?)] of every launch from now on."""
    from graphir.runtime.cuda import driver

    dev, log = ex.dev, []
    names = {k.function.handle: k.name for k in dev.kernels.values()}
    funcs = driver._funcs
    plain, ex_ = funcs["cuLaunchKernel"], funcs["cuLaunchKernelEx"]

    def logged_plain(handle, *a):
        log.append((names.get(handle), False, dev._capturing))
        return plain(handle, *a)

    def logged_ex(config, handle, *a):
        log.append((names.get(handle), True, dev._capturing))
        return ex_(config, handle, *a)
    funcs["cuLaunchKernel"], funcs["cuLaunchKernelEx"] = logged_plain, logged_ex
    return log


def late_ops(ex):
    """The launches each built plan lets start early, by kernel name."""
    return [{ex.dev.kernels[op[2]].name for op in cp.ops if op[0] == "launch" and op[5]}
            for cp in ex._plans.values()]


def test_the_qkv_gemv_starts_early_in_graphs_of_a_device_x(fake, graph):
    ex = load_layer(graph)
    log = record_launches(ex)
    args = list(step_args(1, 100, 1))
    for i in range(5):  # eager, capture + replay, then hits (graphs led by the upload)
        args[3] = args[3] + (i > 0)
        ex.execute(*args)
    assert late_ops(ex) == [{"matmul_bf16_gemv2x256_w2_s1_late"}]
    late = [(pdl, cap) for name, pdl, cap in log if name.endswith("_late")]
    assert (False, False) in late  # the eager first call: nothing vouches ahead of a copy
    assert (True, True) in late    # captured: early
    assert all(pdl == cap for pdl, cap in late), late
    # every other kernel of the fakes launches the ordinary way
    assert all(not pdl for name, pdl, _ in log if not name.endswith("_late"))


def test_a_numpy_x_keeps_the_gemv_in_order(fake, graph):
    """x staged with the metadata is written by the upload kernel the graph starts with."""
    ex = load_layer(graph)
    log = record_launches(ex)
    args = list(step_args(1, 100, 1))
    args[0] = np.zeros((1, 4096), np.float32)
    for i in range(5):
        args[3] = args[3] + (i > 0)
        ex.execute(*args)
    assert ex.stats["captures"] == 1 and ex.stats["fast_hits"] >= 1
    assert late_ops(ex) == [set()]
    assert any(name.endswith("_late") and cap for name, _, cap in log)
    assert not any(pdl for _, pdl, _ in log)


def test_only_weights_and_device_inputs_vouch(fake, graph):
    """_early_ok itself: an intermediate, a buffer input or a host input read early refuses."""
    ex = load_layer(graph)
    args = list(step_args(1, 100, 1))
    ex.execute(*args)
    (cp,) = ex._plans.values()
    (lid, op) = next((s_lid, o) for s_lid, o in _late_launches(ex))
    x, w = op["args"][0], op["args"][1]
    assert ex._early_ok(lid, op, frozenset({0})) is True
    assert ex._early_ok(lid, op, frozenset()) is False      # x came from the host
    inputs = ex.plan["inputs"]
    for vid in (inputs[2],                                  # the kv blocks (a buffer)
                next(v["id"] for v in ex.values if v["kind"] == "intermediate")):
        bad = dict(op, args=[["v", vid, x[2]]] + op["args"][1:])
        assert ex._early_ok(lid, bad, frozenset({0, 2})) is False
    assert ex._early_ok(lid, dict(op, args=[x, ["i", 0]] + op["args"][2:]),
                        frozenset({0})) is False
    assert w[0] == "v" and w[1] in ex._const_dev


def _late_launches(ex):
    for i, s in enumerate(ex.steps):
        for var in s["attrs"].get("variants", []):
            for op in var["ops"]:
                if "launch" in op and ex.dev.kernels[op["launch"]].spec.early_reads:
                    yield ex._sdev[i], op


def test_a_library_call_keeps_its_one_argument_launch(fake):
    """A prepared launch that takes only the stream (a cuBLASLt matmul) is called that way."""
    from graphir.runtime.cuda.device_model import CudaDevice

    calls = []

    class Lib:
        def prepare(self, grid, vals):
            return lambda stream=None: calls.append((grid, vals, stream))
    dev = CudaDevice({"lt": Lib()}, 0, 0x5EED)
    dev.prepare("lt", (2, 1, 1), [7])()
    assert calls == [((2, 1, 1), [7], dev._cur)]
