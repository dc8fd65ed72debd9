"""The GPU side of one process per device, without a GPU: the NCCL communicator of one rank
(ncclGetUniqueId on rank 0, the id through a store, ncclCommInitRank) against a recording fake
libnccl; the rank's device group; and tensor-parallel rank graphs lowered for cuda and run by
PlanExecutor under Triton's interpreter, one thread per rank with their collectives between the
threads, against the reference interpreter of the whole graph."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from graphir import DType
from graphir.runtime.cuda import nccl
from tests.runtime.fake_nccl import UID, FakeNccl

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")
class DictStore:
    """set / get with get waiting for the key, like torch.distributed's TCPStore."""

    def __init__(self):
        self.kv, self.cv = {}, threading.Condition()

    def set(self, key, value):
        with self.cv:
            self.kv[key] = bytes(value)
            self.cv.notify_all()

    def get(self, key):
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.kv, timeout=30):
                raise TimeoutError(f"no key {key}")
            return self.kv[key]


def test_bootstrap_shares_rank_0s_unique_id_through_the_store():
    store, libs, comms = DictStore(), [FakeNccl(), FakeNccl()], [None, None]

    def rank(r):
        comms[r] = nccl.RankCommunicator.bootstrap(store, 2, r, key="k", lib=libs[r])
    ts = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]   # rank 1 waits for 0
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    assert store.kv["k"] == UID
    assert [n for n, _ in libs[0].plain()] == ["ncclGetUniqueId", "ncclCommInitRank"]
    assert libs[1].plain() == [("ncclCommInitRank", [UID, 2, 1])]
    assert libs[0].plain()[1] == ("ncclCommInitRank", [UID, 2, 0])
    assert [c._comm.value for c in comms] == [0x100, 0x101]


def test_rank_collectives_abort_and_errors():
    lib = FakeNccl()
    comm = nccl.RankCommunicator(UID, 4, 2, lib=lib)
    lib.calls.clear()
    comm.all_reduce(0x10, 0x20, 96, DType.bfloat16, 7)
    comm.all_gather(0x30, 0x40, 5, "float8_e4m3fn", 9)   # moved as bytes
    assert lib.plain() == [("ncclAllReduce", [0x10, 0x20, 96, 9, 0, 0x102, 7]),
                         ("ncclAllGather", [0x30, 0x40, 5, 1, 0x102, 9])]
    assert comm.async_error() == 0
    comm.abort()
    assert lib.plain()[-1] == ("ncclCommAbort", [0x102])
    with pytest.raises(ValueError, match="all_reduce: the communicator was destroyed or aborted"):
        comm.all_reduce(1, 1, 1, "float32", 0)
    with pytest.raises(ValueError, match="the unique id must be 128 bytes .* got 5"):
        nccl.RankCommunicator(b"short", 2, 0, lib=lib)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, nranks 2\)"):
        nccl.RankCommunicator(UID, 2, 2, lib=lib)
    with pytest.raises(nccl.NcclError, match=r"ncclCommInitRank failed: ncclInvalidArgument \(4\)"
                                             r": invalid argument \(fake\)"):
        nccl.RankCommunicator(UID, 2, 0, lib=FakeNccl(fail="ncclCommInitRank"))
    with pytest.raises(ValueError, match="NCCL cannot reduce float8_e4m3fn"):
        nccl.RankCommunicator(UID, 2, 0, lib=lib).all_reduce(1, 1, 1, "float8_e4m3fn", 0)


def test_rank_device_group_issues_on_the_devices_current_stream():
    from graphir.runtime.distributed_cuda import RankDeviceGroup, check_gathers

    class Dev:
        _cur = 77            # the capture stream, say

    lib = FakeNccl()
    g = RankDeviceGroup({1: Dev()}, nccl.RankCommunicator(UID, 2, 1, lib=lib))
    g.all_reduce([(1, 0x10, 0x20)], 8, DType.float32)
    g.all_gather([(1, 0x30, 0x40)], [3], DType.float16)
    assert lib.plain()[-2:] == [("ncclAllReduce", [0x10, 0x20, 8, 7, 0, 0x101, 77]),
                              ("ncclAllGather", [0x30, 0x40, 3, 6, 0x101, 77])]
    with pytest.raises(ValueError, match="only through collectives"):
        g.transfer(0, None, 0, 1, None, 0, 4)
    with pytest.raises(ValueError, match="a rank runs one device"):
        RankDeviceGroup({0: Dev(), 1: Dev()}, None)
    plan = {"values": [{"shape": ["n", "4"]}, {"shape": ["n", "8"]}],
            "steps": [{"kernel": "collective", "op": "allgather", "inputs": [0], "outputs": [1],
                       "attrs": {"axis": 1}}]}
    with pytest.raises(ValueError, match=r"allgather across processes on axis 1 of \['n', '8'\] "
                                         r"is not supported on GPUs"):
        check_gathers(plan)
    plan["steps"][0]["attrs"]["axis"] = 0
    check_gathers(plan)


