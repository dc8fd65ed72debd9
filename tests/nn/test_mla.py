"""LatentAttentionWithRope (MLA) against Hugging Face DeepseekV3Attention on CPU, plus its ops.

HF runs each sequence alone with its own DynamicCache (which holds the normed c_kv and the roped
k_pe, de-interleaved); our layer runs the same rows as one ragged batch through the paged latent
cache: 3 sequences prefilled, 4 decode steps, then a second prefill chunk batched with a decode.
"""
import math

import numpy as np
import pytest
from transformers import DeepseekV3Config

from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType
from graphir.types import BufferType, ChainType
from graphir.nn import (DeepseekYarnRopeScalingParams, DeepseekYarnRotaryEmbedding, KVCacheParams,
                LatentAttentionWithRope, PagedCacheValues, TensorParallelLatentAttentionWithRope)
from graphir.nn.attention.parallel import distribute_value
from graphir.runtime.interpreter import run
from graphir.runtime.kv_cache import PagedKVCacheManager
from tests.nn.harness import (HFAttentionRunner, check_schedule_against_hf, interpreted,
                              layer_graph, mla_op_inputs, scheduled_manager)

HIDDEN, NH, NOPE, ROPE, V, R, QLORA = 64, 4, 16, 8, 12, 32, 24
PAGE, LAYERS, LAYER = 4, 2, 1
THETA, MAX_SEQ = 10000.0, 64
YARN = dict(rope_type="yarn", rope_theta=THETA, factor=40.0, original_max_position_embeddings=64,
            beta_fast=32, beta_slow=1, mscale=0.8, mscale_all_dim=1.0)
YARN_PARAMS = DeepseekYarnRopeScalingParams(40.0, 64, 32, 1, 0.8, 1.0)


def hf_config(q_lora, interleave=True):
    return DeepseekV3Config(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=NH, num_key_value_heads=NH,
        n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=q_lora, kv_lora_rank=R, qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=64 * 40, rms_norm_eps=1e-6,
        rope_parameters=dict(YARN), rope_interleave=interleave)


def make_layer(q_lora=None, graph_mode=None, interleaved=True, cls=LatentAttentionWithRope,
               devices=None, **kw):
    rope = DeepseekYarnRotaryEmbedding(ROPE, 1, THETA, MAX_SEQ, head_dim=ROPE,
                                       interleaved=interleaved, scaling_params=YARN_PARAMS)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=1, head_dim=R + ROPE, num_layers=LAYERS,
                        page_size=PAGE)
    attn = cls(rope=rope, num_attention_heads=NH, num_key_value_heads=NH, hidden_size=HIDDEN,
               kv_params=kvp, dtype=DType.float32, q_lora_rank=q_lora, kv_lora_rank=R,
               qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
               graph_mode=graph_mode, devices=devices, **kw)
    return rope, kvp, attn


def random_weights(attn, seed: int) -> dict:
    """Fresh random weights for every raw tensor of `attn` (norm weights around 1)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(tuple(int(d) for d in v.shape)) * 0.2 + ("norm" in k))
            .astype(np.float32) for k, v in attn.raw_state_dict().items()}


def manager() -> PagedKVCacheManager:
    return scheduled_manager(n_kv_heads=1, head_dim=R + ROPE)


def run_step(graph, m, st, x, weights):
    return interpreted(graph, m, weights)(st, x)


class HFRunner(HFAttentionRunner):
    """One HF DeepSeek-V3 model; hooks capture its attention's input and output."""

    def __init__(self, config, seed):
        super().__init__(config, seed, vector_scale=0.3)

    def latent_cache(self, seq):
        layer = self.caches[seq].layers[0]
        return layer.keys[0, 0].numpy(), layer.values[0, 0].numpy()  # c_kv [L, R], k_pe [L, rope]


@pytest.mark.parametrize("q_lora, mode, interleave", [
    (None, "prefill", True), (None, "decode", True), (QLORA, "prefill", True),
    (QLORA, "decode", True), (QLORA, "auto", True), (None, "auto", False)])
