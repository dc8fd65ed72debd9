"""Module, Linear (float8), RMSNorm, RotaryEmbedding, and AttentionWithRope's forms and options,
each against numpy or against an equivalent configuration."""
import numpy as np
import pytest

from graphir import DType, Graph, TensorType
from graphir.dtype import round_to_f8e4m3fn
from graphir import ops
from graphir.nn import (AttentionWithRopeNoOpaque, Float8Config, Float8ScaleGranularity, Linear,
                Llama3RopeScalingParams, Module, PagedCacheValues, RMSNorm, RotaryEmbedding)
from graphir.ops import rope_math as rm
from graphir.runtime.interpreter import run
from tests.nn.harness import (D, HIDDEN, LAYER, NH, NKV, SCHEDULE, attention, layer_graph,
                              manager, step)

RNG = np.random.default_rng(11)


def one_input_graph(fn, shape):
    with Graph("g", input_types=[TensorType(DType.float32, shape)]) as g:
        g.output(fn(g.inputs[0]))
    return g


# -- Module --------------------------------------------------------------------------------------
class Block(Module):
    def __init__(self):
        super().__init__()
        self.inner = Linear(4, 3, DType.float32, has_bias=True)
        self.norm = RMSNorm(3)


def test_module_names_nest_and_state_dict_round_trips():
    outer = Module()
    outer.block = Block()
    assert outer.block.inner.weight.name == "block.inner.weight"
    assert sorted(outer.raw_state_dict()) == ["block.inner.bias", "block.inner.weight",
                                             "block.norm.weight"]
    sd = {k: RNG.standard_normal(tuple(int(d) for d in w.shape)).astype(np.float32)
          for k, w in outer.raw_state_dict().items()}
    outer.load_state_dict(sd)
    assert {k: v.tolist() for k, v in outer.state_dict().items()} == \
        {k: v.tolist() for k, v in sd.items()}
    outer.block.load_state_dict({"norm.weight": np.ones(3, np.float32)}, strict=False)
    assert outer.state_dict()["block.norm.weight"].tolist() == [1.0, 1.0, 1.0]


# -- Linear, RMSNorm -----------------------------------------------------------------------------
def test_linear_bias_and_clip_vs_numpy():
    lin = Linear(8, 5, DType.float32, has_bias=True, clip_weight=0.3)
    w, b = RNG.standard_normal((5, 8)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)
    lin.load_state_dict({"weight": w, "bias": b})
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    (y,) = run(one_input_graph(lin, ["n", 8]), x, weights=lin.state_dict())
    np.testing.assert_allclose(y, x @ np.clip(w, -0.3, 0.3).T + b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [Float8Config.static(), Float8Config.dynamic()],
                         ids=["static", "dynamic"])
def test_linear_float8_vs_numpy(cfg):
    lin = Linear(16, 4, DType.float32, float8_config=cfg)
    w = round_to_f8e4m3fn(RNG.standard_normal((4, 16)) * 50)
    rowwise = cfg.is_dynamic
    ws = (RNG.uniform(0.001, 0.01, (4, 1)) if rowwise else np.array(0.004)).astype(np.float32)
    sd = {"weight": w, "weight_scale": ws}
    if cfg.is_static:
        sd["input_scale"] = np.array(0.01, np.float32)
    lin.load_state_dict(sd)
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    (y,) = run(one_input_graph(lin, ["n", 16]), x, weights=lin.state_dict())
    s = (np.abs(x).max(-1, keepdims=True) / 448.0 if rowwise else np.float64(0.01))
    xq = round_to_f8e4m3fn(np.clip(x / s, -448, 448)).astype(np.float64) * s
    want = xq @ (w.astype(np.float64) * ws).T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    exact = x.astype(np.float64) @ (w.astype(np.float64) * ws).T
    assert not np.allclose(y, exact, rtol=1e-4, atol=0)  # the input really went through float8


