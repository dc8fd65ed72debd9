"""Tensor-parallel (2 and 4 virtual devices, KV heads split or replicated) and data-parallel
attention against the single-device layer, on the interpreter's virtual CPU devices."""
import numpy as np
import pytest

from graphir import DeviceRef, DType, Graph, TensorType
from graphir.nn import (AttentionWithRope, DataParallelAttentionWithRope, KVCacheParams,
                PagedCacheValues, RotaryEmbedding, TensorParallelAttentionWithRope,
                distribute_value)
from graphir.runtime.interpreter import run
from tests.nn.harness import D, HIDDEN, LAYER, LAYERS, NH, PAGE, layer_graph, manager, step

SCHED = [([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1]), ([2, 0], [4, 1])]
BACKENDS = ["interp", "cpu"]


def runner(backend, graph, weights):
    """run(*args) on the interpreter, or on the graph compiled for the CPU (virtual devices and
    collectives in-process), compiled once for all steps."""
    if backend == "interp":
        return lambda *args: run(graph, *args, weights=weights)
    pytest.importorskip("mlir.ir")
    from graphir.runtime.session import InferenceSession

    return InferenceSession().load(graph, weights=weights).execute


def make(cls, n_kv, devices, **opts):
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=False)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=n_kv, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE, devices=tuple(devices))
    attn = cls(rope=rope, num_attention_heads=NH, num_key_value_heads=n_kv, hidden_size=HIDDEN,
               kv_params=kvp, devices=devices, **opts)
    return rope, kvp, attn


