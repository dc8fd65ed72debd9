"""Quantized attention layers through the whole cuda backend on the CPU: GGUFQAttentionWithRope
(every quantized encoding) and GPTQAttentionWithRope lowered for cuda, their plans run by the
plan runner on torch CPU tensors with the kernels under Triton's interpreter
(test_backend_interp.InterpDevice), step by step through tests/nn/harness.py's SCHEDULE
shortened to STEPS (the ragged prefill, one of its four identical decode steps, the mixed
chunk: the quantized matmuls see every row count the schedule has, at half the interpreter's
time) against the reference interpreter; and no plan has a host step left:
qmatmul runs as kernels."""
import numpy as np
import pytest

from graphir.runtime.interpreter import run
from tests.lowering.triton_gpu.test_backend_interp import interp_executor
from tests.nn.harness import LAYER, SCHEDULE, layer_graph

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")
STEPS = SCHEDULE[:2] + SCHEDULE[-1:]
assert {tuple(c) for _, c in STEPS} == {tuple(c) for _, c in SCHEDULE}


def run_schedule(graph, weights, manager, hidden: int, seed: int, tol: float,
                 make=interp_executor):
    """Drive the layer through STEPS with the plan `make(graph, weights)` gives (default:
    the interpreted cuda plan) and the reference; returns the plan runner (for its steps) and
    the kernels it launched."""
    ex, dev = make(graph, weights)
    m_gpu, m_ref = manager(), manager()
    untouched = m_gpu.blocks[:, :, 1 - LAYER].copy()
    rng = np.random.default_rng(seed)
    for seqs, counts in STEPS:
        x = rng.standard_normal((sum(counts), hidden)).astype(np.float32)
        outs = []
        for m, fn in ((m_gpu, ex.execute), (m_ref, lambda *a: run(graph, *a, weights=weights))):
            st = m.prepare_step(seqs, counts)
            blocks = m.blocks
            (y,) = fn(x, st.input_row_offsets, blocks, st.cache_lengths, st.lookup_table,
                      st.max_lengths)
            m.commit_step(st)
            outs.append(y)
        scale = max(1.0, float(np.abs(outs[1]).max()))
        np.testing.assert_allclose(outs[0], outs[1], rtol=tol, atol=tol * scale)
        np.testing.assert_allclose(m_gpu.blocks, m_ref.blocks, rtol=tol, atol=tol)
    assert np.array_equal(m_gpu.blocks[:, :, 1 - LAYER], untouched)
    return ex, dev


def no_host_steps(ex) -> None:
    kinds = {s["op"]: s["kernel"] for s in ex.steps}
    assert "host_runtime" not in kinds.values(), kinds


# Every encoding's kernels are checked on their own in test_quant_gemv.py / test_quant_gguf.py /
# test_quant_nib*.py; the whole layer (15-40 s each in the interpreter, mostly the split-K
# GEMV's many small programs) runs one of each kind by default (legacy blocks: Q8_0 and 8-bit
# GPTQ; the 4-bit nib layout: Q4_K and asymmetric GPTQ with desc_act; nib with crumbs: Q6_K)
# and the rest with `-m slow`.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("enc", ["Q8_0", "Q4_K", "Q6_K"] + [
    pytest.param(e, marks=_SLOW) for e in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K")])
def test_gguf_attention_layer(enc):
    from tests.nn import gguf_layer as tg

    rope, kvp, quant = tg.random_layer(enc)
    g = layer_graph(quant, rope, kvp)
    ex, dev = run_schedule(g, quant.state_dict(), tg.kv_manager, tg.HIDDEN, 2, 1e-4)
    no_host_steps(ex)
    # 4-bit encodings and Q6_K are repacked at load (nib_repack, a load-time step) for the nib
    # kernels.
    nib = enc in ("Q4_0", "Q4_1", "Q4_K", "Q6_K")
    kernel = f"nib_{enc.lower()}_" if nib else f"gguf_{enc.lower()}_matmul"
    assert any(k.startswith(kernel) for k in dev.launched)
    assert any(s["op"] == "nib_repack" and s["kernel"] == "host" for s in ex.steps) == nib


@pytest.mark.parametrize("bits,sym,desc", [(4, False, True), (8, True, True),
                                           pytest.param(4, True, False, marks=_SLOW)])
def test_gptq_attention_layer(bits, sym, desc):
    from tests.nn import test_gptq_attention as tq

    rope, kvp, quant = tq.loaded_layer(sym, desc, bits)
    g = layer_graph(quant, rope, kvp)
    assert str(g).count("gir.qmatmul") == 2
    ex, dev = run_schedule(g, quant.state_dict(), tq.kv_manager, tq.HIDDEN, 3, 1e-4)
    no_host_steps(ex)
    # 4-bit GPTQ without desc_act takes the nib kernels (repacked at load), the rest their own.
    kernel = "nib_gptq" if bits == 4 and not desc else f"gptq_{bits}b"
    assert sum(k.startswith(kernel) for k in dev.launched) >= 2 * len(STEPS)
