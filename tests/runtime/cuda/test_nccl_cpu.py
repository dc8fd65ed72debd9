"""Multi-device execution without a GPU: the NCCL wrapper's calls (against a recording fake
library), value/step placement, and whole TP / DP / collective plans run by PlanExecutor on two
virtual devices whose kernels run under Triton's interpreter, against the reference interpreter.
"""
import ctypes
import os
import sys

import numpy as np
import pytest

from graphir import DeviceRef, DType
from graphir.runtime.cuda import nccl
from graphir.runtime.cuda.multi_device import DeviceGroup, logical_devices, placement
from tests.runtime.fake_nccl import FakeNccl
from tests.gpu.test_parallel_gpu import collective_graph, parallel_layer, run_dp, run_tp

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


# ---- the NCCL wrapper ---------------------------------------------------------------------
def _v(x):
    return x.value if hasattr(x, "value") else x


def test_dtype_mapping():
    assert nccl.nccl_dtype(DType.bfloat16, reduce=True) == (9, 2)
    assert nccl.nccl_dtype("float16", reduce=True) == (6, 2)
    assert nccl.nccl_dtype(DType.float32, reduce=True) == (7, 4)
    assert nccl.nccl_dtype(DType.int32, reduce=True) == (2, 4)
    assert nccl.nccl_dtype(DType.float8_e4m3fn, reduce=False) == (1, 1)  # moved as bytes
    with pytest.raises(ValueError, match="cannot reduce float8_e4m3fn"):
        nccl.nccl_dtype(DType.float8_e4m3fn, reduce=True)
    with pytest.raises(ValueError, match="unsupported dtype 'complex64'"):
        nccl.nccl_dtype("complex64", reduce=False)


def test_comm_init_and_grouped_all_reduce_on_each_stream():
    lib = FakeNccl()
    comm = nccl.Communicator([1, 0], lib=lib)
    (name, (comms, n, devs)), = lib.calls
    assert name == "ncclCommInitAll" and n == 2 and list(devs) == [1, 0]
    lib.calls.clear()
    comm.all_reduce([(0x10, 0x20, 7), (0x30, 0x30, 9)], 96, DType.bfloat16)
    assert lib.names() == ["ncclGroupStart", "ncclAllReduce", "ncclAllReduce", "ncclGroupEnd"]
    for (_, args), send, recv, stream, c in zip(lib.calls[1:3], (0x10, 0x30), (0x20, 0x30),
                                                (7, 9), (0x1001, 0x1000)):
        assert [_v(a) for a in args] == [send, recv, 96, 9, 0, c, stream]


def test_all_gather_and_varying_gather_as_grouped_broadcasts():
    lib = FakeNccl()
    comm = nccl.Communicator([0, 1], lib=lib)
    lib.calls.clear()
    comm.all_gather([(0x10, 0x100, 1), (0x20, 0x200, 2)], 5, "float32")
    assert [_v(a) for a in lib.calls[1][1]] == [0x10, 0x100, 5, 7, 0x1000, 1]
    lib.calls.clear()
    comm.gather_varying([(0x10, 0x100, 1), (0x20, 0x200, 2)], [3, 4], DType.bfloat16)
    bc = [[_v(a) for a in args] for n, args in lib.calls if n == "ncclBroadcast"]
    # root 0's 3 elements land at offset 0 on both ranks, root 1's 4 at byte offset 6.
    assert bc == [[0x10, 0x100, 3, 9, 0, 0x1000, 1], [0x200, 0x200, 3, 9, 0, 0x1001, 2],
                  [0x106, 0x106, 4, 9, 1, 0x1000, 1], [0x20, 0x206, 4, 9, 1, 0x1001, 2]]
    assert lib.names()[0] == "ncclGroupStart" and lib.names()[-1] == "ncclGroupEnd"


def test_bad_arguments_and_failed_calls_are_clear():
    lib = FakeNccl()
    with pytest.raises(ValueError, match="distinct CUDA ordinals"):
        nccl.Communicator([0, 0], lib=lib)
    comm = nccl.Communicator([0, 1], lib=lib)
    with pytest.raises(ValueError, match=r"one \(send, recv, stream\) entry per device \(2"):
        comm.all_reduce([(1, 1, 0)], 4, "float32")
    with pytest.raises(ValueError, match="unknown op 'mean'"):
        comm.all_reduce([(1, 1, 0), (2, 2, 0)], 4, "float32", op="mean")
    with pytest.raises(ValueError, match="non-negative int"):
        comm.all_gather([(1, 1, 0), (2, 2, 0)], -1, "float32")
    bad = FakeNccl(fail="ncclAllReduce")
    comm = nccl.Communicator([0, 1], lib=bad)
    with pytest.raises(nccl.NcclError, match=r"ncclAllReduce \(all_reduce\) failed: "
                                             r"ncclInvalidArgument \(4\): invalid argument"):
        comm.all_reduce([(1, 1, 0), (2, 2, 0)], 4, "float32")
    names = bad.names()  # the group is closed even after a failed call
    assert names.index("ncclGroupEnd") > names.index("ncclAllReduce")
    comm.destroy()
    with pytest.raises(ValueError, match="destroyed"):
        comm.all_reduce([(1, 1, 0), (2, 2, 0)], 4, "float32")


