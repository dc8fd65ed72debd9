"""runtime.cuda on an NVIDIA GPU (compute capability 9.0: the cubins are built for sm_90).

Kernels come from compile_kernels.py, compiled offline with triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32)); nothing here uses Triton's own launcher.
"""

import gc
import math

import numpy as np
import pytest

from graphir.runtime.cuda import driver

if not driver.is_available():
    pytest.skip("no NVIDIA GPU / libcuda on this machine", allow_module_level=True)

from graphir.runtime.cuda import dlpack  # noqa: E402
from graphir.runtime.cuda.driver import CudaError  # noqa: E402
from graphir.runtime.cuda.kernel import Kernel  # noqa: E402
from graphir.runtime.cuda.memory import DeviceBuffer, from_dlpack, pinned_empty  # noqa: E402
from graphir.runtime.cuda.module import Module, PackedParams, launch  # noqa: E402
from graphir.runtime.cuda.stream import CudaGraph, Event, Stream  # noqa: E402
from tests.runtime.cuda.compile_kernels import ADD_BLOCK, MM_TILE, TMA_TILE  # noqa: E402

pytestmark = pytest.mark.gpu
NAN_BITS = 0x7FC00000


@pytest.fixture(scope="module")
def props():
    p = driver.device_properties(0)
    if p.compute_capability != (9, 0):
        pytest.skip(f"sm_90 cubins need a compute 9.0 GPU; this is {p.name} {p.compute_capability}")
    return p


@pytest.fixture(scope="module")
def kernels(compiled_kernels, props):
    return {k: Kernel.from_cubin(v["cubin"], v["metadata"]) for k, v in compiled_kernels.items()}


def _rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _add(kernel, x, y, out, n, alpha, stream=None):
    kernel.launch((math.ceil(n / ADD_BLOCK),), x, y, out, n, alpha, stream=stream)


def test_device_properties(props):
    assert props.name and props.sm_count > 0 and props.total_memory > 2**30
    assert props.max_shared_per_block == 48 * 1024
    assert props.max_shared_per_block_optin > 48 * 1024
    assert props.driver_version >= 12000
    free, total = driver.mem_get_info()
    assert 0 < free <= total
    print(props)


def test_alloc_copy_round_trip(props):
    rng = np.random.default_rng()
    x = _rand(rng, 37, 19)
    a = DeviceBuffer.from_numpy(x)
    np.testing.assert_array_equal(a.to_numpy(), x)
    b = DeviceBuffer.empty(x.shape, "float32")
    b.fill_u32(NAN_BITS)
    assert np.isnan(b.to_numpy()).all()
    b.copy_from(a)
    np.testing.assert_array_equal(b.to_numpy(), x)
    a.memset(0xAB)
    assert (a.to_numpy().view(np.uint8) == 0xAB).all()
    # Async both ways through page-locked memory, on a stream.
    s = Stream()
    src, dst = pinned_empty(x.shape, "float32"), pinned_empty(x.shape, "float32")
    src[...] = _rand(rng, *x.shape)
    dst[...] = np.nan
    a.copy_from_numpy(src, stream=s)
    a.copy_to_numpy(dst, stream=s)
    s.synchronize()
    np.testing.assert_array_equal(dst, src)
    # A view at an offset copies only its part.
    v = b.view((19,), offset_bytes=19 * 4 * 5)
    np.testing.assert_array_equal(v.to_numpy(), x[5])


def test_add_kernel_matches_numpy(kernels, compiled_kernels):
    rng = np.random.default_rng()
    n, pad = 1000, 24  # not a multiple of the block: the mask matters
    x, y, alpha = _rand(rng, n), _rand(rng, n), float(rng.standard_normal())
    dx, dy = DeviceBuffer.from_numpy(x), DeviceBuffer.from_numpy(y)
    out = DeviceBuffer.empty((n + pad,), "float32")
    md = compiled_kernels["add"].get("aot_metadata", compiled_kernels["add"]["metadata"])
    for k in (kernels["add"], Kernel.from_cubin(compiled_kernels["add"]["cubin"], md)):
        out.fill_u32(NAN_BITS)
        _add(k, dx, dy, out, n, alpha)
        driver.synchronize()
        got = out.to_numpy()
        np.testing.assert_allclose(got[:n], x + np.float32(alpha) * y, rtol=1e-6, atol=1e-6)
        assert np.isnan(got[n:]).all(), "kernel wrote past n"


def test_every_scalar_kind_reaches_the_kernel(kernels):
    rng = np.random.default_rng()
    vals = [int(rng.integers(-2**31, 0)), int(rng.integers(2**33, 2**50)),
            int(rng.integers(2**31, 2**32)), float(np.float32(rng.standard_normal())),
            float(np.float16(rng.standard_normal()))]
    out = DeviceBuffer.empty((5,), "float64")
    out.fill_u32(NAN_BITS)
    kernels["scalars"].launch((1,), out, *vals)
    driver.synchronize()
    np.testing.assert_array_equal(out.to_numpy(), np.array(vals, dtype=np.float64))


