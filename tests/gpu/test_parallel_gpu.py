"""Multi-device graphs on two GPUs: TensorParallel and DataParallel AttentionWithRope compiled
for cuda (one graph over gpu:0 and gpu:1; transfer_to as peer copies, allreduce through NCCL)
match the reference interpreter in bf16 (norm-relative error <= 2e-2) through a ragged prefill,
decode steps and a chunked prefill over per-device paged caches; collectives (allreduce in
bf16/f16/f32, allgather on axis 0 with equal and unequal pieces, on an inner axis) match exactly.

The builders here (`parallel_layer`, `run_tp`, `run_dp`, `collective_graph`) are importable
without a GPU: tests/runtime/cuda/test_nccl_cpu.py runs the same plans under Triton's interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest

from graphir import DeviceRef, DType, Graph, TensorType
from graphir.dtype import round_to
from graphir.nn import (DataParallelAttentionWithRope, KVCacheParams, PagedCacheValues,
                RotaryEmbedding, TensorParallelAttentionWithRope, distribute_value)
from graphir.runtime.kv_cache import PagedKVCacheManager
from tests.gpu import family
from tests.gpu.family import D, HIDDEN, LAYER, LAYERS, NH, PAGE, rel_err
from tests.gpu.requires import skip_unless_gpu

TOL = 2e-2
CASES = {"default": {}, "bias_qk_norm": {"has_bias": True, "use_qk_norm": True}}
# DP: sequences 0 and 1 live on device 0, sequence 2 on device 1; the last step leaves
# device 1 without rows.
DP_OWNER = {0: 0, 1: 0, 2: 1}
DP_SCHEDULE = family.SCHEDULE + [([0, 1], [1, 2])]


def gpus(n: int = 2) -> list[DeviceRef]:
    return [DeviceRef.GPU(i) for i in range(n)]


def parallel_layer(kind: str, case: str, n_kv: int, dtype: DType, fuse: bool = True,
                   devices=None, seed: int = 0):
    """(graph, weights) of a TP ("tp") or DP ("dp") family layer over `devices`."""
    devs = list(devices or gpus())
    opts = dict(CASES[case], _fuse_rope_and_store=fuse, dtype=dtype, devices=devs)
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=False,
                           device=devs[0])
    kvp = KVCacheParams(dtype=dtype, n_kv_heads=n_kv, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE, devices=tuple(devs))
    cls = TensorParallelAttentionWithRope if kind == "tp" else DataParallelAttentionWithRope
    layer = cls(rope=rope, num_attention_heads=NH, num_key_value_heads=n_kv, hidden_size=HIDDEN,
                kv_params=kvp, **opts)
    types = []
    if kind == "tp":
        types = [TensorType(dtype, ["total_seq_len", HIDDEN], devs[0]),
                 TensorType(DType.uint32, ["batch + 1"], devs[0])]
        for i, d in enumerate(devs):
            types += kvp.input_types(d, suffix=f"_{i}", n_kv_heads=kvp.n_kv_heads_per_device)
    else:
        for i, d in enumerate(devs):
            types += [TensorType(dtype, [f"total_seq_len_{i}", HIDDEN], d),
                      TensorType(DType.uint32, [f"batch_{i} + 1"], d)]
            types += kvp.input_types(d, suffix=f"_{i}", n_kv_heads=n_kv)
    with Graph(f"{kind}_{case}_kv{n_kv}", input_types=types) as g:
        freqs = distribute_value(rope.freqs_cis, devs)
        if kind == "tp":
            x, offs = g.inputs[:2]
            kvs = [PagedCacheValues(*g.inputs[2 + 4 * i: 6 + 4 * i]) for i in range(len(devs))]
            g.output(*layer(LAYER, distribute_value(x, devs), kvs, freqs,
                            distribute_value(offs, devs)))
        else:
            per = [g.inputs[6 * i: 6 * i + 6] for i in range(len(devs))]
            g.output(*layer(LAYER, [p[0] for p in per], [PagedCacheValues(*p[2:]) for p in per],
                            freqs, [p[1] for p in per]))
    return g, family.random_weights(g, seed, False)


def _manager(dtype: DType, n_kv: int, seed: int = 99) -> PagedKVCacheManager:
    m = PagedKVCacheManager(num_layers=LAYERS, n_kv_heads=n_kv, head_dim=D, page_size=PAGE,
                            total_num_pages=24)
    m.blocks[...] = round_to(np.random.default_rng(seed).standard_normal(m.blocks_shape), dtype)
    return m


def tp_heads(n_kv: int, n_dev: int = 2) -> list[list[int]]:
    """The KV heads each device's cache holds (replicated when n_dev > n_kv)."""
    group, nq = NH // n_kv, NH // n_dev
    return [sorted({h // group for h in range(i * nq, (i + 1) * nq)}) for i in range(n_dev)]


def run_tp(execute, dtype: DType, n_kv: int, seed: int = 1, schedule=family.SCHEDULE):
    """Step `execute(*inputs) -> [y per device]` through the schedule; (outputs, blocks)."""
    m = _manager(dtype, n_kv)
    for _ in family.PREFILL:
        m.claim()
    blocks = [np.ascontiguousarray(m.blocks[..., hs, :]) for hs in tp_heads(n_kv)]
    rng = np.random.default_rng(seed)
    outs = []
    for ids, counts in schedule:
        x = round_to(rng.standard_normal((sum(counts), HIDDEN)), dtype)
        st = m.prepare_step(ids, counts)
        args = [x, st.input_row_offsets]
        for b in blocks:
            args += [b, st.cache_lengths, st.lookup_table, st.max_lengths]
        outs.append([np.asarray(y) for y in execute(*args)])
        m.commit_step(st)
    return outs, blocks


def run_dp(execute, dtype: DType, n_kv: int, seed: int = 1, schedule=DP_SCHEDULE):
    """Like run_tp for DP: each device runs its own sequences on its own cache; the outputs
    are the rows of every step in the schedule's sequence order."""
    ms = [_manager(dtype, n_kv, 99 + i) for i in range(2)]
    local = {s: ms[d].claim() for s, d in DP_OWNER.items()}
    rng = np.random.default_rng(seed)
    outs = []
    for ids, counts in schedule:
        rows = {s: round_to(rng.standard_normal((n, HIDDEN)), dtype) for s, n in zip(ids, counts)}
        args, steps, mine_all = [], [], []
        for dev in range(2):
            mine = [s for s in ids if DP_OWNER[s] == dev]
            mine_all.append(mine)
            if mine:
                st = ms[dev].prepare_step([local[s] for s in mine], [len(rows[s]) for s in mine])
                steps.append((ms[dev], st))
                meta = [st.input_row_offsets, ms[dev].blocks, st.cache_lengths, st.lookup_table,
                        st.max_lengths]
                x = np.concatenate([rows[s] for s in mine])
            else:
                x = np.zeros((0, HIDDEN), np.float32)
                meta = [np.zeros(1, np.uint32), ms[dev].blocks, np.zeros(0, np.uint32),
                        np.zeros((0, 1), np.uint32), np.zeros((1, 2), np.uint32)]
            args += [x] + meta
        ys = [np.asarray(y) for y in execute(*args)]
        for mgr, st in steps:
            mgr.commit_step(st)
        got = {}
        for dev, mine in enumerate(mine_all):
            offs = np.cumsum([0] + [len(rows[s]) for s in mine])
            assert ys[dev].shape == (offs[-1], HIDDEN)
            for k, s in enumerate(mine):
                got[s] = ys[dev][offs[k]:offs[k + 1]]
        outs.append(np.concatenate([got[s] for s in ids]))
    return outs, [m.blocks for m in ms]


def collective_graph(kind: str, dtype: DType, shapes, axis: int = 0, devices=None):
    """allreduce / allgather of one input per device, plus a transfer of input 0 to device 1."""
    devs = list(devices or gpus(len(shapes)))
    from graphir import ops

    types = [TensorType(dtype, list(s), d) for s, d in zip(shapes, devs)]
    with Graph(f"{kind}_{dtype.short}", input_types=types) as g:
        xs = list(g.inputs)
        outs = ops.allreduce(xs) if kind == "allreduce" else ops.allgather(xs, axis=axis)
        g.output(*outs, ops.transfer_to(xs[0], devs[-1]))
    return g


# ------------------------------------------------------------------------------------ GPU
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def two_gpus():
    skip_unless_gpu()
    from graphir.runtime.cuda import driver

    if driver.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {driver.device_count()}")
    for i in range(2):
        p = driver.device_properties(i)
        if p.compute_capability != (9, 0):
            pytest.skip(f"the cubins are built for sm_90; GPU {i} is {p.name}")
    from graphir.runtime.cuda import nccl

    if not nccl.is_available():
        pytest.fail(f"NCCL is missing on a 2-GPU machine: {nccl.candidates()}")


def _compiled(build, **load_opts):
    from graphir.passes import run_passes
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import executor

    g, w = build()
    model = executor.load(compile_graph(g, "cuda:sm_90"), w, **load_opts)
    ref = build()[0]
    run_passes(ref)
    return model, ref, w


@pytest.mark.parametrize("case,n_kv", [("default", 2), ("bias_qk_norm", 2), ("default", 1)],
                         ids=["default", "bias_qk_norm", "gqa_kv_replicated"])
def test_tensor_parallel_on_two_gpus(two_gpus, case, n_kv):
    from graphir.runtime.interpreter import run

    model, ref, w = _compiled(lambda: parallel_layer("tp", case, n_kv, DType.bfloat16))
    assert sum(s["kernel"] == "collective" for s in model.executor.steps) == 1
    want, wb = run_tp(lambda *a: run(ref, *a, weights=w), DType.bfloat16, n_kv)
    got, gb = run_tp(lambda *a: model.execute(*a), DType.bfloat16, n_kv)
    for step, (ys, refs) in enumerate(zip(got, want)):
        for dev, (y, r) in enumerate(zip(ys, refs)):
            assert np.isfinite(y).all() and rel_err(y, r) <= TOL, (step, dev, rel_err(y, r))
        np.testing.assert_array_equal(ys[0], ys[1])  # one all-reduced sum on both GPUs
    for a, b in zip(gb, wb):
        assert rel_err(a, b) <= TOL
        np.testing.assert_array_equal(a[:, :, 0], b[:, :, 0])  # layer 0 untouched


@pytest.mark.parametrize("case,n_kv", [("default", 2), ("bias_qk_norm", 2), ("default", 1)],
                         ids=["default", "bias_qk_norm", "mqa"])
def test_data_parallel_on_two_gpus(two_gpus, case, n_kv):
    from graphir.runtime.interpreter import run

    model, ref, w = _compiled(lambda: parallel_layer("dp", case, n_kv, DType.bfloat16,
                                                     fuse=case == "default"))
    want, wb = run_dp(lambda *a: run(ref, *a, weights=w), DType.bfloat16, n_kv,
                      schedule=DP_SCHEDULE)
    got, gb = run_dp(lambda *a: model.execute(*a), DType.bfloat16, n_kv, schedule=DP_SCHEDULE)
    for step, (y, r) in enumerate(zip(got, want)):
        assert np.isfinite(y).all() and rel_err(y, r) <= TOL, (step, rel_err(y, r))
    for a, b in zip(gb, wb):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("dtype", [DType.bfloat16, DType.float16, DType.float32])
def test_allreduce_dtypes_and_host_staged_transfer(two_gpus, dtype):
    from graphir.runtime.interpreter import run

    g = lambda: (collective_graph("allreduce", dtype, [(37, 24), (37, 24)]), {})  # noqa: E731
    for peer in ("auto", "host"):
        model, ref, _ = _compiled(g, peer=peer)
        group = model.executor.group
        assert group.peer_enabled(0, 1) is (peer == "auto" and group.peer_enabled(1, 0))
        print(f"peer={peer}: GPU 0 <-> 1 direct access {group.peer_enabled(0, 1)}")
        rng = np.random.default_rng(5)
        xs = [round_to(rng.standard_normal((37, 24)), dtype) for _ in range(2)]
        want = run(ref, *xs)
        got = model.execute(*xs)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-6)
        np.testing.assert_array_equal(got[2], xs[0])  # transfer_to gpu:1 is exact


@pytest.mark.parametrize("shapes,axis", [([(6, 8), (6, 8)], 0), ([(3, 8), (7, 8)], 0),
                                         ([(4, 3, 5), (4, 2, 5)], 1)],
                         ids=["equal", "unequal", "inner_axis"])
def test_allgather(two_gpus, shapes, axis):
    from graphir.runtime.interpreter import run

    model, ref, _ = _compiled(lambda: (collective_graph("allgather", DType.bfloat16, shapes,
                                                        axis), {}))
    rng = np.random.default_rng(6)
    xs = [round_to(rng.standard_normal(s), DType.bfloat16) for s in shapes]
    for a, b in zip(model.execute(*xs), run(ref, *xs)):
        np.testing.assert_array_equal(a, b)


def test_graph_for_more_gpus_than_present_is_a_clear_error(two_gpus):
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import driver, executor

    n = driver.device_count()
    g = collective_graph("allreduce", DType.float32, [(4, 4)] * (n + 1))
    with pytest.raises(ValueError, match=f"this machine has {n} CUDA device"):
        executor.load(compile_graph(g, "cuda:sm_90"), {})
