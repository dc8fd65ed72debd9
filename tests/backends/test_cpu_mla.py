"""MLA ops compiled for the CPU match the interpreter: the latent-cache store (both RoPE
pairings, f32 and bf16 caches), prefill and decode attention over a ragged batch with cached
prefixes, and the prefill plan."""
import numpy as np
import pytest

from graphir import ops
from graphir import DType, Graph, TensorType
from graphir.dtype import round_to
from graphir.types import BufferType
from tests.nn.harness import mla_op_inputs

from .harness import assert_matches_interpreter

pytest.importorskip("mlir.ir")

NH, NOPE, ROPE, V, R = 3, 8, 6, 5, 16
PAGE, LAYERS, LAYER, W = 4, 2, 1, R + ROPE


def _inputs(rng, kinds, dt):
    q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv = mla_op_inputs(
        rng, kinds, nh=NH, nope=NOPE, rope=ROPE, v=V, r=R, kv_b_scale=0.3)
    q, kv, normw, blocks, w_k, w_uk, w_uv = (round_to(a, dt) for a in
                                             (q, kv, normw, blocks, w_k, w_uk, w_uv))
    return [q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv]


def _graph(kinds, dt, interleaved):
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
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=4, **dims),
                 ops.mla_decode(qv, b, o, c, lt, wuk, wuv, **dims),
                 *ops.mla_prefill_plan(o, c))
    return g


@pytest.mark.parametrize("kinds,dt,interleaved", [(1, DType.float32, True),
                                                  (2, DType.float32, False),
                                                  (1, DType.bfloat16, True)])
def test_mla_ops_match_interpreter(kinds, dt, interleaved):
    rng = np.random.default_rng(kinds + 3 * interleaved)
    inputs = _inputs(rng, kinds, dt)
    blocks_before = inputs[7].copy()
    tol = 1e-5 if dt is DType.float32 else 2e-2
    got = assert_matches_interpreter(_graph(kinds, dt, interleaved), *inputs, rtol=tol, atol=tol)
    assert not np.array_equal(inputs[7], blocks_before)  # the store wrote the cache
    assert np.array_equal(inputs[7][:, :, 1 - LAYER], blocks_before[:, :, 1 - LAYER])
    assert got[2].tolist() == [0, 9, 14, 17] and got[4].tolist() == [17]
