"""Frees made by finalizers while a CUDA graph is captured wait for the capture's end: the
garbage collector runs them anywhere, and a cuMemFree inside a capture breaks it (the next
launch fails with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED; seen on an H100 when an earlier model's
buffers were collected during a later model's capture). On the fake libcuda."""
import gc

import pytest

from graphir.runtime.cuda import driver
from graphir.tools.host_profile import FakeDriver


@pytest.fixture
def fake():
    with FakeDriver() as f:
        yield f


def test_a_buffer_dropped_mid_capture_is_freed_after_it(fake):
    from graphir.runtime.cuda import CudaGraph, DeviceBuffer, Stream

    s = Stream()
    keep = DeviceBuffer.empty(1024, "uint8")
    cycle = [DeviceBuffer.empty(64, "uint8")]
    cycle.append(cycle)  # only the cyclic collector frees it
    del cycle
    g = CudaGraph()
    frees = fake.calls["cuMemFree_v2"]
    with g.capture(s):
        del keep                 # by reference count
        gc.collect()             # by the cyclic collector, as at any allocation
        with driver.capturing():  # nested scopes defer to the outermost
            driver.release("cuEventDestroy_v2", 7)
        assert fake.calls["cuMemFree_v2"] == frees
        assert fake.calls["cuEventDestroy_v2"] == 0
    assert fake.calls["cuMemFree_v2"] == frees + 2
    assert fake.calls["cuEventDestroy_v2"] == 1


def test_a_failed_capture_still_frees(fake):
    from graphir.runtime.cuda import CudaGraph, DeviceBuffer, Stream

    s = Stream()
    buf = DeviceBuffer.empty(1024, "uint8")
    frees = fake.calls["cuMemFree_v2"]
    with pytest.raises(RuntimeError, match="inside"):
        with CudaGraph().capture(s):
            del buf
            raise RuntimeError("inside")
    assert fake.calls["cuMemFree_v2"] == frees + 1
    driver.release("cuMemFree_v2", 5)  # outside a capture: at once
    assert fake.calls["cuMemFree_v2"] == frees + 2


def test_a_free_does_not_break_a_capture_graphir_does_not_know_of(fake):
    """torch.cuda.graph (torch.compile's reduce-overhead) captures in CUDA's global mode, which
    forbids frees in every thread whose mode is not relaxed; a graphir buffer collected
    meanwhile is freed with this thread's mode relaxed, and the mode put back after."""
    from graphir.runtime.cuda import DeviceBuffer
    from graphir.runtime.cuda.memory import pinned_empty

    buf = DeviceBuffer.empty(1024, "uint8")
    host = pinned_empty(64, "uint8")
    frees, host_frees = fake.calls["cuMemFree_v2"], fake.calls["cuMemFreeHost"]
    fake.foreign_capture = True
    del buf, host
    gc.collect()
    assert fake.calls["cuMemFree_v2"] == frees + 1
    assert fake.calls["cuMemFreeHost"] == host_frees + 1
    assert fake.broken_captures == 0
    assert fake.capture_mode == 0           # the thread's own mode again
    fake.capture_mode = 1                   # whatever it was
    driver.release("cuModuleUnload", 9)
    assert fake.broken_captures == 0 and fake.capture_mode == 1


def test_the_fake_breaks_a_foreign_capture_on_an_unrelaxed_free(fake):
    # The check above can fail: a plain driver call is refused as the real driver refuses it.
    fake.foreign_capture = True
    with pytest.raises(driver.CudaError, match="cuMemFree_v2"):
        driver.call("cuMemFree_v2", 5)
    assert fake.broken_captures == 1