def test_missing_library_names_what_was_tried(monkeypatch):
    monkeypatch.setattr(nccl, "_lib", None)
    monkeypatch.setattr(nccl, "_error", None)
    monkeypatch.setenv(nccl.LIBNCCL_ENV, "/nonexistent/libnccl.so.2")
    assert nccl.candidates() == ["/nonexistent/libnccl.so.2"]
    with pytest.raises(nccl.NcclUnavailableError, match=r"GRAPHIR_LIBNCCL. Tried: /nonexistent/libnccl.so.2"):
        nccl.load()
    assert nccl.is_available() is False


def test_bind_sets_prototypes():
    lib = type("L", (), {})()
    for name in nccl._PROTOTYPES:
        setattr(lib, name, type("F", (), {})())
    nccl.bind(lib)
    assert lib.ncclAllReduce.argtypes[2] is ctypes.c_size_t
    assert lib.ncclGetErrorString.restype is ctypes.c_char_p
    del lib.ncclBroadcast
    with pytest.raises(AttributeError):
        nccl.bind(lib)


# ---- placement ----------------------------------------------------------------------------
def _plan(graph):
    from graphir.passes import run_passes
    from graphir.lowering.triton_gpu.backend import lower

    run_passes(graph)
    return lower(graph).plan.to_json()


def test_placement_of_a_tensor_parallel_plan(interp):
    g, _ = parallel_layer("tp", "default", 2, DType.float32)
    plan = _plan(g)
    vdev, sdev = placement(g, plan)
    assert logical_devices(g) == [0, 1]
    kinds = {s["op"]: sdev[i] for i, s in enumerate(plan["steps"]) if i in sdev}
    assert kinds["allreduce"] == -1
    moved = [sdev[i] for i, s in enumerate(plan["steps"]) if s["op"] == "transfer_to"]
    assert moved and set(moved) == {1}
    devs = {sdev[i] for i, s in enumerate(plan["steps"]) if s["op"] == "flash_attention_ragged"}
    assert devs == {0, 1}
    # A step mixing devices (not a transfer or a collective) is refused.
    s = next(s for s in plan["steps"] if s["op"] == "matmul")
    other = next(v for v, d in vdev.items() if d != vdev[s["inputs"][0]])
    s["inputs"].append(other)
    with pytest.raises(ValueError, match=r"gir.matmul\) reads and writes values on devices"):
        placement(g, plan)


