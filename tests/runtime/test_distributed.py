"""The pieces of one-process-per-device execution that need no launcher: the launcher's
environment, splitting a multi-device graph per rank, the world_size collectives, rank graphs
compiled for the CPU and run against each other in threads (allgather on an inner axis and
allreduce, against the interpreter), the weight shard read from safetensors, and the watchdog."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from graphir import DeviceRef, DType, Graph, TensorType, ops
from graphir.runtime.distributed import DistributedConfig
from graphir.runtime.distributed_split import SplitError, rank_devices, split_graph, split_rank


# ---- the launcher's environment ----------------------------------------------------------------
def test_config_from_env_reads_the_launcher_and_names_what_is_missing():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3",
           "MASTER_PORT": "29400", "GRAPHIR_DIST_TIMEOUT": "45"}
    cfg = DistributedConfig.from_env(env)
    assert (cfg.rank, cfg.world_size, cfg.local_rank, cfg.master_addr, cfg.master_port,
            cfg.timeout_s) == (1, 4, 1, "10.1.2.3", 29400, 45.0)
    assert DistributedConfig.from_env(env, timeout_s=5, check_calls=False).timeout_s == 5
    with pytest.raises(ValueError, match="RANK is not set; start the processes with a launcher"):
        DistributedConfig.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="GRAPHIR_DIST_TIMEOUT='soon' is not a number"):
        DistributedConfig.from_env(dict(env, GRAPHIR_DIST_TIMEOUT="soon"))
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        DistributedConfig.from_env(dict(env, WORLD_SIZE="two"))
    with pytest.raises(ValueError, match=r"rank 4 is not in \[0, world_size 4\)"):
        DistributedConfig.from_env(dict(env, RANK="4"))
    with pytest.raises(ValueError, match="heartbeat_s must be in"):
        DistributedConfig(rank=0, world_size=1, timeout_s=5, heartbeat_s=9)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        DistributedConfig(rank=0, world_size=1, timeout_s=0)


# ---- splitting ---------------------------------------------------------------------------------
def _tp():
    from tests.nn.test_parallel import cpus, make, tp_graph
    from graphir.nn import TensorParallelAttentionWithRope

    devs = cpus(2)
    rope, kvp, tp = make(TensorParallelAttentionWithRope, 2, devs, has_bias=True)
    return tp_graph(tp, rope, kvp, devs), tp


def test_split_of_a_tensor_parallel_layer():
    g, tp = _tp()
    ranks = split_graph(g)
    assert [r.device for r in ranks] == [DeviceRef.CPU(0), DeviceRef.CPU(1)]
    # x and the offsets (on cpu:0, moved to each device) are given to each rank; the unread
    # max_lengths inputs are dropped.
    assert [r.inputs for r in ranks] == [[0, 1, 2, 3, 4], [0, 1, 6, 7, 8]]
    assert [r.outputs for r in ranks] == [[0], [1]]
    assert ranks[1].weights == sorted(k for k in tp.raw_state_dict() if k.endswith("[1]"))
    assert ranks[0].collectives == [{"op": "allreduce", "dtype": "f32", "axis": 0,
                                     "shape": ["total_seq_len", "64"]}]
    r1 = ranks[1].graph
    assert all(t.type.device == DeviceRef.CPU(1) for t in r1.inputs)
    ar = [n for n in r1.nodes if n.op == "allreduce"]
    assert len(ar) == 1 and ar[0].attrs["world_size"] == 2 and len(ar[0].operands) == 1
    # The RoPE table (constants only) is recomputed on cpu:1 instead of moved from cpu:0.
    assert {r.type.device for n in r1.nodes for r in n.results if hasattr(r.type, "device")} \
        == {DeviceRef.CPU(1)}
    assert "gir.allreduce" in str(r1) and "world_size = 2" in str(r1)
    assert split_rank(g, 1).inputs == ranks[1].inputs
    with pytest.raises(ValueError, match="runs on 2 devices .* there is no rank 2"):
        split_rank(g, 2)


def test_split_refuses_values_that_would_move_between_processes():
    devs = [DeviceRef.CPU(0), DeviceRef.CPU(1)]
    with Graph("moves", input_types=[TensorType(DType.float32, [4, 4], devs[0]),
                                     TensorType(DType.float32, [4, 4], devs[1])]) as g:
        a, b = g.inputs
        y = ops.transfer_to(a * 2.0, devs[1])   # computed from an input on cpu:0
        g.output(y + b)
    with pytest.raises(SplitError, match=r"gir.mul.* computes on cpu:0 a value that device cpu:1 "
                                         r"reads .* only through allreduce / allgather"):
        split_graph(g)
    devs3 = devs + [DeviceRef.CPU(2)]
    with Graph("partial", input_types=[TensorType(DType.float32, [4], d) for d in devs3]) as g:
        g.output(*ops.allreduce(g.inputs[:2]), g.inputs[2])
    with pytest.raises(SplitError, match=r"spans devices \['cpu:0', 'cpu:1'\]; across processes "
                                         r"a collective must span every device"):
        split_graph(g)


def test_split_of_a_gpu_graph_floats_cpu_values_to_the_ranks_reading_them():
    gpus = [DeviceRef.GPU(0), DeviceRef.GPU(1)]
    with Graph("float", input_types=[TensorType(DType.float32, ["n", 4], DeviceRef.CPU()),
                                     TensorType(DType.float32, [4, 4], gpus[0]),
                                     TensorType(DType.float32, [4, 4], gpus[1])]) as g:
        x = g.inputs[0]
        ys = [ops.matmul(ops.transfer_to(x, d), w) for d, w in zip(gpus, g.inputs[1:])]
        g.output(*ops.allgather(ys, axis=1))
    assert rank_devices(g) == gpus
    ranks = split_graph(g)
    assert [r.inputs for r in ranks] == [[0, 1], [0, 2]]
    assert ranks[1].graph.inputs[0].type.device == DeviceRef.CPU()   # kept on the host
    (gather,) = [n for n in ranks[1].graph.nodes if n.op == "allgather"]
    assert [str(d) for d in gather.results[0].type.shape] == ["n", "8"]


def test_world_size_collectives_type_and_refuse_to_run_in_one_process():
    from graphir.runtime.interpreter import InterpreterError, run

    d = DeviceRef.CPU(1)
    with Graph("part", input_types=[TensorType(DType.float32, ["n", 3], d)]) as g:
        (y,) = g.apply("allgather", [g.inputs[0]], {"axis": 1, "world_size": 4})
        (z,) = g.apply("allreduce", [y], {"world_size": 4})
        g.output(z)
    assert [str(s) for s in z.type.shape] == ["n", "12"] and z.type.device == d
    with pytest.raises(InterpreterError, match="one process's part of a collective over "
                                               "several processes; run it with graphir.runtime"
                                               ".distributed"):
        run(g, np.ones((2, 3), np.float32))
    with Graph("bad", input_types=[TensorType(DType.float32, [3], DeviceRef.CPU(i))
                                   for i in range(2)]) as g:
        with pytest.raises(ValueError, match=r"allreduce with world_size .* takes one tensor, "
                                             r"got 2"):
            g.apply("allreduce", list(g.inputs), {"world_size": 2})
        with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
            g.apply("allreduce", [g.inputs[0]], {"world_size": 0})


# ---- rank graphs on the CPU, ranks as threads ------------------------------------------------------
class ThreadGroup:
    """Collectives between threads standing in for processes (what a RankContext provides)."""

    def __init__(self, n: int):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n, timeout=60)

    def member(self, rank: int):
        group = self

        class Member:
            def _exchange(self, x):
                group.slots[rank] = x
                group.barrier.wait()
                got = list(group.slots)
                group.barrier.wait()
                return got

            def all_reduce(self, x):
                parts = self._exchange(x)
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
                return total

            def all_gather(self, x, axis=0):
                return np.concatenate(self._exchange(x), axis=axis)
        return Member()


def run_ranks(fns):
    """Run fns[r]() in one thread per rank; their results in rank order (errors re-raised)."""
    out, errs = [None] * len(fns), []

    def body(r):
        try:
            out[r] = fns[r]()
        except BaseException as e:  # noqa: BLE001
            errs.append(e)
    ts = [threading.Thread(target=body, args=(r,)) for r in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    if errs:
        raise errs[0]
    return out


def test_cpu_rank_graphs_run_against_each_other_like_the_whole_graph():
    pytest.importorskip("mlir.ir")
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cpu_executor import CpuModel
    from graphir.runtime.interpreter import run
    from graphir.weight import Weight

    devs = [DeviceRef.CPU(0), DeviceRef.CPU(1)]
    with Graph("cols", input_types=[TensorType(DType.float32, ["n", 8], d) for d in devs]) as g:
        ys = [ops.matmul(x, g.add_weight(Weight(f"w[{i}]", DType.float32, [8, 3], d)))
              for i, (x, d) in enumerate(zip(g.inputs, devs))]
        gathered = ops.allgather(ys, axis=1)            # [n, 6] on each device
        g.output(*ops.allreduce([gathered[0] * 2.0, gathered[1]]))
    rng = np.random.default_rng(11)
    w = {f"w[{i}]": rng.standard_normal((8, 3)).astype(np.float32) for i in range(2)}
    xs = [rng.standard_normal((5, 8)).astype(np.float32) for _ in range(2)]
    want = run(g, *xs, weights=w)
    ranks = split_graph(g)
    arts = [compile_graph(r.graph, "cpu") for r in ranks]
    group = ThreadGroup(2)
    models = [CpuModel(a, {k: w[k] for k in r.weights}, group.member(r.rank))
              for a, r in zip(arts, ranks)]
    got = run_ranks([lambda m=m, r=r: m.execute(*[xs[i] for i in r.inputs])
                     for m, r in zip(models, ranks)])
    for r, (y,) in zip(ranks, got):
        np.testing.assert_allclose(y, want[r.outputs[0]], rtol=1e-6, atol=1e-6)
    # Outside a job the rank artifact says how it must be run, instead of computing a part.
    alone = CpuModel(arts[0], {"w[0]": w["w[0]"]})
    with pytest.raises(RuntimeError, match=r"gir.allgather \{world_size = 2\} is one process's "
                                           r"part .* load the artifact through graphir.runtime"
                                           r".distributed"):
        alone.execute(xs[0])


def test_rank_weights_reads_only_the_shard(tmp_path):
    from safetensors.numpy import save_file

    from graphir.runtime.distributed_model import rank_weights

    rng = np.random.default_rng(2)
    full = {f"w[{i}]": rng.standard_normal((3, 2)).astype(np.float32) for i in range(3)}
    save_file(full, str(tmp_path / "w.safetensors"))
    got = rank_weights(tmp_path / "w.safetensors", ["w[1]", "w[2]", "absent"])
    assert sorted(got) == ["w[1]", "w[2]"]
    np.testing.assert_array_equal(got["w[2]"], full["w[2]"])
    assert sorted(rank_weights(full, ["w[0]"])) == ["w[0]"] and rank_weights(None, ["w"]) == {}


# ---- the watchdog --------------------------------------------------------------------------------
class FakeStore:
    def __init__(self):
        self.kv, self.broken = {}, False

    def add(self, key, n):
        if self.broken:
            raise RuntimeError("Connection reset by peer")
        self.kv[key] = self.kv.get(key, 0) + n
        return self.kv[key]


class FakeCtx:
    def __init__(self, rank=0, world=3, timeout=10.0):
        self.rank, self.world_size = rank, world
        self.config = DistributedConfig(rank=rank, world_size=world, timeout_s=timeout)
        self.failed, self.aborted = None, 0

    def fail(self, msg):
        self.failed = self.failed or msg
        self.aborted += 1


def test_watchdog_sees_a_silent_peer_a_lost_store_and_ignores_a_closed_one():
    from graphir.runtime.distributed_watchdog import Watchdog

    store, ctx = FakeStore(), FakeCtx()
    wd = Watchdog(ctx, store, period=1.0, exit_on_failure=False)
    assert wd.check_once(now=0.0) is None and store.kv["hb/0"] == 1
    store.add("hb/1", 1)
    store.add("closed/2", 1)          # rank 2 left through close(): its silence is expected
    assert wd.check_once(now=8.0) is None
    store.add("hb/1", 1)              # rank 1 beats, then stops
    assert wd.check_once(now=9.0) is None
    assert wd.check_once(now=18.0) is None
    msg = wd.check_once(now=19.5)
    assert msg.startswith("graphir.distributed: rank 1 of 3 stopped answering: no heartbeat "
                          "for 10.5 s (timeout 10 s)")
    store.broken = True
    assert "lost the job's store (RuntimeError: Connection reset by peer)" in wd.check_once()
    # The thread: a failure is reported to the context (which aborts the communicators).
    ctx2 = FakeCtx(world=2, timeout=0.3)
    wd2 = Watchdog(ctx2, FakeStore(), period=0.05, exit_on_failure=False)
    wd2.start()
    wd2.join(timeout=5)
    assert not wd2.is_alive() and ctx2.aborted == 1 and "rank 1 of 2 stopped answering" in ctx2.failed
