"""examples/llama_attention.py: the 8B-shaped graph builds; the tiny one runs; both rope/store
forms print identically after the default pass pipeline (the contract with the fusion pass)."""
import numpy as np
import pytest

from graphir.examples.llama_attention import build, build_tiny, random_weights
from graphir import parse
from graphir.passes import PASSES, run_passes
from graphir.runtime.interpreter import run
from graphir.runtime.kv_cache import PagedKVCacheManager
from tests.nn.harness import attention, layer_graph


def test_llama3_8b_graph_shape():
    g = build()
    shapes = {k: v.type.static_shape() for k, v in g.weights.items()}
    assert shapes == {"q_proj.weight": (4096, 4096), "k_proj.weight": (1024, 4096),
                      "v_proj.weight": (1024, 4096), "o_proj.weight": (4096, 4096)}
    assert [str(v.type) for v in g.inputs][2] == \
        "buffer<[total_num_pages, 2, 1, 128, 8, 128], bf16, cpu:0>"
    (rss,) = [n for n in g.nodes if n.op == "rope_split_store"]
    assert rss.attrs == {"head_dim": 128, "n_heads": 32, "n_kv_heads": 8, "interleaved": False,
                         "layer": 0}
    assert str(parse(str(g))) == str(g)


def test_tiny_example_runs_and_both_forms_agree():
    graphs = [build_tiny(), build_tiny(fuse_rope_and_store=False)]
    w = random_weights(graphs[0], seed=1)
    mgrs = [PagedKVCacheManager(num_layers=2, n_kv_heads=2, head_dim=16, page_size=4,
                                total_num_pages=12) for _ in graphs]
    rng = np.random.default_rng(0)
    for counts in ([6, 2], [1, 1], [3, 1]):
        x = rng.standard_normal((sum(counts), 64)).astype(np.float32)
        outs = []
        for g, m in zip(graphs, mgrs):
            ids = list(m.seq_ids) or [m.claim(), m.claim()]
            st = m.prepare_step(ids, counts)
            outs.append(run(g, x, st.input_row_offsets, m.blocks, st.cache_lengths,
                            st.lookup_table, st.max_lengths, weights=w)[0])
            m.commit_step(st)
        np.testing.assert_array_equal(outs[0], outs[1])
        assert np.abs(outs[0]).max() > 0.1
    np.testing.assert_array_equal(mgrs[0].blocks, mgrs[1].blocks)


@pytest.mark.skipif("fuse-rope-split-store" not in PASSES, reason="fusion pass not present")
@pytest.mark.parametrize("opts", [{}, dict(has_bias=True), dict(use_qk_norm=True, clip_qkv=0.5),
                                  dict(stacked_qkv=True)])
def test_both_forms_print_identically_after_the_pipeline(opts):
    printed = []
    for fuse in (True, False):
        rope, kvp, attn = attention(_fuse_rope_and_store=fuse, **opts)
        g = layer_graph(attn, rope, kvp)
        run_passes(g)
        printed.append(str(g))
    assert printed[0] == printed[1]
    assert "gir.rope_split_store" in printed[0] and "gir.rope(" not in printed[0]


def test_gpu_device_refs_run_on_the_interpreter():
    from graphir import DeviceRef

    outs = []
    for dev in (DeviceRef.CPU(), DeviceRef.GPU(0)):
        g = build_tiny(device=dev)
        assert str(g.inputs[0].type).endswith(f"{dev}>")
        m = PagedKVCacheManager(num_layers=2, n_kv_heads=2, head_dim=16, page_size=4,
                                total_num_pages=4)
        st = m.prepare_step([m.claim()], [5])
        x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
        outs.append(run(g, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                        st.max_lengths, weights=random_weights(g, seed=3))[0])
    np.testing.assert_array_equal(outs[0], outs[1])
