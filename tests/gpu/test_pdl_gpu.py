"""Programmatic dependent launch on the GPU: kernels launched with programmatic stream
serialization (runtime.cuda, cubins marked launch_pdl) still see every write of the kernel
before them. Each launch adds 1 to its input into the other buffer; 400 launches over 32 MB,
eagerly and inside a captured graph, must end at x + 400 exactly (a launch that read its
input before its predecessor finished writing it would lose counts). Grids of one program per
SM at most launch early; larger ones take the ordinary launch (runtime.cuda.kernel), and both
must count right."""

import numpy as np
import pytest

from tests.gpu.requires import skip_unless_gpu

pytestmark = pytest.mark.gpu
skip_unless_gpu()

torch = pytest.importorskip("torch")

from graphir.lowering.triton_gpu import aot  # noqa: E402
from graphir.runtime.cuda.kernel import Kernel  # noqa: E402
from tests.lowering.triton_gpu.pdl_kernels import strided_with_prelude  # noqa: E402

N, CALLS, B = 1 << 23, 400, 1024


@pytest.fixture(scope="module")
def kernel():
    c = aot.compile_kernel(strided_with_prelude, {"x": "*fp32", "y": "*fp32", "n": "i32",
                                                  "B": "constexpr"}, {"B": B}, num_warps=4)
    assert c.launch_pdl
    k = Kernel.from_cubin(c.cubin, c.launch_metadata())
    assert k.spec.pdl
    return k


def _chain(kernel, a, b, stream, grid):
    launches = [kernel.prepare(grid, [a.data_ptr(), b.data_ptr(), N]),
                kernel.prepare(grid, [b.data_ptr(), a.data_ptr(), N])]
    for i in range(CALLS):
        launches[i % 2](stream)


@pytest.mark.parametrize("programs", ["sms", "blocks"])
def test_pdl_chain_keeps_order_eager_and_in_a_graph(kernel, programs):
    grid = (kernel.pdl_max_programs if programs == "sms" else (N + B - 1) // B,)
    assert (grid[0] <= kernel.pdl_max_programs) == (programs == "sms")
    x = torch.randint(-1000, 1000, (N,), device="cuda").float()  # sums stay exact
    a, b = x.clone(), torch.empty_like(x)
    s = torch.cuda.Stream()
    # x and a are written on the current stream: the chain's stream waits for them (without
    # this, under load, it read a's memory before the clone and counted from stale values).
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _chain(kernel, a, b, s.cuda_stream, grid)
    s.synchronize()
    want = (x + CALLS).cpu().numpy()
    np.testing.assert_array_equal(a.cpu().numpy(), want)

    a.copy_(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _chain(kernel, a, b, torch.cuda.current_stream().cuda_stream, grid)
    a.copy_(x)
    g.replay()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(a.cpu().numpy(), want)
