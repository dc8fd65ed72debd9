"""MLA ops compiled for the CPU match the interpreter: the latent-cache store (both RoPE
pairings, f32 and bf16 caches), prefill (with and without the prefill plan's buffer layout),
decode and mla_attention (graph_mode "auto": one kernel, one form per call) over ragged batches
with cached prefixes, at test size and at sizes that cross every tile of the vectorized kernels
(head groups, 2 x lanes query blocks, key tiles, decompression chunks); and the prefill plan."""
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
        plan = ops.mla_prefill_plan(o, c)
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=4, **dims),
                 ops.mla_decode(qv, b, o, c, lt, wuk, wuv, **dims), *plan,
                 ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=3, prefill_metadata=plan,
                                 **dims),
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, buffer_size=2, absorb_max=4,
                                   prefill_metadata=plan, **dims),
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, absorb_max=5, **dims))
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


def _big_case(rng, counts, cached, *, nh, nope, rope, v, r, page, dt=DType.float32):
    """Inputs of one layer's MLA ops for sequences with `cached` + `counts` tokens."""
    w = r + rope
    per = [-(-(c + n) // page) for c, n in zip(cached, counts)]
    pages = sum(per)
    perm = rng.permutation(pages).astype(np.uint32)   # pages of a sequence out of order
    lut = np.full((len(counts), max(per)), pages, np.uint32)
    k = 0
    for i, p in enumerate(per):
        lut[i, :p] = perm[k:k + p]
        k += p
    blocks = rng.standard_normal((pages + 1, 1, 1, page, 1, w)).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    q = rng.standard_normal((int(offs[-1]), nh * (nope + rope))).astype(np.float32)
    kv_b = (rng.standard_normal((nh, nope + v, r)) * 0.15).astype(np.float32)
    w_uk, w_uv = kv_b[:, :nope].copy(), kv_b[:, nope:].transpose(0, 2, 1).copy()
    arrays = [q, offs, np.array(cached, np.uint32), lut, blocks,
              w_uk.reshape(nh * nope, r).copy(), w_uk, w_uv]
    return [round_to(a, dt) if a.dtype == np.float32 else a for a in arrays]


def _big_graph(nh, nope, rope, v, r, page, buffer_size, dt=DType.float32):
    u32 = DType.uint32
    types = [TensorType(dt, ["t", nh * (nope + rope)]), TensorType(u32, ["b + 1"]),
             TensorType(u32, ["b"]), TensorType(u32, ["b", "p"]),
             BufferType(dt, ["n", 1, 1, page, 1, r + rope]), TensorType(dt, [nh * nope, r]),
             TensorType(dt, [nh, nope, r]), TensorType(dt, [nh, r, v])]
    dims = dict(n_heads=nh, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
                kv_lora_rank=r, layer_idx=0, scale=0.13)
    with Graph("mla_big", input_types=types) as g:
        qv, o, c, lt, b, wk, wuk, wuv = g.inputs
        plan = ops.mla_prefill_plan(o, c)
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=buffer_size,
                                 prefill_metadata=plan, **dims),
                 ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=buffer_size, **dims),
                 ops.mla_decode(qv, b, o, c, lt, wuk, wuv, **dims),
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, buffer_size=buffer_size,
                                   prefill_metadata=plan, **dims))
    return g


@pytest.mark.parametrize("nh,nope,rope,v,r,buffer_size,counts,cached", [
    # 20 heads: two groups of 10 along the lanes; 40- and 70-token sequences: several 2 x lanes
    # query blocks and key tiles; buffers of 300 rows over 456 K/V rows: a 256-key chunk, a
    # buffer boundary inside a sequence, a sequence with no new tokens.
    (20, 16, 8, 24, 48, 300, [40, 1, 0, 70], [300, 45, 7, 0]),
    # small buffers: many decompression chunks, a boundary inside every sequence
    (4, 8, 4, 12, 32, 7, [33, 2, 17], [5, 60, 0]),
    # one token per sequence: mla_attention runs the absorbed form
    (16, 32, 16, 32, 64, 64, [1, 1, 1], [130, 1, 0]),
])
def test_mla_kernels_at_tile_boundaries(nh, nope, rope, v, r, buffer_size, counts, cached):
    rng = np.random.default_rng(sum(counts) + nh)
    inputs = _big_case(rng, counts, cached, nh=nh, nope=nope, rope=rope, v=v, r=r, page=16)
    g = _big_graph(nh, nope, rope, v, r, 16, buffer_size)
    got = assert_matches_interpreter(g, *inputs, rtol=2e-5, atol=2e-5)
    assert np.abs(got[0]).max() > 0.05
    for i in (1, 2, 3):   # every form computes the same attention
        np.testing.assert_allclose(got[i], got[0], rtol=2e-5, atol=2e-5)


