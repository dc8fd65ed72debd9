"""LatentAttentionWithRope and the MLA ops refuse what they cannot compute: bad layer configs,
op operands of the wrong shape or type, and prefill metadata that is not the plan of its batch,
each with an error naming what was wrong."""
import warnings

import numpy as np
import pytest

from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType
from graphir.types import BufferType
from graphir.nn import (KVCacheParams, LatentAttentionWithRope, PagedCacheValues, RotaryEmbedding,
                        TensorParallelLatentAttentionWithRope)
from graphir.ops import mla_math
from graphir.runtime.interpreter import run
from tests.nn.harness import mla_op_inputs
from tests.nn.test_mla import (HIDDEN, LAYER, LAYERS, MAX_SEQ, NH, NOPE, PAGE, R, ROPE, THETA, V,
                               make_layer)


# -- configs and operands ------------------------------------------------------------------------------------
def _kvp(**kw):
    base = dict(dtype=DType.float32, n_kv_heads=1, head_dim=R + ROPE, num_layers=LAYERS,
                page_size=PAGE)
    return KVCacheParams(**{**base, **kw})


@pytest.mark.parametrize("change, exc, match", [
    (dict(kv_params=_kvp(head_dim=R + ROPE + 2)), ValueError, "kv_lora_rank \\+ qk_rope_head_dim"),
    (dict(kv_params=_kvp(n_kv_heads=2)), ValueError, "one head of kv_lora_rank"),
    (dict(qk_rope_head_dim=2 * ROPE), ValueError, "rope.head_dim 8 differs from qk_rope_head_dim 16"),
    (dict(graph_mode="chunked"), ValueError, "graph_mode must be one of"),
    (dict(o_proj_quant_config=object()), NotImplementedError, "o_proj_quant_config object"),
    (dict(q_lora_rank=0), ValueError, "q_lora_rank must be a positive int"),
    (dict(dtype=DType.int32), ValueError, "dtype must be a float DType"),
])
def test_bad_config(change, exc, match):
    rope = RotaryEmbedding(ROPE, 1, THETA, MAX_SEQ, head_dim=ROPE)
    kw = dict(rope=rope, num_attention_heads=NH, num_key_value_heads=NH, hidden_size=HIDDEN,
              kv_params=_kvp(), dtype=DType.float32, kv_lora_rank=R, qk_nope_head_dim=NOPE,
              qk_rope_head_dim=ROPE, v_head_dim=V)
    with pytest.raises(exc, match=match):
        LatentAttentionWithRope(**{**kw, **change})


def test_auto_without_max_lengths_and_tp_needs_divisible_heads():
    # auto reads the batch's shape from input_row_offsets: max_lengths is not needed.
    rope, kvp, attn = make_layer()
    types = [TensorType(DType.float32, ["t", HIDDEN]), TensorType(DType.uint32, ["b + 1"])]
    with Graph("g", input_types=types + kvp.input_types()[:3]) as g:
        x, offs, *cache = g.inputs
        g.output(attn(0, x, PagedCacheValues(*cache), rope.freqs_cis, offs))
    assert sum(n.op == "mla_attention" for n in g.nodes) == 1
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by the 3"):
        make_layer(cls=TensorParallelLatentAttentionWithRope,
                   devices=[DeviceRef.CPU(i) for i in range(3)])
    with pytest.raises(ValueError, match="kv_b_proj.weight.*expected shape"):
        attn.load_state_dict({**{k: np.ones(tuple(int(d) for d in w.shape), np.float32)
                                 for k, w in attn.raw_state_dict().items()},
                              "kv_b_proj.weight": np.ones((NH * (NOPE + V), R + 1), np.float32)})


def _op_graph(build, W=R + ROPE, wk_shape=(NH, NOPE, R), kinds=2):
    u32 = DType.uint32
    types = [TensorType(DType.float32, ["t", NH * (NOPE + ROPE)]), TensorType(u32, ["b + 1"]),
             TensorType(u32, ["b"]), TensorType(u32, ["b", "p"]),
             BufferType(DType.float32, ["n", kinds, LAYERS, PAGE, 1, W]),
             TensorType(DType.float32, list(wk_shape)), TensorType(DType.float32, [NH, R, V])]
    with Graph("bad", input_types=types) as g:
        q, o, c, lt, b, wk, wuv = g.inputs
        build(q, o, c, lt, b, wk, wuv)


DIMS = dict(n_heads=NH, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
            kv_lora_rank=R, layer_idx=0)


