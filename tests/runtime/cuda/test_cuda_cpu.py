"""runtime.cuda without a GPU: parameter packing, launch layout, DLPack structs, clear errors.

Everything here also passes on a GPU machine.
"""

import ctypes
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from graphir.runtime.cuda import dlpack, driver
from graphir.runtime.cuda.kernel import Kernel
from graphir.runtime.cuda.memory import DeviceBuffer, dtype_name, from_dlpack, numpy_dtype
from graphir.runtime.cuda.module import PARAM_CTYPES, LaunchSpec, PackedParams, _grid3, param_kind
from graphir.runtime.cuda.stream import CudaGraph, stream_handle

ROOT = Path(__file__).resolve().parents[3]
FAKE_PTR = 0x7F00_1234_5600


def _read_back(packed: PackedParams, i: int, ct):
    return ctypes.cast(packed.array[i], ctypes.POINTER(ct)).contents.value


# ---- availability and errors --------------------------------------------------------------
def test_missing_driver_gives_clear_errors_in_a_fresh_process():
    code = (
        "import graphir.runtime.cuda as rc\n"
        "assert rc.is_available() is False\n"
        "for make in (lambda: rc.DeviceBuffer.empty((4,), 'float32'), lambda: rc.Stream(),\n"
        "             lambda: rc.Module(b'\\x7fELF'), lambda: rc.device_properties(0)):\n"
        "    try:\n"
        "        make()\n"
        "    except rc.CudaUnavailableError as e:\n"
        "        assert '/nonexistent/libcuda.so.1' in str(e) and 'NVIDIA' in str(e), str(e)\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print('OK')\n")
    env = dict(os.environ, GRAPHIR_LIBCUDA="/nonexistent/libcuda.so.1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr


@pytest.mark.skipif(driver.is_available(), reason="this machine has a GPU")
def test_no_gpu_here_is_reported_cleanly():
    assert driver.is_available() is False
    with pytest.raises(driver.CudaUnavailableError, match="libcuda"):
        DeviceBuffer.empty((8,), "float32")


def test_cuda_error_names_call_and_result():
    driver.check("cuMemAlloc_v2", 0)
    with pytest.raises(driver.CudaError) as ei:
        driver.check("cuMemAlloc_v2", 2, context="1024 bytes")
    e = ei.value
    assert (e.call, e.code, e.name) == ("cuMemAlloc_v2", 2, "CUDA_ERROR_OUT_OF_MEMORY")
    assert str(e).startswith("cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (2)")
    assert "[1024 bytes]" in str(e)
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in str(driver.CudaError("cuStreamSynchronize", 700))


def test_a_forked_child_is_told_why_cuda_refuses(monkeypatch):
    # The driver answers CUDA_ERROR_NOT_INITIALIZED in a child forked after cuInit; the
    # error then says so and what to do (here the parent's pid is feigned).
    monkeypatch.setattr(driver, "_init_pid", os.getpid())
    assert "forked" not in str(driver.CudaError("cuLaunchKernel", 3))
    monkeypatch.setattr(driver, "_init_pid", os.getpid() + 1)
    msg = str(driver.CudaError("cuLaunchKernel", 3))
    assert msg.startswith("cuLaunchKernel failed: CUDA_ERROR_NOT_INITIALIZED (3)")
    assert f"initialized in process {os.getpid() + 1}, which this one was forked from" in msg
    assert "'spawn'" in msg


# ---- parameter packing --------------------------------------------------------------------
def test_pack_every_kind_reads_back():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    vals = {
        "ptr": int(rng.integers(1, 2**48)), "i32": int(rng.integers(-2**31, 2**31)),
        "i64": int(rng.integers(-2**62, 2**62)), "u32": int(rng.integers(2**31, 2**32)),
        "u64": int(rng.integers(2**40, 2**62)), "i8": int(rng.integers(-128, 128)),
        "fp32": float(rng.standard_normal()), "fp64": float(rng.standard_normal()),
        "fp16": float(rng.standard_normal()), "bf16": float(rng.standard_normal()),
    }
    kinds = list(vals)
    packed = PackedParams(kinds, [vals[k] for k in kinds])
    assert len(packed.values) == len(kinds)
    for i, k in enumerate(kinds):
        got = _read_back(packed, i, PARAM_CTYPES[k])
        if k == "fp32":
            assert got == np.float32(vals[k])
        elif k == "fp16":
            assert got == int(np.float16(vals[k]).view(np.uint16))
        elif k == "bf16":
            want = torch.tensor([vals[k]], dtype=torch.bfloat16).view(torch.int16).item() & 0xFFFF
            assert got == want
        else:
            assert got == vals[k], k
    # The kernelParams array holds the addresses of the values, in order.
    assert [packed.array[i] for i in range(len(kinds))] == [ctypes.addressof(v) for v in packed.values]


def test_pointer_arguments_accept_buffers_tensors_ints_and_none():
    class HasDataPtr:
        def data_ptr(self):
            return FAKE_PTR + 64

    buf = DeviceBuffer.from_pointer(FAKE_PTR, (4,), "float32")
    packed = PackedParams(["*fp32", "ptr", "pointer", "*i8"],
                          [buf, HasDataPtr(), np.uint64(FAKE_PTR + 8), None])
    got = [_read_back(packed, i, ctypes.c_uint64) for i in range(4)]
    assert got == [FAKE_PTR, FAKE_PTR + 64, FAKE_PTR + 8, 0]


@pytest.mark.parametrize("kind,arg,exc,msg", [
    ("i32", 2**31, ValueError, r"parameter n \(i32\).*does not fit in i32"),
    ("u32", -1, ValueError, r"does not fit in u32"),
    ("i32", 1.5, TypeError, r"needs an integer"),
    ("fp32", "x", TypeError, r"needs a number"),
    ("ptr", "0x10", TypeError, r"expected a device pointer"),
    ("ptr", -8, ValueError, r"out of range"),
])
def test_pack_rejects_bad_values_naming_the_parameter(kind, arg, exc, msg):
    with pytest.raises(exc, match=msg):
        PackedParams([kind], [arg], names=["n"])


def test_param_kinds_and_count_errors():
    assert [param_kind(t) for t in ("*bf16", "i32", "f32", "pointer", "uint32", {"type": "*i8"},
                                    {"ctype": "int64"})] == ["ptr", "i32", "fp32", "ptr", "u32",
                                                             "ptr", "i64"]
    with pytest.raises(ValueError, match="unsupported kernel parameter kind 'nvTmaDesc'"):
        param_kind("nvTmaDesc")
    with pytest.raises(ValueError, match=r"takes 2 parameters.*got 1"):
        PackedParams(["ptr", "i32"], [0])


# ---- launch layout against real offline-compiled Triton kernels ----------------------------
def test_launch_layout_matches_ptx_entry_params(compiled_kernels):
    for label, k in compiled_kernels.items():
        specs = [LaunchSpec.from_metadata(k["metadata"])]
        if "aot_metadata" in k:
            specs.append(LaunchSpec.from_metadata(k["aot_metadata"]))
        for spec in specs:
            sizes = [ctypes.sizeof(PARAM_CTYPES[p]) for p in spec.all_params]
            assert sizes == k["ptx_params"], (label, spec)
            assert spec.block == (32 * k["metadata"]["num_warps"], 1, 1)
            assert spec.shared == k["metadata"]["shared"]
        assert k["cubin"][:4] == b"\x7fELF"
    if "aot_metadata" in compiled_kernels["add"]:
        spec = LaunchSpec.from_metadata(compiled_kernels["add"]["aot_metadata"])
        assert spec.param_names == ("x_ptr", "y_ptr", "out_ptr", "n", "alpha")
    assert compiled_kernels["matmul"]["metadata"]["shared"] > 48 * 1024


def test_launch_spec_rejects_unsupported_launches():
    with pytest.raises(ValueError, match="num_ctas=2 needs a cluster launch"):
        LaunchSpec("k", ("ptr",), num_ctas=2)
    with pytest.raises(ValueError, match=r"num_warps=64"):
        LaunchSpec("k", ("ptr",), num_warps=64)
    with pytest.raises(ValueError, match="cooperative"):
        LaunchSpec.from_metadata({"name": "k", "params": ["ptr"], "launch_cooperative_grid": True})
    with pytest.raises(ValueError, match="out of range"):
        _grid3((1, 70000))
    assert _grid3(5) == (5, 1, 1) and _grid3((2, 3)) == (2, 3, 1)


class _FakeFunction:
    """Stands in for a loaded function so Kernel's launch preparation runs without a GPU."""

    def __init__(self):
        self.max_threads_per_block = 1024
        self.dynamic_shared = []
        self.module = type("M", (), {"device": 0})()
        self.name = "fake"

    def set_max_dynamic_shared(self, n):
        self.dynamic_shared.append(n)


def test_kernel_raises_shared_limit_only_above_48k_and_passes_null_scratch():
    f = _FakeFunction()
    Kernel(f, LaunchSpec("k", ("ptr",), shared=40000))
    assert f.dynamic_shared == []
    k = Kernel(f, LaunchSpec("k", ("ptr", "i32"), shared=100_000, num_warps=8))
    assert f.dynamic_shared == [100_000]
    packed = k.pack((3, 2), [FAKE_PTR, 7])
    assert packed.kinds == ["ptr", "i32", "ptr", "ptr"]
    cts = [ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint64]
    assert [_read_back(packed, i, c) for i, c in enumerate(cts)] == [FAKE_PTR, 7, 0, 0]
    with pytest.raises(ValueError, match=r"takes 2 arguments"):
        k.pack((1,), [FAKE_PTR])


def test_kernel_allocates_aligned_global_scratch_per_program(monkeypatch):
    made = []

    def fake_empty(nbytes, dtype="uint8", device=0):
        made.append(nbytes)
        return DeviceBuffer.from_pointer(FAKE_PTR + 8 + 1000 * len(made), (nbytes,), "uint8")

    monkeypatch.setattr(DeviceBuffer, "empty", staticmethod(fake_empty))
    k = Kernel(_FakeFunction(), LaunchSpec("k", ("ptr",), global_scratch_size=96,
                                            global_scratch_align=128))
    packed = k.pack((4, 2, 1), [0])
    scratch = _read_back(packed, 1, ctypes.c_uint64)
    assert made == [8 * 96 + 128] and scratch % 128 == 0 and scratch >= FAKE_PTR + 1008
    assert _read_back(packed, 2, ctypes.c_uint64) == 0  # no profile scratch
    k.pack((2,), [0])  # smaller grid reuses the buffer
    assert len(made) == 1
    k.pack((64,), [0])  # larger grid grows it; the old one is retired, not freed
    assert made[-1] == 64 * 96 + 128 and len(k._retired) == 1


# ---- DLPack -------------------------------------------------------------------------------
@pytest.mark.parametrize("versioned", [False, True])
def test_buffer_capsule_layout_round_trip(versioned):
    base = dlpack.live_count()
    buf = DeviceBuffer.from_pointer(FAKE_PTR, (3, 5, 2), "bfloat16", device=0)
    ref = weakref.ref(buf)
    cap = buf.__dlpack__(stream=-1, max_version=(1, 0) if versioned else None)
    del buf
    gc.collect()
    assert ref() is not None, "the capsule must keep the buffer alive"
    assert dlpack.live_count() == base + 1
    info = dlpack.read_capsule(cap)
    assert (info.ptr, info.shape, info.strides, info.dtype) == (FAKE_PTR, (3, 5, 2), (10, 2, 1), "bfloat16")
    assert (info.device_type, info.device_id, info.read_only) == (dlpack.KDLCUDA, 0, False)
    with pytest.raises(ValueError, match="unconsumed DLPack capsule"):
        dlpack.read_capsule(cap)  # renamed to used_dltensor*
    info.release()
    gc.collect()
    assert dlpack.live_count() == base and ref() is None


def test_unconsumed_capsule_releases_its_buffer():
    base = dlpack.live_count()
    cap = DeviceBuffer.from_pointer(FAKE_PTR, (4,), "float32").__dlpack__(stream=-1)
    assert dlpack.live_count() == base + 1
    del cap
    assert dlpack.live_count() == base


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "uint8", "bool", "float16"])
@pytest.mark.parametrize("versioned", [False, True])
def test_capsules_we_make_are_read_by_torch(dtype, versioned):
    torch = pytest.importorskip("torch")
    base = dlpack.live_count()
    rng = np.random.default_rng()
    raw = rng.integers(0, 256, size=(4, 6, 8) if dtype != "bool" else (4, 6), dtype=np.uint8)
    host = raw.view(numpy_dtype(dtype)) if dtype != "bool" else (raw % 2).astype(np.bool_)
    host = np.ascontiguousarray(host)
    cap = dlpack.make_capsule(host.ctypes.data, host.shape, dtype, dlpack.KDLCPU, 0, owner=host,
                              versioned=versioned)
    t = torch.utils.dlpack.from_dlpack(cap)
    assert t.data_ptr() == host.ctypes.data and tuple(t.shape) == host.shape
    assert str(t.dtype) == f"torch.{dtype}"
    as_bits = t.view(torch.int16) if dtype == "bfloat16" else t
    np.testing.assert_array_equal(as_bits.numpy().view(np.uint8), host.view(np.uint8))
    del t, cap, as_bits
    gc.collect()
    assert dlpack.live_count() == base


