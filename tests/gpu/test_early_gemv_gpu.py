"""The one-row GEMV that reads x and its weight before its PDL wait (matmul_skinny's LATE_WAIT)
launched early on a real GPU: a step `(x @ W^T) * s`, x a graph input, s a host input that the
upload kernel at the graph's head writes. Each step's x is made by a slow torch kernel queued
just before the call (so a GEMV that started before the graph's predecessors ended would read
the last step's x), at one reused address (the graph reading it in place), from rotating
tensors (copied in) and as numpy with s on the device (x staged, written by the upload: the
GEMV must then wait); every step equal
bit for bit to the eager executor, which launches everything in order. With the upload as a
copy node too."""

import numpy as np
import pytest

from graphir.runtime.cuda import driver
from tests.gpu.requires import skip_unless_gpu

pytestmark = pytest.mark.gpu
skip_unless_gpu()

torch = pytest.importorskip("torch")

from graphir import DType, Graph, TensorType, ops  # noqa: E402
from graphir.weight import Weight  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.runtime.cuda import executor  # noqa: E402

N, K, STEPS = 3072, 4096, 12


def build():
    types = [TensorType(DType.bfloat16, ["rows", K]), TensorType(DType.bfloat16, [1, N])]
    with Graph("early_gemv", input_types=types, input_names=["x", "s"]) as g:
        x, s = g.inputs
        w = Weight("w", DType.bfloat16, [N, K])
        g.output(ops.matmul(x, w, transpose_b=True) * s)
    return g


@pytest.fixture(scope="module")
def models():
    if driver.device_properties(0).compute_capability != (9, 0):
        pytest.skip("the cubins are built for sm_90")
    art = compile_graph(build(), "cuda:sm_90")
    late = [k for k, e in art.manifest["kernels"].items() if e.get("pdl_early_reads")]
    assert len(late) == 1 and art.manifest["kernels"][late[0]]["launch_pdl"], late
    w = {"w": (np.random.default_rng(0).standard_normal((N, K)) / 64).astype(np.float32)}
    return art, w


def slow_x(big, i):
    """x of one row, made by a kernel that takes ~100 us, queued on the current stream."""
    return ((big @ big)[:1, :K] * (1 + i % 7) / 1e3).to(torch.bfloat16)


@pytest.mark.parametrize("upload_kernel", ["1", "0"], ids=["upload_kernel", "copy_node"])
def test_early_gemv_reads_each_steps_x(models, upload_kernel, monkeypatch):
    monkeypatch.setenv("GRAPHIR_UPLOAD_KERNEL", upload_kernel)
    art, w = models
    fast = executor.load(art, w, stream=torch.cuda.current_stream())
    eager = executor.load(art, w, use_graphs=False, stream=torch.cuda.current_stream())
    torch.manual_seed(0)
    big = torch.randn(4096, 4096, device="cuda")
    fixed = torch.empty(1, K, device="cuda", dtype=torch.bfloat16)
    rotating = [torch.empty(1, K, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    got, want = [], []
    for i in range(3 * STEPS):
        s = np.random.default_rng(i).standard_normal((1, N)).astype(np.float32)
        mode = i // STEPS
        if mode == 0:    # one address: after two calls, a graph reading it in place
            x = fixed
            x.copy_(slow_x(big, i))
        elif mode == 1:  # other addresses each call: copied in before the graph
            x = rotating[i % len(rotating)]
            x.copy_(slow_x(big, i))
        else:            # numpy (s on the device): staged, written by the graph's upload
            x = slow_x(big, i).float().cpu().numpy()
            s = torch.from_numpy(s).to("cuda", torch.bfloat16)
        (y,) = fast.execute(x, s)
        got.append(torch.from_dlpack(y).clone())
        (y,) = eager.execute(x, s)
        want.append(torch.from_dlpack(y).clone())
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a.float()).all() and torch.equal(a.cpu(), b.cpu()), i
    st = fast.executor.stats
    assert st["direct_hits"] > 0 and st["fast_hits"] > st["direct_hits"], st
    # the numpy x's plan lets nothing start early; the device x's lets the GEMV
    early = [any(op[0] == "launch" and op[5] for op in cp.ops)
             for cp in fast.executor._plans.values()]
    assert True in early and False in early, early
    # the steps differ from each other: a stale x would have shown
    assert not torch.equal(got[3], got[4])