@pytest.mark.parametrize("kw, build, match", [
    (dict(wk_shape=(NH, NOPE + 1, R)), lambda q, o, c, lt, b, wk, wuv: ops.mla_decode(
        q, b, o, c, lt, wk, wuv, **DIMS), "w_uk must be \\[4, 16, 32\\]"),
    (dict(W=R + ROPE + 1), lambda q, o, c, lt, b, wk, wuv: ops.mla_decode(
        q, b, o, c, lt, wk, wuv, **DIMS), "blocks must be \\[pages, 1 or 2, layers, page_size, 1, 40\\]"),
    (dict(kinds=3), lambda q, o, c, lt, b, wk, wuv: ops.mla_decode(
        q, b, o, c, lt, wk, wuv, **DIMS), "1 or 2"),
    (dict(wk_shape=(NH * NOPE, R)), lambda q, o, c, lt, b, wk, wuv: ops.mla_prefill(
        q, b, o, c, lt, wk, wuv, **{**DIMS, "qk_nope_head_dim": NOPE + 2}), "q must be \\[tokens, 104\\]"),
    (dict(wk_shape=(NH * NOPE, R)), lambda q, o, c, lt, b, wk, wuv: ops.mla_prefill(
        q, b, o, c, lt, wk, wuv, buffer_size=0, **DIMS), "buffer_size must be a positive int"),
    (dict(wk_shape=(NH * NOPE, R)), lambda q, o, c, lt, b, wk, wuv: ops.mla_prefill(
        q, b, o, c, lt, wk, wuv, **{**DIMS, "layer_idx": LAYERS}), "layer 2 is out of range"),
    (dict(), lambda q, o, c, lt, b, wk, wuv: ops.mla_decode(
        q, b, o, c, lt, wk, wuv, **{**DIMS, "qk_rope_head_dim": -ROPE}),
     "mla_decode: qk_rope_head_dim must be a positive int, got -8"),
    (dict(), lambda q, o, c, lt, b, wk, wuv: ops.mla_decode(
        q, b, o, c, lt, wk, wuv, **{**DIMS, "qk_nope_head_dim": 2.5}),
     "mla_decode: qk_nope_head_dim must be a positive int, got 2.5"),
    (dict(wk_shape=(R + ROPE, HIDDEN)), lambda q, o, c, lt, b, wk, wuv: ops.mla_cache_store(
        q, wuv, wk, o, c, lt, b, kv_lora_rank=R, qk_rope_head_dim=ROPE, layer_idx=0),
     "kv_latent must be \\[tokens, 40\\]"),
])
def test_op_type_errors(kw, build, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # refused by name, not after a numpy warning
        with pytest.raises(ValueError, match=match):
            _op_graph(build, **kw)


def test_prefill_metadata_and_auto_errors():
    q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv = mla_op_inputs(
        np.random.default_rng(12), 1, nh=NH, nope=NOPE, rope=ROPE, v=V, r=R, kv_b_scale=0.2)
    W, u32 = R + ROPE, DType.uint32
    types = [TensorType(DType.float32, ["t", NH * (NOPE + ROPE)]), TensorType(u32, ["b + 1"]),
             TensorType(u32, ["b"]), TensorType(u32, ["b", "p"]),
             BufferType(DType.float32, ["n", 1, LAYERS, PAGE, 1, W]),
             TensorType(DType.float32, [NH * NOPE, R]), TensorType(DType.float32, [NH, NOPE, R]),
             TensorType(DType.float32, [NH, R, V]), TensorType(u32, ["b + 1"]),
             TensorType(u32, ["b"]), TensorType(DType.int32, [1])]
    dims = dict(n_heads=NH, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                kv_lora_rank=R, layer_idx=LAYER, scale=0.2)
    with Graph("g", input_types=types) as g:
        qv, o, c, lt, b, wk, wuk, wuv, *meta = g.inputs
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, prefill_metadata=meta, **dims))
        with pytest.raises(ValueError, match="buffer_lengths must be i32 \\[1\\]"):
            ops.mla_attention(qv, b, o, c, lt, wuk, wuv, prefill_metadata=[meta[0], meta[1],
                                                                             meta[0]], **dims)
        with pytest.raises(TypeError, match="unexpected keyword argument 'prefill_metadata'"):
            ops.mla_decode(qv, b, o, c, lt, wuk, wuv, prefill_metadata=meta, **dims)
        with pytest.raises(ValueError, match="absorb_max must be a positive int"):
            ops.mla_attention(qv, b, o, c, lt, wuk, wuv, absorb_max=0, **dims)
        with pytest.raises(ValueError, match="prefill_metadata must be an MLAPrefillMetadata"):
            ops.mla_prefill(qv, b, o, c, lt, wk, wuv, prefill_metadata=meta[:2], **dims)
    rows, starts, total = mla_math.mla_prefill_plan(offs, clen)
    args = [q, offs, clen, lut, blocks, w_k, w_uk, w_uv]
    run(g, *args, rows, starts, total)   # the plan's metadata is accepted
    bad = rows.copy()
    bad[1] += 1
    with pytest.raises(Exception, match="buffer_row_offsets .* is not the plan of these"):
        run(g, *args, bad, starts, total)