def test_layer_matches_hf(q_lora, mode, interleave):
    hf = HFRunner(hf_config(q_lora, interleave), seed=7 if q_lora else 3)
    rope, kvp, attn = make_layer(q_lora, mode, interleaved=interleave)
    attn.load_state_dict(hf.attn_state_dict())
    assert attn.scale != (NOPE + ROPE) ** -0.5  # YaRN's mscale_all_dim changed the scale
    g = layer_graph(attn, rope, kvp, layer=LAYER)
    m = manager()
    check_schedule_against_hf(hf, interpreted(g, m, attn.state_dict()), m, layer=LAYER)
    # The latent cache holds what HF caches; HF's interleaved rope writes the rotated pairs
    # de-interleaved ([evens | odds]), ours keeps them in place: the same vectors permuted.
    perm = np.r_[0:ROPE:2, 1:ROPE:2] if interleave else np.arange(ROPE)
    for s in range(3):
        c_kv, k_pe = hf.latent_cache(s)
        ours = m.gather_kv(s, LAYER)[0][:, 0]
        np.testing.assert_allclose(ours[:, :R], c_kv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[:, R:][:, perm], k_pe, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora", [None, QLORA])
def test_prefill_and_decode_paths_agree(q_lora):
    """The same step (a ragged prefill, then a decode) through both paths on the same cache."""
    graphs = {}
    for mode in ("prefill", "decode"):
        rope, kvp, attn = make_layer(q_lora, mode, buffer_size=3)  # several decompression chunks
        graphs[mode] = layer_graph(attn, rope, kvp, layer=LAYER)
    weights = random_weights(attn, 5)
    m = manager()
    rng = np.random.default_rng(2)
    for seq_ids, counts in [([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1]), ([2, 1], [1, 4])]:
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        st = m.prepare_step(seq_ids, counts)
        before = m.blocks.copy()
        outs = {}
        for mode, g in graphs.items():
            m.blocks[...] = before
            outs[mode] = run_step(g, m, st, x, weights)
        m.commit_step(st)
        assert np.abs(outs["prefill"]).max() > 0.05
        np.testing.assert_allclose(outs["decode"], outs["prefill"], rtol=1e-5, atol=1e-6)


def test_graph_modes_emit_their_op():
    # prefill and auto plan the decompression buffers with create_mla_prefill_metadata; auto is
    # one op (mla_attention) choosing its form per batch, not both forms and a select.
    for mode, want, plans in (("prefill", {"mla_prefill"}, 1), ("decode", {"mla_decode"}, 0),
                              ("auto", {"mla_attention"}, 1)):
        rope, kvp, attn = make_layer(QLORA, mode)
        g = layer_graph(attn, rope, kvp)
        ops_ = [n.op for n in g.nodes]
        found = set(ops_) & {"mla_prefill", "mla_decode", "mla_attention"}
        assert found == want, (mode, found)
        assert sum(op in want for op in ops_) == 1 and "where" not in ops_
        assert ops_.count("mla_prefill_plan") == plans
        attn_node = next(n for n in g.nodes if n.op in want)
        assert len([v for v in attn_node.operands if not isinstance(v.type, ChainType)]) == \
            7 + 3 * plans
        assert sum(n.op == "mla_cache_store" for n in g.nodes) == 1


@pytest.mark.parametrize("counts, taken", [([1, 1, 1], "decode"), ([5, 9, 3], "prefill"),
                                           ([1, 4], "prefill")])
def test_auto_computes_only_the_form_it_takes(counts, taken, monkeypatch):
    """The reference of mla_attention runs one form per call: the absorbed one while every
    sequence brings one token, the decompressed one otherwise; and it equals that form."""
    from graphir.ops import mla_math

    graphs = {}
    for mode in ("auto", "prefill", "decode"):
        rope, kvp, attn = make_layer(QLORA, mode, buffer_size=3)
        graphs[mode] = layer_graph(attn, rope, kvp, layer=LAYER)
    weights = random_weights(attn, 8)
    m = manager()
    rng = np.random.default_rng(6)
    seqs = list(range(len(counts)))
    warm = m.prepare_step(seqs, [3] * len(counts))   # some cache to attend to
    run_step(graphs["prefill"], m, warm, rng.standard_normal((3 * len(counts), HIDDEN))
             .astype(np.float32), weights)
    m.commit_step(warm)
    st = m.prepare_step(seqs, counts)
    x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
    calls = []
    for name in ("mla_prefill", "mla_decode"):
        fn = getattr(mla_math, name)
        monkeypatch.setattr(mla_math, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n)
                            or _f(*a, **k))
    before = m.blocks.copy()
    outs = {}
    for mode, g in graphs.items():
        m.blocks[...] = before
        calls.clear()
        outs[mode] = run_step(g, m, st, x, weights)
        if mode == "auto":
            assert calls == [f"mla_{taken}"], calls
    np.testing.assert_array_equal(outs["auto"], outs[taken])
    other = "decode" if taken == "prefill" else "prefill"
    np.testing.assert_allclose(outs["auto"], outs[other], rtol=1e-5, atol=1e-6)