def random_state(attn, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in attn.raw_state_dict().items():
        shape = tuple(int(d) for d in w.shape)
        out[name] = (rng.standard_normal(shape) * (0.15 if len(shape) == 2 else 0.5)
                     + (1.0 if "norm" in name else 0.0)).astype(np.float32)
    return out


def cpus(n):
    return [DeviceRef.CPU(i) for i in range(n)]


def tp_graph(tp, rope, kvp, devs):
    nkv_d = kvp.n_kv_heads_per_device
    types = [TensorType(DType.float32, ["total_seq_len", HIDDEN], devs[0]),
             TensorType(DType.uint32, ["batch + 1"], devs[0])]
    for i, d in enumerate(devs):
        types += kvp.input_types(d, suffix=f"_{i}", n_kv_heads=nkv_d)
    with Graph("tp", input_types=types) as g:
        x, offs = g.inputs[:2]
        kvs = [PagedCacheValues(*g.inputs[2 + 4 * i: 6 + 4 * i]) for i in range(len(devs))]
        outs = tp(LAYER, distribute_value(x, devs), kvs, distribute_value(rope.freqs_cis, devs),
                  distribute_value(offs, devs))
        g.output(*outs)
    return g


@pytest.mark.parametrize("n_dev, n_kv, opts", [
    (2, 2, dict(has_bias=True, use_qk_norm=True)),                 # one KV head per device
    (4, 2, dict(stacked_qkv=True)),                                # KV heads replicated
    (4, 2, dict(has_bias=True, _fuse_rope_and_store=False)),
    (2, 4, dict(use_qk_norm=True, clip_qkv=0.2)),                  # two KV heads per device
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_matches_single_device(n_dev, n_kv, opts, backend):
    devs = cpus(n_dev)
    rope, kvp1, single = make(AttentionWithRope, n_kv, [devs[0]], **opts)
    rope_tp, kvp, tp = make(TensorParallelAttentionWithRope, n_kv, devs, **opts)
    weights = random_state(single)
    single.load_state_dict(weights)
    tp.load_state_dict(weights)
    g1, gtp = layer_graph(single, rope, kvp1), tp_graph(tp, rope_tp, kvp, devs)
    assert sum(n.op == "allreduce" for n in gtp.nodes) == 1
    m = manager(n_kv_heads=n_kv)
    for _ in range(3):
        m.claim()
    # Device i's cache holds the KV heads its query heads read (replicated when n_dev > n_kv).
    group, nq = NH // n_kv, NH // n_dev
    heads = [sorted({h // group for h in range(i * nq, (i + 1) * nq)}) for i in range(n_dev)]
    dev_blocks = [np.ascontiguousarray(m.blocks[..., hs, :]) for hs in heads]
    assert all(b.shape[4] == kvp.n_kv_heads_per_device for b in dev_blocks)
    rng = np.random.default_rng(3)
    run_tp = runner(backend, gtp, tp.state_dict())
    for seq_ids, counts in SCHED:
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        st = m.prepare_step(seq_ids, counts)
        args = [x, st.input_row_offsets]
        for b in dev_blocks:
            args += [b, st.cache_lengths, st.lookup_table, st.max_lengths]
        outs = run_tp(*args)
        (want,) = run(g1, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                      st.max_lengths, weights=single.state_dict())
        m.commit_step(st)
        assert len(outs) == n_dev
        for y in outs:
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for hs, b in zip(heads, dev_blocks):
        np.testing.assert_allclose(b, m.blocks[..., hs, :], rtol=1e-6, atol=1e-6)


def dp_graph(dp, rope, kvp, devs):
    types = []
    for i, d in enumerate(devs):
        types += [TensorType(DType.float32, [f"total_seq_len_{i}", HIDDEN], d),
                  TensorType(DType.uint32, [f"batch_{i} + 1"], d)]
        types += kvp.input_types(d, suffix=f"_{i}", n_kv_heads=kvp.n_kv_heads)
    with Graph("dp", input_types=types) as g:
        per = [g.inputs[6 * i: 6 * i + 6] for i in range(len(devs))]
        outs = dp(LAYER, [p[0] for p in per], [PagedCacheValues(*p[2:]) for p in per],
                  distribute_value(rope.freqs_cis, devs), [p[1] for p in per])
        g.output(*outs)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_parallel_matches_single_device(backend):
    devs = cpus(2)
    rope, kvp1, single = make(AttentionWithRope, 2, [devs[0]], has_bias=True)
    rope_dp, kvp, dp = make(DataParallelAttentionWithRope, 2, devs, has_bias=True,
                            _fuse_rope_and_store=False)
    weights = random_state(single, seed=5)
    single.load_state_dict(weights)
    dp.load_state_dict(weights)
    g1, gdp = layer_graph(single, rope, kvp1), dp_graph(dp, rope_dp, kvp, devs)
    assert not any(n.op in ("allreduce", "allgather") for n in gdp.nodes)
    m1 = manager()
    ms = [manager(), manager()]
    for _ in range(3):
        m1.claim()
    owner = {0: (0, ms[0].claim()), 1: (0, ms[0].claim()), 2: (1, ms[1].claim())}
    rng = np.random.default_rng(4)
    run_dp = runner(backend, gdp, dp.state_dict())
    sched = SCHED + [([0, 1], [1, 2])]  # the last step leaves device 1 with an empty slice
    for seq_ids, counts in sched:
        rows = {s: rng.standard_normal((n, HIDDEN)).astype(np.float32)
                for s, n in zip(seq_ids, counts)}
        want = step(g1, m1, seq_ids, counts, np.concatenate([rows[s] for s in seq_ids]),
                    single.state_dict())
        args, steps = [], []
        for dev in range(2):
            mine = [s for s in seq_ids if owner[s][0] == dev]
            if mine:
                st = ms[dev].prepare_step([owner[s][1] for s in mine], [len(rows[s]) for s in mine])
                steps.append((ms[dev], st))
                x = np.concatenate([rows[s] for s in mine])
                meta = [st.input_row_offsets, ms[dev].blocks, st.cache_lengths, st.lookup_table,
                        st.max_lengths]
            else:
                x = np.zeros((0, HIDDEN), np.float32)
                meta = [np.zeros(1, np.uint32), ms[dev].blocks, np.zeros(0, np.uint32),
                        np.zeros((0, 1), np.uint32), np.zeros((1, 2), np.uint32)]
            args += [x] + meta
        outs = run_dp(*args)
        for mgr, st in steps:
            mgr.commit_step(st)
        got = {}
        for dev in range(2):
            mine = [s for s in seq_ids if owner[s][0] == dev]
            offs = np.cumsum([0] + [len(rows[s]) for s in mine])
            assert outs[dev].shape == (offs[-1], HIDDEN)
            for k, s in enumerate(mine):
                got[s] = outs[dev][offs[k]:offs[k + 1]]
        np.testing.assert_allclose(np.concatenate([got[s] for s in seq_ids]), want,
                                   rtol=1e-5, atol=1e-5)


def test_tensor_parallel_weight_names_and_slices():
    devs = cpus(2)
    _, _, tp = make(TensorParallelAttentionWithRope, 2, devs)
    w = {k: v for k, v in random_state(tp).items() if "[" not in k}  # not the shards
    tp.load_state_dict(w)
    sd = tp.state_dict()
    np.testing.assert_array_equal(sd["q_proj.weight[1]"], w["q_proj.weight"][2 * D:4 * D])
    np.testing.assert_array_equal(sd["k_proj.weight[0]"], w["k_proj.weight"][:D])
    np.testing.assert_array_equal(sd["o_proj.weight[1]"], w["o_proj.weight"][:, 2 * D:])
    assert tp.list_of_attentions[1].q_proj.weight.device == DeviceRef.CPU(1)