# ---- whole plans on two virtual devices -----------------------------------------------------
@pytest.fixture(scope="module")
def interp():
    """Triton's interpreter for the kernels (decided when the kernels are first imported)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # triton decides interpreted vs compiled when it and the kernels are first imported.
        if "triton" in sys.modules or any(m.startswith("graphir.lowering.triton_gpu") for m in sys.modules):
            pytest.skip("triton was imported in compiled mode in this process; run this file on "
                        "its own (or with tests/lowering/triton_gpu) to use the interpreter")
        os.environ["TRITON_INTERPRET"] = "1"


def _virtual_devices(program):
    from tests.lowering.triton_gpu.test_backend_interp import InterpDevice

    class Owned(InterpDevice):
        """A device that refuses memory of any other device (placement bugs show)."""

        def __init__(self, program, name):
            super().__init__(program)
            self.name, self.mine = name, set()

        def alloc(self, nbytes):
            return self._own(super().alloc(nbytes))

        def upload_new(self, bits):
            return self._own(super().upload_new(bits))

        def _own(self, buf):
            self.mine.add(buf.untyped_storage().data_ptr())
            return buf

        def _check(self, *bufs):
            for b in bufs:
                if hasattr(b, "untyped_storage"):
                    assert b.untyped_storage().data_ptr() in self.mine, \
                        f"device {self.name} touched memory of another device"

        def upload(self, buf, bits):
            self._check(buf)
            super().upload(buf, bits)

        def download(self, buf, nbytes):
            self._check(buf)
            return super().download(buf, nbytes)

        def copy(self, dst, doff, src, soff, nbytes):
            self._check(dst, src)
            super().copy(dst, doff, src, soff, nbytes)

        def launch(self, key, grid, args):
            self._check(*[a[0] for a in args if isinstance(a, tuple)])
            super().launch(key, grid, args)

        def import_tensor(self, obj):
            raise AssertionError("numpy inputs only here")

    return DeviceGroup({0: Owned(program, 0), 1: Owned(program, 1)})


def _executor(g, w):
    from graphir.passes import run_passes
    from graphir.lowering.triton_gpu.backend import lower
    from graphir.runtime.cuda.executor import PlanExecutor

    run_passes(g)
    program = lower(g)
    group = _virtual_devices(program)
    return PlanExecutor(program.plan.to_json(), g, group, w), group


@pytest.mark.parametrize("case,n_kv,fuse", [("bias_qk_norm", 2, True), ("default", 1, False)],
                         ids=["kv_split", "kv_replicated_unfused"])
def test_tensor_parallel_on_virtual_devices(interp, case, n_kv, fuse):
    from graphir.runtime.interpreter import run

    g, w = parallel_layer("tp", case, n_kv, DType.float32, fuse)
    ex, group = _executor(g, w)
    ref = parallel_layer("tp", case, n_kv, DType.float32, fuse)[0]
    want, wb = run_tp(lambda *a: run(ref, *a, weights=w), DType.float32, n_kv,
                      schedule=[([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1])])
    got, gb = run_tp(lambda *a: ex.execute(*a), DType.float32, n_kv,
                     schedule=[([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1])])
    for ys, refs in zip(got, want):
        for y, r in zip(ys, refs):
            np.testing.assert_allclose(y, r, rtol=1e-5, atol=1e-5)
    for a, b in zip(gb, wb):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Each device ran its half of the heads with its own kernels.
    assert [len(d.launched) for d in group.members.values()] == [len(group.members[0].launched)] * 2
    assert group.members[0].launched


def test_data_parallel_with_an_empty_slice_on_virtual_devices(interp):
    from graphir.runtime.interpreter import run

    g, w = parallel_layer("dp", "default", 2, DType.float32)
    ex, group = _executor(g, w)
    ref = parallel_layer("dp", "default", 2, DType.float32)[0]
    sched = [([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1]), ([0, 1], [1, 2])]
    want, wb = run_dp(lambda *a: run(ref, *a, weights=w), DType.float32, 2, schedule=sched)
    got, gb = run_dp(lambda *a: ex.execute(*a), DType.float32, 2, schedule=sched)
    for y, r in zip(got, want):
        np.testing.assert_allclose(y, r, rtol=1e-5, atol=1e-5)
    for a, b in zip(gb, wb):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert group.members[0].launched and group.members[1].launched


@pytest.mark.parametrize("kind,shapes,axis", [
    ("allreduce", [(5, 6), (5, 6)], 0), ("allgather", [(2, 6), (3, 6)], 0),
    ("allgather", [(4, 3, 5), (4, 2, 5)], 1), ("allgather", [(3, 2), (3, 4)], -1)])
def test_collectives_on_virtual_devices(interp, kind, shapes, axis):
    from graphir.runtime.interpreter import run

    g = collective_graph(kind, DType.bfloat16, shapes, axis)
    ex, _ = _executor(g, {})
    assert [s["kernel"] for s in ex.steps if s["op"] == kind] == ["collective"]
    rng = np.random.default_rng(2)
    from graphir.dtype import round_to

    xs = [round_to(rng.standard_normal(s), DType.bfloat16) for s in shapes]
    want = run(collective_graph(kind, DType.bfloat16, shapes, axis), *xs)
    got = ex.execute(*xs)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_a_device_the_executor_lacks_is_named(interp):
    from graphir.lowering.triton_gpu.backend import lower
    from graphir.runtime.cuda.executor import PlanExecutor
    from tests.lowering.triton_gpu.test_backend_interp import InterpDevice

    g = collective_graph("allreduce", DType.float32, [(2, 2)] * 3)
    program = lower(g)
    with pytest.raises(ValueError, match=r"uses device 2, which this executor was not given"):
        PlanExecutor(program.plan.to_json(), g, DeviceGroup({0: InterpDevice(program),
                                                             1: InterpDevice(program)}), {})


def test_load_refuses_a_graph_for_more_gpus_than_the_machine_has(interp, monkeypatch, tmp_path):
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import driver, executor

    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))
    g = collective_graph("allreduce", DType.float32, [(2, 2)] * 2)
    art = compile_graph(g, "cuda:sm_90")
    monkeypatch.setattr(driver, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"needs GPUs \[0, 1\].*this machine has 1 CUDA device"):
        executor.load(art, {})
    with pytest.raises(ValueError, match=r"runs on 2 devices \(ids \[0, 1\]\); load was given 1"):
        executor.load(art, {}, devices=[DeviceRef.GPU(0)])