def test_rmsnorm_vs_numpy():
    norm = RMSNorm(8, eps=1e-5)
    w = RNG.standard_normal(8).astype(np.float32)
    norm.load_state_dict({"weight": w})
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    (y,) = run(one_input_graph(norm, [3, 8]), x, weights=norm.state_dict())
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(y, want, rtol=1e-6)


# -- RotaryEmbedding -----------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [None, Llama3RopeScalingParams(8.0, 1.0, 4.0, 32)])
def test_freqs_cis_built_from_ops_equals_attention_math(scaling):
    rope = RotaryEmbedding(96, 6, 5000.0, 40, interleaved=False, scaling_params=scaling)
    with Graph("freqs") as g:
        f = rope.freqs_cis
        assert rope.freqs_cis is f  # built once per graph
        g.output(f)
    assert not any(n.op == "constant" and n.results[0].type.static_shape()[-1] > 8
                   for n in g.nodes)  # only the 8 frequencies are a constant
    (got,) = run(g)
    ref_scaling = None if scaling is None else rm.Llama3RopeScaling(8.0, 1.0, 4.0, 32)
    np.testing.assert_array_equal(got, rm.rope_freqs_cis(16, 40, 5000.0, ref_scaling))


# -- AttentionWithRope forms and options ---------------------------------------------------------
def hf_like_weights(seed, bias=False, qk_norm=False):
    rng = np.random.default_rng(seed)
    shapes = {"q_proj.weight": (NH * D, HIDDEN), "k_proj.weight": (NKV * D, HIDDEN),
              "v_proj.weight": (NKV * D, HIDDEN), "o_proj.weight": (HIDDEN, NH * D)}
    if bias:
        shapes.update({"q_proj.bias": (NH * D,), "k_proj.bias": (NKV * D,),
                       "v_proj.bias": (NKV * D,)})
    if qk_norm:
        shapes.update({"q_norm.weight": (D,), "k_norm.weight": (D,)})
    return {k: (rng.standard_normal(s) * (0.15 if len(s) == 2 else 0.5)
                + (1.0 if "norm" in k else 0.0)).astype(np.float32) for k, s in shapes.items()}


def run_schedule(graph, weights, seed=2, schedule=SCHEDULE):
    m = manager()
    for _ in range(3):
        m.claim()
    rng = np.random.default_rng(seed)
    outs = [step(graph, m, ids, n, rng.standard_normal((sum(n), HIDDEN)).astype(np.float32),
                 weights) for ids, n in schedule]
    return outs, m.blocks


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_and_unfused_compute_the_same(qk_norm):
    w = hf_like_weights(0, bias=True, qk_norm=qk_norm)
    res = []
    for fuse in (True, False):
        rope, kvp, attn = attention(has_bias=True, use_qk_norm=qk_norm, _fuse_rope_and_store=fuse)
        attn.load_state_dict(w)
        g = layer_graph(attn, rope, kvp)
        ops_used = [n.op for n in g.nodes]
        if fuse:
            assert ops_used.count("rope_split_store") == 1 and "rope" not in ops_used
        else:
            assert "rope_split_store" not in ops_used and ops_used.count("kv_cache_store") == 2
        res.append(run_schedule(g, attn.state_dict()))
    (fo, fb), (uo, ub) = res
    # MAX: both forms give bit-identical results (with and without q/k norm).
    for a, b in zip(fo, uo):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fb, ub)


def test_unfused_emits_the_documented_sequence():
    rope, kvp, attn = attention(use_qk_norm=True, _fuse_rope_and_store=False)
    g = layer_graph(attn, rope, kvp)
    seq = [n.op for n in g.nodes if n.op not in ("weight", "constant", "chain", "concat",
                                                   "range", "mul", "cos", "sin")]
    assert seq[seq.index("fused_qkv_matmul"):] == [
        "fused_qkv_matmul", "split", "reshape", "rms_norm", "reshape", "reshape", "rms_norm",
        "reshape", "rope", "rope", "kv_cache_store", "kv_cache_store", "flash_attention_ragged",
        "matmul"]
    stores = [n for n in g.nodes if n.op == "kv_cache_store"]
    assert [s.attrs["kind"] for s in stores] == [0, 1]


