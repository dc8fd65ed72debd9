"""MLA through the whole cuda backend on the CPU: the five MLA ops in one graph, and
LatentAttentionWithRope (graph_mode auto: mla_attention, with and without q LoRA) lowered
for cuda and run by the plan runner with the kernels under Triton's interpreter
(test_backend_interp.InterpDevice), against the reference interpreter; both attention plan
variants (absorbed, decompressed) run; no plan keeps a host step."""
import copy

import numpy as np
import pytest

from graphir import DType, Graph, TensorType, ops
from graphir.lowering.triton_gpu.kernels import mla_decode as md
from graphir.lowering.triton_gpu.lowerings import mla as mla_lowering
from graphir.runtime.interpreter import run
from graphir.types import BufferType
from tests.lowering.triton_gpu.test_backend_interp import interp_executor
from tests.lowering.triton_gpu.test_quant_layers import no_host_steps, run_schedule
from tests.nn.harness import LAYER, LAYERS, PAGE, layer_graph, mla_op_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

NH, NOPE, ROPE, V, R = 3, 8, 6, 5, 16
W = R + ROPE


def op_graph(kinds: int, dt: DType, interleaved: bool) -> Graph:
    u32 = DType.uint32
    types = [TensorType(dt, ["t", NH * (NOPE + ROPE)]), TensorType(dt, ["t", W]),
             TensorType(dt, [R]), TensorType(DType.float32, [64, ROPE]),
             TensorType(u32, ["b + 1"]), TensorType(u32, ["b"]), TensorType(u32, ["b", "p"]),
             BufferType(dt, ["n", kinds, LAYERS, PAGE, 1, W]),
             TensorType(dt, [NH * NOPE, R]), TensorType(dt, [NH, NOPE, R]),
             TensorType(dt, [NH, R, V])]
    with Graph("mla_ops", input_types=types) as g:
        qv, kvv, wn, f, o, c, lt, b, wk, wuk, wuv = g.inputs
        ops.mla_cache_store(kvv, wn, f, o, c, lt, b, kv_lora_rank=R, qk_rope_head_dim=ROPE,
                            layer_idx=LAYER, interleaved=interleaved)
        dims = dict(n_heads=NH, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                    kv_lora_rank=R, layer_idx=LAYER, scale=0.21)
        plan = ops.mla_prefill_plan(o, c)
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=4, **dims),
                 ops.mla_decode(qv, b, o, c, lt, wuk, wuv, **dims), *plan,
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, buffer_size=4, absorb_max=1,
                                   prefill_metadata=plan, **dims))
    return g


@pytest.mark.parametrize("kinds,interleaved,absorb_max,merge", [
    (1, True, 64, "fused"), (2, False, 64, "fused"), (1, False, 2, "fused"),
    (1, True, 64, "split")])
def test_mla_ops_graph(kinds, interleaved, absorb_max, merge, monkeypatch):
    # absorb_max 2: the batch (5 new tokens at most) takes the decompressed variant. merge
    # "split": the plan combines the partials into o_lat, then multiplies by w_uv.
    monkeypatch.setattr(mla_lowering, "ABSORB_MAX", absorb_max)
    monkeypatch.setattr(md, "MERGE", merge)
    rng = np.random.default_rng(kinds + 3 * interleaved)
    inputs = mla_op_inputs(rng, kinds, nh=NH, nope=NOPE, rope=ROPE, v=V, r=R, kv_b_scale=0.3)
    g = op_graph(kinds, DType.float32, interleaved)
    ref_in = copy.deepcopy(inputs)
    want = run(g, *ref_in)
    ex, dev = interp_executor(g, {})
    got = ex.execute(*copy.deepcopy(inputs))
    for i, (a, b) in enumerate(zip(got, want)):
        if b.dtype.kind in "iu":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"output {i}")
    assert got[2].tolist() == [0, 9, 14, 17] and got[4].tolist() == [17]
    no_host_steps(ex)
    want_kernel = "mla_absorbed_fp32" if absorb_max >= 5 else "mla_prefill_attn_fp32"
    assert sum(k.startswith(want_kernel) for k in dev.launched) == 3, dev.launched
    if absorb_max >= 5:
        merged = [k for k in dev.launched if k.startswith(("mla_absorbed_out", "mla_combine",
                                                           "mla_uv"))]
        assert len(merged) == (3 if merge == "fused" else 6), dev.launched


@pytest.mark.parametrize("q_lora,absorb_max", [(None, 64), (24, 64), (None, 4)])
def test_latent_attention_layer(q_lora, absorb_max, monkeypatch):
    # absorb_max 4: the 9- and 6-token chunks decompress, the decode steps stay absorbed.
    from tests.nn import test_mla as tm

    monkeypatch.setattr(mla_lowering, "ABSORB_MAX", absorb_max)
    rope, kvp, attn = tm.make_layer(q_lora=q_lora)
    w = tm.random_weights(attn, 7)
    g = layer_graph(attn, rope, kvp, layer=LAYER)
    text = str(g)
    assert text.count("gir.mla_attention") == 1 and "gir.mla_decode" not in text  # auto: one op
    ex, dev = run_schedule(g, copy.deepcopy(w), tm.manager, tm.HIDDEN, 4, 1e-4)
    no_host_steps(ex)
    assert "mla_cache_store_fp32" in dev.launched
    assert f"mla_absorbed_fp32_{md.DEFAULTS[16]}" in dev.launched
    assert ("mla_prefill_attn_fp32" in dev.launched) == (absorb_max < 9)
