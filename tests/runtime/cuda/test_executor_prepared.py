"""Kernel.prepare without a GPU: the parameters are packed once and every call of the
prepared launch hands cuLaunchKernel the same packed array, grid, block and shared size on
the stream it is given (a fake cuLaunchKernel records the calls)."""
import ctypes
import types

import pytest

from graphir.runtime.cuda import driver
from graphir.runtime.cuda.kernel import Kernel, PreparedLaunch
from graphir.runtime.cuda.module import LaunchSpec

FAKE_PTR = 0x7F00_1234_5600


class _FakeFunction:
    handle, name, max_threads_per_block = 0xF00D, "fake", 1024
    module = types.SimpleNamespace(device=0)

    def set_max_dynamic_shared(self, n):
        pass


class _Calls(list):
    rc = 0  # what the fake cuLaunchKernel returns


@pytest.fixture
def launches(monkeypatch):
    calls = _Calls()
    real = driver.function
    monkeypatch.setattr(driver, "function",
                        lambda name: (lambda *a: calls.append(a) or calls.rc)
                        if name == "cuLaunchKernel" else real(name))
    return calls


def test_prepared_launch_reuses_one_packed_array(launches):
    k = Kernel(_FakeFunction(), LaunchSpec("k", ("ptr", "i32"), shared=4096, num_warps=8))
    p = k.prepare((3, 2), [FAKE_PTR + 64, 77])
    assert isinstance(p, PreparedLaunch)
    for stream in (0, 0x55, 0x66):
        p(stream)
    assert len(launches) == 3
    first = launches[0]
    assert first[:8] == (0xF00D, 3, 2, 1, 256, 1, 1, 4096)
    assert [c[8] for c in launches] == [0, 0x55, 0x66]
    assert {c[9] for c in launches} == {p.params.pointer}
    vals = ctypes.cast(first[9], ctypes.POINTER(ctypes.c_void_p * 4)).contents
    assert ctypes.cast(vals[0], ctypes.POINTER(ctypes.c_uint64)).contents.value == FAKE_PTR + 64
    assert ctypes.cast(vals[1], ctypes.POINTER(ctypes.c_int32)).contents.value == 77


def test_an_empty_grid_launches_nothing_and_errors_name_the_kernel(launches):
    k = Kernel(_FakeFunction(), LaunchSpec("k", ("i32",)))
    k.prepare((0, 4), [1])(0)
    assert launches == []
    launches.rc = 719
    with pytest.raises(driver.CudaError, match=r"cuLaunchKernel failed: .*\[k grid=\(2, 1, 1\)\]"):
        k.prepare(2, [1])(0)
    with pytest.raises(ValueError, match=r"takes 1 arguments"):
        k.prepare(2, [1, 2])


def test_device_import_cache_rechecks_address_and_shape():
    torch = pytest.importorskip("torch")
    from graphir.runtime.cuda.device_model import CudaDevice
    from graphir.runtime.cuda.memory import DeviceBuffer

    dev = CudaDevice.__new__(CudaDevice)  # the cache alone: no driver needed
    dev._imports = {}
    t = torch.zeros(4, 6)
    dev._remember(t, DeviceBuffer.from_pointer(t.data_ptr(), (4, 6), "float32", owner=t))
    hit = dev._known(t)
    assert hit.ptr == t.data_ptr() and hit.shape == (4, 6) and hit.base is t
    assert all(entry[1].base is None for entry in dev._imports.values())  # tensor not kept
    t.resize_(5, 6)  # same object, new shape (and maybe new memory): not a hit
    assert dev._known(t) is None
    assert dev._known(torch.zeros(4, 6)) is None


@pytest.fixture
def ex_launches(monkeypatch):
    """A fake cuLaunchKernelEx recording the launch config each call hands it."""
    from graphir.runtime.cuda import module

    calls = _Calls()

    def fake(config, handle, params, extra):
        c = ctypes.cast(config, ctypes.POINTER(module._LaunchConfig)).contents
        attr = c.attrs[0]
        calls.append(dict(grid=(c.grid_x, c.grid_y, c.grid_z),
                          block=(c.block_x, c.block_y, c.block_z), shared=c.shared,
                          stream=c.stream or 0, attrs=c.num_attrs, attr=(attr.id, attr.value),
                          handle=handle, params=params, extra=extra))
        return calls.rc

    real = driver.function
    plain = _Calls()
    calls.plain = plain
    monkeypatch.setattr(driver, "function",
                        lambda name: fake if name == "cuLaunchKernelEx"
                        else (lambda *a: plain.append(a) or 0) if name == "cuLaunchKernel"
                        else real(name))
    # A 132-SM device (an H100 SXM / H200): the PDL launch is for grids of at most 132.
    monkeypatch.setattr(driver, "device_attribute",
                        lambda attr, dev=0: 132 if attr == driver.ATTR_MULTIPROCESSOR_COUNT
                        else pytest.fail(f"device attribute {attr} asked"))
    monkeypatch.setattr(driver, "ensure_context", lambda dev=0: None)
    return calls