def test_read_torch_capsules_dtypes_and_strides():
    torch = pytest.importorskip("torch")
    for dt, name in [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"),
                     (torch.float8_e4m3fn, "float8_e4m3fn"), (torch.int32, "int32"),
                     (torch.uint32, "uint32"), (torch.bool, "bool")]:
        t = torch.randn(3, 4).to(dt)
        for kwargs in ({}, {"max_version": (1, 0)}):
            info = dlpack.read_capsule(t.__dlpack__(**kwargs))
            assert (info.dtype, info.shape, info.ptr) == (name, (3, 4), t.data_ptr())
            assert info.device_type == dlpack.KDLCPU and info.is_contiguous()
            info.release()
    tt = torch.randn(3, 4).T
    info = dlpack.read_capsule(tt.__dlpack__())
    assert info.strides == (1, 4) and not info.is_contiguous()
    info.release()


def test_from_dlpack_rejects_host_tensors_and_releases_them():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"expected a CUDA tensor.*device type 1 \(cpu\)"):
        from_dlpack(torch.ones(3))
    base = dlpack.live_count()
    host = np.arange(6, dtype=np.float32)
    cap = dlpack.make_capsule(host.ctypes.data, host.shape, "float32", dlpack.KDLCPU, 0, owner=host)
    with pytest.raises(ValueError, match="not CUDA"):
        from_dlpack(cap)
    assert dlpack.live_count() == base


