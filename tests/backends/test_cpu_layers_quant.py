"""Quantized and latent attention layers compiled for the CPU match the interpreter step by step:
GGUFQAttentionWithRope (several encodings), GPTQAttentionWithRope and LatentAttentionWithRope
(graph_mode auto: one mla_attention op whose kernel takes the decompressed form for the prefills
and the absorbed one for the decode steps) over the paged cache, through a ragged prefill,
decode steps and a mixed chunk (tests/nn/harness.py's SCHEDULE). Outputs and the whole cache
must agree after every step; the cache layer the layer does not own must stay untouched."""
import copy

import numpy as np
import pytest

from graphir.runtime.interpreter import run
from tests.nn.harness import LAYER, SCHEDULE, layer_graph

from .harness import execute  # noqa: F401  (skips without MLIR through pytest.importorskip)

pytest.importorskip("mlir.ir")


def _run_schedule(graph, weights, manager, hidden: int, seed: int, tol: float):
    from graphir.runtime.session import InferenceSession

    model = InferenceSession().load(graph, weights=weights)
    m_cpu, m_ref = manager(), manager()
    untouched = m_cpu.blocks[:, :, 1 - LAYER].copy()
    rng = np.random.default_rng(seed)
    for seqs, counts in SCHEDULE:
        x = rng.standard_normal((sum(counts), hidden)).astype(np.float32)
        outs = []
        for m, fn in ((m_cpu, model.execute), (m_ref, lambda *a: run(graph, *a, weights=weights))):
            st = m.prepare_step(seqs, counts)
            (y,) = fn(x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                      st.max_lengths)
            m.commit_step(st)
            outs.append(y)
        scale = max(1.0, float(np.abs(outs[1]).max()))
        np.testing.assert_allclose(outs[0], outs[1], rtol=tol, atol=tol * scale)
        np.testing.assert_allclose(m_cpu.blocks, m_ref.blocks, rtol=tol, atol=tol)
    assert np.array_equal(m_cpu.blocks[:, :, 1 - LAYER], untouched)


@pytest.mark.parametrize("enc", ["Q4_K", "Q8_0", "Q6_K", "Q5_1", "Q3_K"])
def test_gguf_attention_layer(enc):
    from tests.nn import gguf_layer as tg

    rope, kvp, quant = tg.random_layer(enc)
    g = layer_graph(quant, rope, kvp)
    assert "gir.qmatmul" in str(g)
    _run_schedule(g, quant.state_dict(), tg.kv_manager, tg.HIDDEN, 2, 1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_attention_layer(bits):
    from tests.nn import test_gptq_attention as tq

    rope, kvp, quant = tq.loaded_layer(sym=False, desc_act=True, bits=bits)
    g = layer_graph(quant, rope, kvp)
    assert str(g).count("gir.qmatmul") == 2
    _run_schedule(g, quant.state_dict(), tq.kv_manager, tq.HIDDEN, 3 + bits, 1e-4)


@pytest.mark.parametrize("q_lora", [None, 24])
def test_latent_attention_layer(q_lora):
    from tests.nn import test_mla as tm

    rope, kvp, attn = tm.make_layer(q_lora=q_lora)
    w = tm.random_weights(attn, 7)
    g = layer_graph(attn, rope, kvp, layer=LAYER)
    text = str(g)
    # auto: one op, whose kernel runs the absorbed form for the decode steps of the schedule and
    # the decompressed one for its prefills.
    assert text.count("gir.mla_attention") == 1
    assert "gir.mla_prefill(" not in text and "gir.mla_decode" not in text
    _run_schedule(g, copy.deepcopy(w), tm.manager, tm.HIDDEN, 4, 1e-4)