def test_a_pdl_kernel_launches_with_programmatic_stream_serialization(ex_launches):
    """A cubin marked launch_pdl goes through cuLaunchKernelEx with attribute 6
    (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) set to 1, prepared or not."""
    md = {"name": "k", "params": [{"name": "x", "type": "*fp32"}, {"name": "n", "type": "i32"}],
          "num_warps": 4, "shared": 1024, "launch_pdl": True}
    spec = LaunchSpec.from_metadata(md)
    assert spec.pdl is True
    k = Kernel(_FakeFunction(), spec)
    p = k.prepare((5, 1, 2), [FAKE_PTR, 9])
    p(0x77)
    p(0x78)
    assert [c["stream"] for c in ex_launches] == [0x77, 0x78]
    for c in ex_launches:
        assert c["grid"] == (5, 1, 2) and c["block"] == (128, 1, 1) and c["shared"] == 1024
        assert c["attrs"] == 1 and c["attr"] == (6, 1)
        assert c["handle"] == 0xF00D and c["params"] == p.params.pointer
    assert ex_launches.plain == []
    ex_launches.rc = 1
    with pytest.raises(driver.CudaError, match=r"cuLaunchKernelEx failed: .*k grid=\(5, 1, 2\)"):
        p(0)


def test_a_pdl_kernel_with_more_programs_than_sms_launches_plainly(ex_launches):
    """A grid larger than the SM count would land early programs unevenly on SMs its
    predecessor still holds, so it takes the ordinary launch; 132 programs still go early."""
    md = {"name": "k", "params": [{"name": "x", "type": "*fp32"}], "launch_pdl": True}
    k = Kernel(_FakeFunction(), LaunchSpec.from_metadata(md))
    assert k.pdl_max_programs == 132
    k.prepare((66, 2), [FAKE_PTR])(0x10)
    k.prepare((133,), [FAKE_PTR])(0x11)
    k.launch((67, 2), FAKE_PTR, stream=0x12)
    k.launch(132, FAKE_PTR, stream=0x13)
    assert [c["grid"] for c in ex_launches] == [(66, 2, 1), (132, 1, 1)]
    assert [(c[1:4], c[8]) for c in ex_launches.plain] == [((133, 1, 1), 0x11),
                                                            ((67, 2, 1), 0x12)]


def test_pdl_is_off_without_the_mark_or_when_disabled(monkeypatch):
    md = {"name": "k", "params": ["ptr"], "launch_pdl": False}
    assert LaunchSpec.from_metadata(md).pdl is False
    monkeypatch.setenv("GRAPHIR_PDL", "0")
    assert LaunchSpec.from_metadata(dict(md, launch_pdl=True)).pdl is False


def test_a_kernel_with_early_reads_goes_early_only_when_vouched_for(ex_launches):
    """pdl_early_reads (the late-waiting GEMV): PDL whatever the grid, but only for a
    prepared launch whose caller passes early=True; a plain launch never."""
    md = {"name": "k", "params": [{"name": "a", "type": "*bf16"}, {"name": "c", "type": "*bf16"}],
          "launch_pdl": True, "pdl_early_reads": ["a"]}
    spec = LaunchSpec.from_metadata(md)
    assert spec.early_reads == (0,)
    k = Kernel(_FakeFunction(), spec)
    p = k.prepare((3072,), [FAKE_PTR, FAKE_PTR + 256])
    p(0x20)
    p(0x21, early=True)
    k.launch(4, FAKE_PTR, FAKE_PTR, stream=0x22)
    assert [(c["grid"], c["stream"]) for c in ex_launches] == [((3072, 1, 1), 0x21)]
    assert [(c[1:4], c[8]) for c in ex_launches.plain] == [((3072, 1, 1), 0x20),
                                                            ((4, 1, 1), 0x22)]
    with pytest.raises(ValueError, match=r"pdl_early_reads names \['b'\]"):
        LaunchSpec.from_metadata(dict(md, pdl_early_reads=["b"]))