def test_dlpack_export_options():
    buf = DeviceBuffer.from_pointer(FAKE_PTR, (2,), "float32", device=0)
    assert buf.__dlpack_device__() == (2, 0)
    with pytest.raises(BufferError, match="copy=True"):
        buf.__dlpack__(copy=True)
    with pytest.raises(BufferError, match=r"cannot export to device \(1, 0\)"):
        buf.__dlpack__(dl_device=(1, 0))


# ---- buffers without memory traffic --------------------------------------------------------
def test_buffer_views_and_dtypes():
    from graphir.dtype import DType

    buf = DeviceBuffer.from_pointer(FAKE_PTR, (4, 8), DType.bfloat16)
    assert (buf.dtype, buf.nbytes, buf.itemsize, buf.size) == ("bfloat16", 64, 2, 32)
    v = buf.view((4,), "float32", offset_bytes=16)
    assert (v.ptr, v.shape, v.nbytes, v.base is buf) == (FAKE_PTR + 16, (4,), 16, True)
    assert buf.view(dtype="uint8").shape == (64,)
    with pytest.raises(ValueError, match="exceeds the buffer"):
        buf.view((9,), "float32", offset_bytes=32)
    with pytest.raises(ValueError, match="not aligned"):
        buf.view((2,), "float32", offset_bytes=2)
    assert dtype_name(np.float16) == "float16" and dtype_name(np.dtype("int64")) == "int64"
    assert numpy_dtype("float8_e4m3fn") == np.uint8
    with pytest.raises(ValueError, match="unsupported buffer dtype"):
        dtype_name("complex64")
    with pytest.raises(ValueError, match="host array has 12 bytes"):
        buf.copy_from_numpy(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="memset byte value"):
        buf.memset(256)