# ---- rank graphs through PlanExecutor, under Triton's interpreter --------------------------------
@pytest.fixture(scope="module")
def interp():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules or any(m.startswith("graphir.lowering.triton_gpu")
                                          for m in sys.modules):
            pytest.skip("triton was imported in compiled mode in this process; run this file "
                        "on its own to use the interpreter")
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")


class ThreadComm:
    """NCCL's role between threads: buffers are the interpreter device's byte tensors."""

    def __init__(self, n):
        self.slots, self.barrier = [None] * n, threading.Barrier(n, timeout=120)

    def rank(self, r):
        comm = self

        class Rank:
            def _swap(self, x):
                comm.slots[r] = x
                comm.barrier.wait()
                got = list(comm.slots)
                comm.barrier.wait()
                return got

            def all_reduce(self, src, dst, count, dtype, stream):
                dt = np.dtype(dtype)
                mine = src[:count * dt.itemsize].numpy().view(dt).astype(np.float64)
                total = sum(self._swap(mine)).astype(dt)
                dst[:total.nbytes].copy_(__import__("torch").from_numpy(total.view(np.uint8)))

            def all_gather(self, src, dst, count, dtype, stream):
                raise AssertionError("not used by these graphs")
        return Rank()


_LAUNCH = threading.Lock()   # Triton's interpreter patches modules while a kernel runs


@pytest.mark.parametrize("n_kv", [2, 1], ids=["kv_split", "kv_replicated"])
def test_tensor_parallel_rank_graphs_on_the_cuda_executor(interp, n_kv):
    from graphir.lowering.triton_gpu.backend import lower
    from graphir.passes import run_passes
    from graphir.runtime.cuda.executor import PlanExecutor
    from graphir.runtime.distributed_cuda import RankDeviceGroup
    from graphir.runtime.distributed_split import split_graph
    from graphir.runtime.interpreter import run
    from tests.gpu.test_parallel_gpu import parallel_layer, run_tp
    from tests.lowering.triton_gpu.test_backend_interp import InterpDevice

    class Device(InterpDevice):
        def launch(self, key, grid, args):
            with _LAUNCH:
                super().launch(key, grid, args)

    g, w = parallel_layer("tp", "bias_qk_norm", n_kv, DType.float32)
    ranks, comm, execs = split_graph(g), ThreadComm(2), []
    for r in ranks:
        run_passes(r.graph)
        program = lower(r.graph)
        steps = program.plan.to_json()["steps"]
        assert [s["kernel"] for s in steps if s["op"] == "allreduce"] == ["collective"]
        group = RankDeviceGroup({r.rank: Device(program)}, comm.rank(r.rank))
        execs.append(PlanExecutor(program.plan.to_json(), r.graph, group,
                                  {k: w[k] for k in r.weights}))

    def execute(*args):
        outs, errs = [None, None], []

        def body(k):
            try:
                outs[k] = execs[k].execute(*[args[i] for i in ranks[k].inputs])[0]
            except BaseException as e:  # noqa: BLE001
                errs.append(e)
        ts = [threading.Thread(target=body, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=300)
        if errs:
            raise errs[0]
        return outs

    sched = [([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1])]
    got, gb = run_tp(execute, DType.float32, n_kv, schedule=sched)
    want, wb = run_tp(lambda *a: run(g, *a, weights=w), DType.float32, n_kv, schedule=sched)
    for ys, refs in zip(got, want):
        for y, ref in zip(ys, refs):
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gb, wb):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