def test_launch_with_more_than_48k_dynamic_shared(kernels, compiled_kernels, props):
    k = kernels["matmul"]
    assert k.spec.shared > 48 * 1024
    assert k.function.attribute(driver.FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES) == k.spec.shared
    rng = np.random.default_rng()
    M, N, K = 2 * MM_TILE[0], 2 * MM_TILE[1], 3 * MM_TILE[2]
    a, b = _rand(rng, M, K, dtype=np.float16), _rand(rng, K, N, dtype=np.float16)
    da, db = DeviceBuffer.from_numpy(a), DeviceBuffer.from_numpy(b)
    dc = DeviceBuffer.empty((M, N), "float32")
    dc.fill_u32(NAN_BITS)
    k.launch((M // MM_TILE[0], N // MM_TILE[1]), da, db, dc, M, N, K)
    driver.synchronize()
    ref = a.astype(np.float64) @ b.astype(np.float64)
    got = dc.to_numpy()
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
    # The same function in a fresh module, without the opt-in, refuses the launch.
    fresh = Module(compiled_kernels["matmul"]["cubin"]).get_function(k.spec.name)
    params = PackedParams(k.spec.all_params, [da, db, dc, M, N, K, None, None])
    with pytest.raises(CudaError, match=r"cuLaunchKernel failed: CUDA_ERROR_"):
        launch(fresh, (2, 2), k.spec.block, params, shared=k.spec.shared)
    with pytest.raises(ValueError, match="opt-in limit"):
        fresh.set_max_dynamic_shared(props.max_shared_per_block_optin + 1)


def test_global_scratch_is_allocated_for_device_tma(kernels):
    k = kernels["tma"]
    assert k.spec.global_scratch_size > 0
    rng = np.random.default_rng()
    M, N = 5 * TMA_TILE[0], TMA_TILE[1]
    x = _rand(rng, M, N)
    dx, dout = DeviceBuffer.from_numpy(x), DeviceBuffer.empty((M, N), "float32")
    dout.fill_u32(NAN_BITS)
    k.launch((M // TMA_TILE[0],), dx, dout, M, N)
    driver.synchronize()
    np.testing.assert_array_equal(dout.to_numpy(), 2 * x)


def test_dlpack_out_to_torch(props):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    x = _rand(rng, 6, 10)
    buf = DeviceBuffer.from_numpy(x)
    base = dlpack.live_count()
    t = torch.from_dlpack(buf)
    assert t.is_cuda and t.data_ptr() == buf.ptr and t.dtype == torch.float32
    np.testing.assert_array_equal(t.cpu().numpy(), x)
    t.mul_(2)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(buf.to_numpy(), 2 * x)  # zero copy
    del buf
    gc.collect()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.cpu().numpy(), 2 * x)  # the tensor keeps the memory alive
    del t
    gc.collect()
    assert dlpack.live_count() == base
    bits = rng.integers(0, 2**16, size=(4, 8), dtype=np.uint16) & 0x7F7F  # finite bf16 values
    tb = torch.from_dlpack(DeviceBuffer.from_numpy(bits, dtype="bfloat16"))
    assert tb.dtype == torch.bfloat16
    np.testing.assert_array_equal(tb.view(torch.int16).cpu().numpy().view(np.uint16), bits)


def test_dlpack_in_from_torch(kernels):
    torch = pytest.importorskip("torch")
    n = 777
    tx, ty = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    vx, vy = from_dlpack(tx), from_dlpack(ty)
    assert (vx.ptr, vx.shape, vx.dtype, vx.owns_memory) == (tx.data_ptr(), (n,), "float32", False)
    np.testing.assert_array_equal(vx.to_numpy(), tx.cpu().numpy())
    out = torch.full((n,), float("nan"), device="cuda")
    _add(kernels["add"], vx, vy, from_dlpack(out), n, 0.5)
    driver.synchronize()
    torch.testing.assert_close(out, tx + 0.5 * ty, rtol=1e-6, atol=1e-6)
    # A view keeps the producer's memory alive after the tensor's last Python reference dies.
    t = torch.randn(4096, device="cuda")
    ref = t.cpu().numpy()
    v = from_dlpack(t)
    del t
    gc.collect()
    torch.cuda.empty_cache()
    junk = torch.randn(4096 * 4, device="cuda")  # noqa: F841  would reuse freed memory
    np.testing.assert_array_equal(v.to_numpy(), ref)
    assert from_dlpack(torch.randn(3, 2, device="cuda").to(torch.bfloat16)).dtype == "bfloat16"
    with pytest.raises(ValueError, match="not C-contiguous"):
        from_dlpack(torch.randn(3, 4, device="cuda").T)


def test_streams_events_and_timing(kernels):
    rng = np.random.default_rng()
    n = 1 << 20
    x, y = _rand(rng, n), _rand(rng, n)
    s1, s2 = Stream(), Stream()
    hx = pinned_empty((n,), "float32")
    hx[...] = x
    dx, out = DeviceBuffer.empty((n,), "float32"), DeviceBuffer.empty((n,), "float32")
    dy = DeviceBuffer.from_numpy(y)
    dx.copy_from_numpy(hx, stream=s1)
    ready = s1.record_event(timing=False)
    s2.wait_event(ready)  # s2's kernel must see s1's copy
    start, end = Event(), Event()
    start.record(s2)
    for _ in range(20):
        _add(kernels["add"], dx, dy, out, n, 1.5, stream=s2)
    end.record(s2)
    ms = start.elapsed_time(end)
    assert s2.query() and end.query()
    np.testing.assert_allclose(out.to_numpy(), x + np.float32(1.5) * y, rtol=1e-6, atol=1e-6)
    assert 0 < ms < 1000
    gbps = 20 * 3 * 4 * n / (ms * 1e-3) / 1e9
    print(f"add kernel, {n} floats x20: {ms:.3f} ms ({gbps:.0f} GB/s)")


def test_cuda_graph_capture_and_replay(kernels):
    rng = np.random.default_rng()
    n = 4099
    add = kernels["add"]
    s = Stream()
    a, b, c, d = (DeviceBuffer.empty((n,), "float32") for _ in range(4))

    def step():  # c = a + 0.5 b ; d = c + 2 a
        _add(add, a, b, c, n, 0.5, stream=s)
        _add(add, c, a, d, n, 2.0, stream=s)

    def load_inputs():
        xa, xb = _rand(rng, n), _rand(rng, n)
        a.copy_from_numpy(xa, stream=s)
        b.copy_from_numpy(xb, stream=s)
        return xa, xb

    load_inputs()
    step()  # direct launches (also warm-up before capture)
    s.synchronize()
    direct = (c.to_numpy(), d.to_numpy())
    g = CudaGraph()
    with g.capture(s):
        assert s.capture_status() == "active"
        step()
    g.keep(a, b, c, d)
    assert s.capture_status() == "none" and g.captured
    for buf in (c, d):
        buf.fill_u32(NAN_BITS)
    g.replay(s)
    s.synchronize()
    np.testing.assert_array_equal(c.to_numpy(), direct[0])
    np.testing.assert_array_equal(d.to_numpy(), direct[1])
    # New inputs in the same buffers: replays recompute; same bits as direct launches.
    xa, xb = load_inputs()
    for _ in range(3):
        g.replay(s)
    s.synchronize()
    replayed = d.to_numpy()
    np.testing.assert_allclose(replayed, (xa + np.float32(0.5) * xb) + np.float32(2.0) * xa,
                               rtol=1e-5, atol=1e-5)
    step()
    s.synchronize()
    np.testing.assert_array_equal(d.to_numpy(), replayed)
    g.destroy()


def test_failed_capture_leaves_the_stream_usable(kernels):
    s = Stream()
    x = DeviceBuffer.from_numpy(np.arange(8, dtype=np.float32))
    out = DeviceBuffer.empty((8,), "float32")
    g = CudaGraph()
    with pytest.raises(RuntimeError, match="boom"):
        with g.capture(s):
            _add(kernels["add"], x, x, out, 8, 1.0, stream=s)
            raise RuntimeError("boom")
    assert s.capture_status() == "none" and not g.captured
    _add(kernels["add"], x, x, out, 8, 1.0, stream=s)
    s.synchronize()
    np.testing.assert_array_equal(out.to_numpy(), 2 * np.arange(8, dtype=np.float32))


def _child_copies(q):
    try:
        DeviceBuffer.from_numpy(np.arange(4, dtype=np.float32)).to_numpy()
        q.put("no error")
    except Exception as e:  # noqa: BLE001  (reported to the parent)
        q.put(f"{type(e).__name__}: {e}")


def test_a_forked_child_gets_a_clear_cuda_error(props):
    # CUDA cannot be used in a child forked after cuInit; the driver's answer is only
    # "initialization error", so the error says what happened and what to do instead.
    import multiprocessing as mp

    DeviceBuffer.from_numpy(np.ones(4, np.float32)).to_numpy()   # cuInit here, in the parent
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_copies, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung on its first CUDA call")
    got = q.get(timeout=5)
    assert got.startswith("CudaError") and "which this one was forked from" in got, got
    assert "'spawn'" in got
