"""The quantized and latent layers compiled for the GPU (Triton cubins, runtime.cuda) on the GPU:
qmatmul over GGUF weights at a row count of each bucket (the nib GEMV, the warp-MMA kernel, the
tensor-core kernel, the decode
into scratch + the plain matmul) in bf16 against the float64 product of the dequantized
weight; and GGUFQAttentionWithRope, GPTQAttentionWithRope and LatentAttentionWithRope through
a ragged prefill, decode steps and a mixed chunk over the paged cache against the reference
interpreter, the cache blocks updated in place."""

import copy

import numpy as np
import pytest

from tests.gpu.requires import skip_unless_gpu, sm90  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("sm90"),
              pytest.mark.filterwarnings("ignore:Conversion of an array")]
skip_unless_gpu()

from graphir import DType, Graph, TensorType, Weight, ops  # noqa: E402
from graphir.dtype import round_to  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.ops.quant.gguf_quantize import quantize_gguf  # noqa: E402
from graphir.runtime.cuda import executor  # noqa: E402
from tests.gpu.family import rel_err  # noqa: E402
from tests.lowering.triton_gpu.test_quant_layers import run_schedule  # noqa: E402
from tests.nn.harness import LAYER, layer_graph  # noqa: E402


def on_gpu(graph, weights):
    """(executor, None): the run_schedule contract of the interpreter's (executor, device)."""
    return executor.load(compile_graph(graph, "cuda:sm_90"), weights), None


@pytest.mark.parametrize("enc", ["Q4_0", "Q4_K", "Q6_K", "Q8_0"])
def test_qmatmul_every_row_bucket(enc):
    from graphir.ops.quant.gguf_blocks import dequantize_gguf

    n, k = 300, 512
    rng = np.random.default_rng(len(enc))
    raw = quantize_gguf((rng.standard_normal((n, k)) * 0.1).astype(np.float32), enc)
    with Graph("q", input_types=[TensorType(DType.bfloat16, ["T", k])]) as g:
        w = Weight("w", DType.uint8, list(raw.shape))
        g.output(ops.qmatmul(enc, None, g.inputs[0], w))
    model = executor.load(compile_graph(g, "cuda:sm_90"), {"w": raw})
    wt = dequantize_gguf(raw, enc, k).astype(np.float64)
    for m in (1, 2, 3, 6, 8, 10, 16, 40, 300):
        x = round_to(rng.standard_normal((m, k)), DType.bfloat16)
        (y,) = model.execute(x)
        got = np.asarray(y, np.float64)
        assert got.shape == (m, n) and np.isfinite(got).all()
        err = rel_err(got, x.astype(np.float64) @ wt.T)
        assert err <= 1e-2, (m, err)


def test_hand_packed_q4_k_operands_read_supers():
    # nib_matmul written by hand over Q4_K operands whose scales lack the spare-bit copy of
    # d / dmin: the one-row GEMV reads `supers` for them and agrees with the reference.
    from graphir.runtime.interpreter import run
    from tests.lowering.triton_gpu.nib_hand import bare_q4_k

    rng = np.random.default_rng(11)
    k = 1024
    g, weights = bare_q4_k(rng, 300, k)
    model = executor.load(compile_graph(g, "cuda:sm_90"), weights)
    for m in (1, 3):
        x = round_to(rng.standard_normal((m, k)), DType.bfloat16)
        (y,) = model.execute(x)
        err = rel_err(np.asarray(y, np.float64),
                      np.asarray(run(g, x, weights=weights)[0], np.float64))
        assert err <= 1e-2, (m, err)


@pytest.mark.parametrize("enc", ["Q4_K", "Q6_K", "Q5_K"])
def test_gguf_attention_layer(enc):
    from tests.nn import gguf_layer as tg

    rope, kvp, quant = tg.random_layer(enc)
    g = layer_graph(quant, rope, kvp)
    run_schedule(g, quant.state_dict(), tg.kv_manager, tg.HIDDEN, 2, 1e-2, make=on_gpu)


@pytest.mark.parametrize("bits,sym,desc", [(4, True, False), (4, False, True), (8, True, True)])
def test_gptq_attention_layer(bits, sym, desc):
    from tests.nn import test_gptq_attention as tq

    rope, kvp, quant = tq.loaded_layer(sym, desc, bits)
    g = layer_graph(quant, rope, kvp)
    run_schedule(g, quant.state_dict(), tq.kv_manager, tq.HIDDEN, 3, 1e-2, make=on_gpu)


@pytest.mark.parametrize("q_lora", [None, 24])
def test_latent_attention_layer(q_lora):
    from tests.nn import test_mla as tm

    rope, kvp, attn = tm.make_layer(q_lora=q_lora)
    w = tm.random_weights(attn, 7)
    g = layer_graph(attn, rope, kvp, layer=LAYER)
    run_schedule(g, copy.deepcopy(w), tm.manager, tm.HIDDEN, 4, 1e-2, make=on_gpu)