def test_mla_bfloat16_big():
    rng = np.random.default_rng(21)
    dims = dict(nh=6, nope=16, rope=8, v=16, r=32)
    inputs = _big_case(rng, [37, 1], [20, 70], page=8, dt=DType.bfloat16, **dims)
    assert_matches_interpreter(_big_graph(page=8, buffer_size=50, dt=DType.bfloat16, **dims),
                               *inputs, rtol=2e-2, atol=2e-2)


def test_auto_layer_compiles_one_attention_step_that_runs_one_form():
    """graph_mode "auto" compiles to one mla_attention step (no second form, no select); a
    decode batch gives the decode-mode layer's numbers bit for bit, a prefill batch the
    prefill-mode layer's: the kernel ran that form only."""
    from graphir.runtime.session import InferenceSession
    from tests.nn import test_mla as tm
    from tests.nn.harness import LAYER, layer_graph

    models, weights = {}, None
    for mode in ("auto", "prefill", "decode"):
        rope, kvp, attn = tm.make_layer(tm.QLORA, mode, buffer_size=5)
        if weights is None:
            wrng = np.random.default_rng(3)
            weights = {k: (wrng.standard_normal(tuple(int(d) for d in w.shape)) * 0.2
                           + ("norm" in k)).astype(np.float32)
                       for k, w in attn.raw_state_dict().items()}
        models[mode] = InferenceSession().load(layer_graph(attn, rope, kvp, layer=LAYER),
                                               weights=weights)
    steps = [s.op for s in models["auto"].plan.steps]
    assert steps.count("mla_attention") == 1, steps
    assert not {"mla_prefill", "mla_decode", "where", "select"} & set(steps), steps
    m = tm.manager()
    rng = np.random.default_rng(4)
    for counts, form in (([6, 9, 2], "prefill"), ([1, 1, 1], "decode"), ([2, 1], "prefill"),
                         ([1, 1], "decode")):
        seqs = list(range(len(counts)))
        st = m.prepare_step(seqs, counts)
        x = rng.standard_normal((sum(counts), tm.HIDDEN)).astype(np.float32)
        before = m.blocks.copy()
        outs = {}
        for mode, model in models.items():
            m.blocks[...] = before
            (outs[mode],) = model.execute(x, st.input_row_offsets, m.blocks, st.cache_lengths,
                                          st.lookup_table, st.max_lengths)
        m.commit_step(st)
        np.testing.assert_array_equal(outs["auto"], outs[form])
        np.testing.assert_allclose(outs["prefill"], outs["decode"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("buffer_size, rows", [(8, 8), (100, 100), (16384, 256)])
def test_prefill_workspace_is_bounded_by_buffer_size(buffer_size, rows):
    """The decompression workspace of a prefill task holds min(buffer_size, 256) keys (plus
    one key tile of padding) whatever the sequence lengths."""
    from graphir.lowering.mlir_cpu.backend import emit_module

    nh, nope, rope, v, r = 4, 8, 4, 20, 32
    ctx, module, _ = emit_module(_big_graph(nh, nope, rope, v, r, 16, buffer_size))
    with ctx:
        text = str(module)
    # two mla_prefill kernels and mla_attention's prefill branch
    assert text.count(f"memref.alloc() : memref<{rows + 32}x{nope + rope}xf32>") == 3
    assert text.count(f"memref.alloc() : memref<{rows + 32}x{v}xf32>") == 3