def test_stream_and_graph_argument_errors():
    assert stream_handle(None) == 0 and stream_handle(1234) == 1234
    with pytest.raises(TypeError, match="expected a runtime.cuda.Stream"):
        stream_handle("s")
    g = CudaGraph()
    with pytest.raises(ValueError, match="before a successful capture"):
        g.replay()
    with pytest.raises(ValueError, match="legacy default"):
        with g.capture(None):
            pass


# ---- the CUDA arch: compile and load refuse GPUs the kernels are not written for ----------
@pytest.mark.parametrize("text", ["cuda:sm_80", "cuda:sm_89", "cuda:sm_100"])
def test_cuda_targets_other_than_sm90_are_refused_by_name(text):
    """Such a compile used to reach LLVM with Hopper-only instructions and abort the process."""
    from graphir.lowering.driver import Target

    with pytest.raises(ValueError, match=rf"CUDA target '{text}' is not supported.*cuda:sm_90"):
        Target.parse(text)
    assert str(Target.parse("cuda")) == str(Target.parse("cuda:sm_90")) == "cuda:sm_90"


def test_load_refuses_a_gpu_of_another_compute_capability():
    from types import SimpleNamespace

    from graphir.runtime.cuda.device_model import _check_arch

    def props(cc):
        return SimpleNamespace(device_properties=lambda o: SimpleNamespace(
            name=f"GPU{o}", compute_capability=cc))
    art = SimpleNamespace(path="m.gart", target="cuda:sm_90")
    _check_arch(art, [0, 1], props((9, 0)))
    with pytest.raises(ValueError, match=r"m.gart: built for cuda:sm_90, but GPU 0 \(GPU0\) is "
                                         r"sm_80; .*sm_90 \(H100, H200\) only"):
        _check_arch(art, [0], props((8, 0)))
