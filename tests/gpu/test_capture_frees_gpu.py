"""graphir memory collected while torch captures a CUDA graph (torch.cuda.graph, as
torch.compile's reduce-overhead does, in CUDA's default global mode) does not break torch's
capture: the finalizers free with their thread's capture mode relaxed (driver.release). Before,
the cuMemFree made the capture fail (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED /
..._INVALIDATED) in torch's hands. In the capturing thread (the garbage collector runs there at
any allocation) and in another thread."""

import gc
import threading

import pytest

from tests.gpu.requires import skip_unless_gpu

pytestmark = pytest.mark.gpu
skip_unless_gpu()

torch = pytest.importorskip("torch")

from graphir.runtime.cuda import DeviceBuffer  # noqa: E402
from graphir.runtime.cuda.memory import pinned_empty  # noqa: E402


def _garbage():
    """graphir device and pinned memory that only the cyclic collector frees."""
    cycle = [DeviceBuffer.empty(1 << 20, "uint8"), pinned_empty(4096, "uint8")]
    cycle.append(cycle)


def _captured(free):
    """A torch graph y = 2 x + 1 captured while `free()` runs in the middle; replayed on fresh
    data and checked."""
    x = torch.randn(1 << 16, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x * 2.0
        free()
        y = y + 1.0
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, x * 2.0 + 1.0)


def test_collected_in_the_capturing_thread():
    # Made before the capture (an allocation inside it would break it by itself) and kept
    # from the collector until the middle of it.
    gc.disable()
    try:
        _garbage()

        def free():
            assert gc.collect() > 0

        _captured(free)
    finally:
        gc.enable()


def test_freed_by_another_thread_meanwhile():
    bufs = [DeviceBuffer.empty(1 << 20, "uint8") for _ in range(4)]

    def free():
        t = threading.Thread(target=bufs.clear)
        t.start()
        t.join()

    _captured(free)
    assert not bufs