def test_properties_and_weights():
    rope, kvp, attn = make_layer(QLORA)
    assert sorted(attn.raw_state_dict()) == sorted([
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"])
    kv_b = np.random.default_rng(0).standard_normal((NH * (NOPE + V), R)).astype(np.float32)
    q_a = np.random.default_rng(1).standard_normal((QLORA, HIDDEN)).astype(np.float32)
    kv_a = np.random.default_rng(2).standard_normal((R + ROPE, HIDDEN)).astype(np.float32)
    with Graph("props", input_types=[]) as g:
        g.output(attn.w_k, attn.w_uk, attn.w_uv, attn.wqkv)
    w_k, w_uk, w_uv, wqkv = run(g, weights={"kv_b_proj.weight": kv_b, "q_a_proj.weight": q_a,
                                            "kv_a_proj_with_mqa.weight": kv_a})
    per_head = kv_b.T.reshape(R, NH, NOPE + V)  # MAX_SEMANTICS' definition
    np.testing.assert_array_equal(w_uk, per_head[..., :NOPE].transpose(1, 2, 0))
    np.testing.assert_array_equal(w_uv, per_head[..., NOPE:].transpose(1, 0, 2))
    np.testing.assert_array_equal(w_k, per_head[..., :NOPE].transpose(1, 2, 0).reshape(NH * NOPE, R))
    np.testing.assert_array_equal(wqkv, np.concatenate([q_a, kv_a]))
    assert w_uk.shape == (NH, NOPE, R) and w_uv.shape == (NH, R, V)


def test_yarn_rope_table_and_scale():
    rope = DeepseekYarnRotaryEmbedding(ROPE, 1, THETA, MAX_SEQ, head_dim=ROPE,
                                       scaling_params=YARN_PARAMS)
    with Graph("rope", input_types=[]) as g:
        g.output(rope.freqs_cis)
    (table,) = run(g)
    # Independent YaRN (the published formulas): blend, then scale cos/sin by the mscale ratio.
    def corr(rot):
        return ROPE * math.log(64 / (rot * 2 * math.pi)) / (2 * math.log(THETA))
    lo, hi = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), ROPE - 1)
    ramp = np.clip((np.arange(ROPE // 2) - lo) / (hi - lo), 0, 1)
    base = 1.0 / THETA ** (np.arange(0, ROPE, 2) / ROPE)
    inv = base / 40.0 * ramp + base * (1 - ramp)
    ms = lambda m: 0.1 * m * math.log(40.0) + 1.0  # noqa: E731
    ang = np.arange(2 * MAX_SEQ)[:, None] * inv[None]
    want = np.stack([np.cos(ang), np.sin(ang)], -1).reshape(2 * MAX_SEQ, ROPE) * ms(0.8) / ms(1.0)
    np.testing.assert_allclose(table, want, rtol=2e-6, atol=2e-6)
    _, _, attn = make_layer()
    assert attn.scale == pytest.approx((NOPE + ROPE) ** -0.5 * ms(1.0) ** 2, rel=1e-12)
    _, _, plain = make_layer(scale=0.25)
    assert plain.scale == 0.25


# -- the ops against independent numpy ---------------------------------------------------------
def _dense_mla(q, latent_rows, w_k, w_uv, cl, scale):
    """Plain decompressed attention of one sequence, built independently of ops.mla_math."""
    n = q.shape[0]
    c, k_pe = latent_rows[:, :R], latent_rows[:, R:]
    k = np.concatenate([np.einsum("lr,hdr->lhd", c, w_k.reshape(NH, NOPE, R)),
                        np.broadcast_to(k_pe[:, None], (len(c), NH, ROPE))], axis=2)
    v = np.einsum("lr,hrv->lhv", c, w_uv)
    out = np.zeros((n, NH, V))
    for i in range(n):
        keys = cl + i + 1
        s = np.einsum("hd,lhd->hl", q[i], k[:keys]) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[i] = np.einsum("hl,lhv->hv", p / p.sum(-1, keepdims=True), v[:keys])
    return out


@pytest.mark.parametrize("kinds", [1, 2])
def test_ops_against_dense_attention(kinds):
    q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv = mla_op_inputs(
        np.random.default_rng(11), kinds, nh=NH, nope=NOPE, rope=ROPE, v=V, r=R, kv_b_scale=0.2)
    T, W = q.shape[0], R + ROPE
    u32 = DType.uint32
    types = [TensorType(DType.float32, ["t", NH * (NOPE + ROPE)]), TensorType(DType.float32, ["t", W]),
             TensorType(DType.float32, [R]), TensorType(DType.float32, [64, ROPE]),
             TensorType(u32, ["b + 1"]), TensorType(u32, ["b"]), TensorType(u32, ["b", "p"]),
             BufferType(DType.float32, ["n", kinds, LAYERS, PAGE, 1, W]),
             TensorType(DType.float32, [NH * NOPE, R]), TensorType(DType.float32, [NH, NOPE, R]),
             TensorType(DType.float32, [NH, R, V])]
    with Graph("mla_ops", input_types=types) as g:
        qv, kvv, wn, f, o, c, lt, b, wk, wuk, wuv = g.inputs
        ops.mla_cache_store(kvv, wn, f, o, c, lt, b, kv_lora_rank=R, qk_rope_head_dim=ROPE,
                            layer_idx=LAYER)
        dims = dict(n_heads=NH, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                    kv_lora_rank=R, layer_idx=LAYER, scale=0.17)
        plan = ops.mla_prefill_plan(o, c)
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=4, **dims),
                 ops.mla_decode(qv, b, o, c, lt, wuk, wuv, **dims), *plan,
                 # buffers of 3 rows laid over the batch's 17 K/V rows by the plan
                 ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=3, prefill_metadata=plan,
                                 **dims),
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, buffer_size=2, absorb_max=4,
                                   prefill_metadata=plan, **dims),   # 5 new tokens: prefill
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, absorb_max=5, **dims))  # absorbed
    before = blocks.copy()
    pre, dec, rows, starts, total, *more = run(g, q, kv, normw, freqs, offs, clen, lut, blocks,
                                               w_k, w_uk, w_uv)
    # The store: normed c_kv then interleaved-roped k_pe at each token's page slot.
    seq, pos = np.repeat([0, 1, 2], [3, 5, 1]), np.array([6, 7, 8, 0, 1, 2, 3, 4, 2])
    c64 = kv[:, :R].astype(np.float64)
    c_n = c64 / np.sqrt((c64 ** 2).mean(1, keepdims=True) + 1e-6) * normw
    ang = pos[:, None] * (1.0 / THETA ** (np.arange(0, ROPE, 2) / ROPE))[None]
    a, bb = kv[:, R::2].astype(np.float64), kv[:, R + 1::2].astype(np.float64)
    kpe = np.empty((T, ROPE))
    kpe[:, 0::2], kpe[:, 1::2] = a * np.cos(ang) - bb * np.sin(ang), a * np.sin(ang) + bb * np.cos(ang)
    expect = before.copy()
    expect[lut[seq, pos // PAGE], 0, LAYER, pos % PAGE, 0] = np.concatenate([c_n, kpe], 1)
    np.testing.assert_allclose(blocks, expect, rtol=1e-5, atol=1e-5)
    for bi in range(3):
        r0, r1 = offs[bi], offs[bi + 1]
        total_b = clen[bi] + r1 - r0
        p = np.arange(total_b)
        latent = blocks[lut[bi, p // PAGE], 0, LAYER, p % PAGE, 0].astype(np.float64)
        want = _dense_mla(q[r0:r1].reshape(-1, NH, NOPE + ROPE).astype(np.float64), latent,
                          w_k.astype(np.float64), w_uv.astype(np.float64), int(clen[bi]), 0.17)
        for got in [pre, dec] + more:
            np.testing.assert_allclose(got[r0:r1].reshape(-1, NH, V), want, rtol=1e-5, atol=1e-5)
    assert rows.tolist() == [0, 9, 14, 17] and starts.tolist() == [6, 0, 2]
    assert total.tolist() == [17]


def test_create_mla_prefill_metadata():
    rope, kvp, attn = make_layer()
    types = [TensorType(DType.uint32, ["batch + 1"])] + kvp.input_types()
    with Graph("meta", input_types=types) as g:
        offs, *cache = g.inputs
        md = attn.create_mla_prefill_metadata(offs, PagedCacheValues(*cache))
        g.output(md.buffer_row_offsets, md.cache_offsets, md.buffer_lengths)
    m = manager()
    st = m.prepare_step([0, 1, 2], [2, 1, 4])
    rows, starts, total = run(g, st.input_row_offsets, m.blocks, st.cache_lengths,
                              st.lookup_table, st.max_lengths)
    assert rows.tolist() == [0, 2, 3, 7] and starts.tolist() == [0, 0, 0] and total.tolist() == [7]


def test_tensor_parallel_matches_single_device():
    devs = [DeviceRef.CPU(0), DeviceRef.CPU(1)]
    rope, kvp, single = make_layer(QLORA, "auto")
    _, kvp2, tp = make_layer(QLORA, "auto", cls=TensorParallelLatentAttentionWithRope,
                             devices=devs)
    weights = random_weights(single, 4)
    rng = np.random.default_rng(40)
    single.load_state_dict(weights)
    tp.load_state_dict(weights)
    g1 = layer_graph(single, rope, kvp, layer=LAYER)
    types = [TensorType(DType.float32, ["total_seq_len", HIDDEN], devs[0]),
             TensorType(DType.uint32, ["batch + 1"], devs[0])]
    for i, d in enumerate(devs):
        types += kvp2.input_types(d, suffix=f"_{i}")
    with Graph("tp", input_types=types) as g:
        x, offs = g.inputs[:2]
        kvs = [PagedCacheValues(*g.inputs[2 + 4 * i: 6 + 4 * i]) for i in range(2)]
        g.output(*tp(LAYER, distribute_value(x, devs), kvs, distribute_value(rope.freqs_cis, devs),
                     distribute_value(offs, devs)))
    assert sum(n.op == "allreduce" for n in g.nodes) == 1
    m = manager()
    dev_blocks = [m.blocks.copy(), m.blocks.copy()]  # the latent cache is replicated
    for seq_ids, counts in [([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1])]:
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        st = m.prepare_step(seq_ids, counts)
        meta = (st.cache_lengths, st.lookup_table, st.max_lengths)
        outs = run(g, x, st.input_row_offsets, dev_blocks[0], *meta, dev_blocks[1], *meta,
                   weights=tp.state_dict())
        want = run_step(g1, m, st, x, single.state_dict())
        m.commit_step(st)
        for o in outs:
            np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
        for b in dev_blocks:
            np.testing.assert_array_equal(b, m.blocks)


def test_ir_round_trip_and_default_passes_keep_numbers():
    from graphir import parse
    from graphir.passes import run_passes

    rope, kvp, attn = make_layer(QLORA, "auto")
    g = layer_graph(attn, rope, kvp, layer=LAYER)
    assert str(parse(str(g))) == str(g)
    w = random_weights(attn, 8)
    g2 = layer_graph(attn, rope, kvp, layer=LAYER)
    run_passes(g2)
    assert {"mla_cache_store", "mla_attention", "mla_prefill_plan"} <= {n.op for n in g2.nodes}
    outs = []
    for graph in (g, g2):
        m = manager()
        st = m.prepare_step([0, 1, 2], [3, 1, 2])
        outs.append(run_step(graph, m, st, np.random.default_rng(9).standard_normal(
            (6, HIDDEN)).astype(np.float32), w))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_bfloat16_layer_tracks_float32():
    """bf16 weights and cache (norms in float32): within bf16 rounding of the float32 layer."""
    outs = []
    for dt in (DType.float32, DType.bfloat16):
        rope, kvp, _ = make_layer()
        kvp = kvp.copy(dtype=dt)
        attn = LatentAttentionWithRope(
            rope=rope, num_attention_heads=NH, num_key_value_heads=NH, hidden_size=HIDDEN,
            kv_params=kvp, dtype=dt, q_lora_rank=QLORA, kv_lora_rank=R, qk_nope_head_dim=NOPE,
            qk_rope_head_dim=ROPE, v_head_dim=V, norm_dtype=DType.float32, graph_mode="decode")
        w = random_weights(attn, 6)
        types = [TensorType(dt, ["t", HIDDEN]), TensorType(DType.uint32, ["b + 1"])] \
            + kvp.input_types()
        with Graph("bf", input_types=types) as g:
            x, offs, *cache = g.inputs
            g.output(attn(LAYER, x, PagedCacheValues(*cache), rope.freqs_cis, offs))
        m = manager()
        st = m.prepare_step([0, 1], [4, 2])
        x = np.random.default_rng(10).standard_normal((6, HIDDEN)).astype(np.float32)
        outs.append(run_step(g, m, st, x, w))
    scale = np.abs(outs[0]).max()
    assert scale > 0.1 and 1e-4 * scale < np.abs(outs[1] - outs[0]).max() < 0.05 * scale


def test_float8_o_proj_quant_config():
    """o_proj_quant_config=Float8Config: float8 o_proj weight + rowwise scale, dynamic input
    quantization; close to the float32 layer run on the dequantized weight (float8 precision)."""
    from graphir.nn import Float8Config

    _, _, f8 = make_layer(QLORA, "decode", o_proj_quant_config=Float8Config.dynamic())
    assert f8.o_proj.weight.dtype == DType.float8_e4m3fn
    rope, kvp, ref = make_layer(QLORA, "decode")
    w = random_weights(ref, 12)
    rng = np.random.default_rng(120)
    w8 = {k: v for k, v in w.items() if k != "o_proj.weight"}
    scale = np.abs(w["o_proj.weight"]).max(axis=1, keepdims=True) / 448.0
    w8["o_proj.weight"] = w["o_proj.weight"] / scale
    w8["o_proj.weight_scale"] = scale.astype(np.float32)
    x = rng.standard_normal((5, HIDDEN)).astype(np.float32)
    outs = []
    for layer, weights in ((ref, w), (f8, w8)):
        m = manager()
        st = m.prepare_step([0, 1], [3, 2])
        outs.append(run_step(layer_graph(layer, rope, kvp, layer=LAYER), m, st, x, weights))
    big = np.abs(outs[0]).max()
    assert big > 0.1 and 1e-4 * big < np.abs(outs[1] - outs[0]).max() < 0.1 * big