def test_stacked_qkv_and_clip_match_separate_weights():
    w = hf_like_weights(1)
    rope, kvp, plain = attention()
    clipped = {k: (np.clip(v, -0.2, 0.2) if k[0] in "qkv" else v) for k, v in w.items()}
    plain.load_state_dict(clipped)
    rope2, kvp2, stacked = attention(stacked_qkv=True, clip_qkv=0.2)
    stacked.load_state_dict({"qkv_proj.weight": np.concatenate(
        [w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]]),
        "o_proj.weight": w["o_proj.weight"]})
    a, _ = run_schedule(layer_graph(plain, rope, kvp), plain.state_dict())
    b, _ = run_schedule(layer_graph(stacked, rope2, kvp2), stacked.state_dict())
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_no_opaque_matches_attention_with_rope():
    w = hf_like_weights(2)
    rope, kvp, attn = attention(il=False)
    attn.load_state_dict(w)
    rope2, kvp2, no = attention(il=False, cls=AttentionWithRopeNoOpaque)
    no.load_state_dict({"qkv_proj.weight": np.concatenate(
        [w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]]),
        "o_proj.weight": w["o_proj.weight"]})
    types = [TensorType(DType.float32, ["t", HIDDEN]), TensorType(DType.uint32, ["batch + 1"])]
    with Graph("noopaque", input_types=types + kvp2.input_types()) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        g.output(no(LAYER, x, (blocks, clen, lut, maxl), offs))
    a, ab = run_schedule(layer_graph(attn, rope, kvp), attn.state_dict())
    b, bb = run_schedule(g, no.state_dict())
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ab, bb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fuse", [True, False])
def test_materialize_kv_from_hidden_writes_what_the_layer_writes(fuse):
    w = hf_like_weights(3, qk_norm=True)
    rope, kvp, attn = attention(use_qk_norm=True, _fuse_rope_and_store=fuse)
    attn.load_state_dict(w)
    types = [TensorType(DType.float32, ["t", HIDDEN]), TensorType(DType.uint32, ["batch + 1"])]
    with Graph("materialize", input_types=types + kvp.input_types()) as g:
        x, offs, *kv = g.inputs
        layer = ops.constant(LAYER, DType.uint32)  # MAX passes the layer as a constant tensor
        attn.materialize_kv_from_hidden(layer, x, [PagedCacheValues(*kv)], rope.freqs_cis, offs)
        g.output(x)
    assert "flash_attention_ragged" not in [n.op for n in g.nodes]
    _, want = run_schedule(layer_graph(attn, rope, kvp), attn.state_dict(), seed=5)
    _, got = run_schedule(g, attn.state_dict(), seed=5)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cfg", [Float8Config.dynamic(), Float8Config.static(
    Float8ScaleGranularity.ROWWISE)], ids=["dynamic", "static"])
def test_float8_attention_close_to_dequantized_float32(cfg):
    rope, kvp, f8 = attention(float8_config=cfg, il=False)
    w32 = hf_like_weights(4)
    sd, deq = {}, {}
    for k, v in w32.items():
        base = k.rsplit(".", 1)[0]
        scale = (np.abs(v).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
        q = round_to_f8e4m3fn(v / scale)
        sd[k], sd[base + ".weight_scale"] = q, scale
        if cfg.is_static:
            sd[base + ".input_scale"] = np.array(4.0 / 448, np.float32)
        deq[k] = (q.astype(np.float64) * scale).astype(np.float32)
    f8.load_state_dict(sd)
    rope2, kvp2, ref = attention(il=False)
    ref.load_state_dict(deq)
    a, _ = run_schedule(layer_graph(f8, rope, kvp), f8.state_dict())
    b, _ = run_schedule(layer_graph(ref, rope2, kvp2), ref.state_dict())
    for x, y in zip(a, b):  # only the activations' float8 rounding differs (~2^-4 relative)
        assert np.abs(x - y).max() <= 0.1 * np.abs(y).max()
        assert not np.array_equal(x, y)
