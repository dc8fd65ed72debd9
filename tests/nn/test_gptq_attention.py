"""GPTQ: random weights quantized and packed by an independent packer (AutoGPTQ layout), saved to
safetensors, loaded into GPTQAttentionWithRope and run against AttentionWithRope on the
dequantized weights; ops.qmatmul and the loaders' errors."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from graphir import ops
from graphir import DType, Graph, TensorType, parse
from graphir.nn import (AttentionWithRope, GPTQAttentionWithRope, GPTQLinear, KVCacheParams,
                RotaryEmbedding)
from graphir.ops import QuantizationConfig
from graphir.runtime.interpreter import run
from graphir.runtime.kv_cache import PagedKVCacheManager
from tests.nn.harness import LAYER, LAYERS, PAGE, SCHEDULE, layer_graph, scheduled_manager, step

HIDDEN, NH, NKV, D = 256, 4, 2, 64
PROJ = {"q_proj": (HIDDEN, NH * D), "k_proj": (HIDDEN, NKV * D), "v_proj": (HIDDEN, NKV * D),
        "o_proj": (NH * D, HIDDEN)}
PREFIX = "model.layers.3.self_attn."


# -- an independent GPTQ quantizer / packer (AutoGPTQ v1 storage: qzeros hold zero - 1) --------
def make_g_idx(rng, n_in: int, gs: int, desc_act: bool) -> np.ndarray:
    size = n_in if gs == -1 else gs
    g = np.arange(n_in) // size
    return (rng.permutation(g) if desc_act else g).astype(np.int32)


def pack_nibbles(codes: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """32 / bits codes per int32 word along `axis`, code k of a word in bits bits*k.. ."""
    per = 32 // bits
    c = np.moveaxis(codes.astype(np.uint64), axis, 0)
    words = np.zeros((c.shape[0] // per,) + c.shape[1:], np.uint64)
    for k in range(per):
        words |= c[k::per] << np.uint64(bits * k)
    # contiguous: safetensors.numpy writes a strided view's memory order, not its logical one
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis))


def quantize(rng, n_in, n_out, gs, sym, g_idx, bits=4, w=None):
    """Checkpoint tensors of (random or given [in, out]) weights and the float [out, in] weight
    they decode to."""
    top = 2**bits - 1
    w = rng.standard_normal((n_in, n_out)) * 0.1 if w is None else w
    n_groups = int(g_idx.max()) + 1
    scales = np.zeros((n_groups, n_out), np.float16)
    zeros = np.full((n_groups, n_out), 2 ** (bits - 1), np.int64)
    codes = np.zeros((n_in, n_out), np.int64)
    for g in range(n_groups):
        rows = w[g_idx == g]
        if sym:
            scale = (2 * np.abs(rows).max(axis=0) / top).astype(np.float16)
        else:
            lo, hi = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
            scale = ((hi - lo) / top).astype(np.float16)
            zeros[g] = np.clip(np.round(-lo / scale.astype(np.float64)), 1, top)
        scales[g] = scale
        codes[g_idx == g] = np.clip(np.round(rows / scale.astype(np.float64)) + zeros[g], 0, top)
    deq = (codes - zeros[g_idx]) * scales.astype(np.float64)[g_idx]
    assert np.abs(deq - w).max() < 0.6 * np.abs(w).max()  # the packer quantizes sensibly
    ckpt = {"qweight": pack_nibbles(codes, 0, bits), "scales": scales, "g_idx": g_idx,
            "qzeros": pack_nibbles(zeros - 1, 1, bits)}  # v1 stores zero - 1, also when sym
    return ckpt, deq.T.astype(np.float32)


def checkpoint(seed, gs, sym, desc_act, bits=4, bias=False):
    rng = np.random.default_rng(seed)
    g_in = make_g_idx(rng, HIDDEN, gs, desc_act)  # q, k, v see the same inputs: one order
    tensors, floats = {}, {}
    for name, (n_in, n_out) in PROJ.items():
        g = g_in if name != "o_proj" else make_g_idx(rng, n_in, gs, desc_act)
        ckpt, floats[f"{name}.weight"] = quantize(rng, n_in, n_out, gs, sym, g, bits)
        if bias and name != "o_proj":  # checkpoints store biases in float16
            ckpt["bias"] = rng.standard_normal(n_out).astype(np.float16)
            floats[f"{name}.bias"] = ckpt["bias"].astype(np.float32)
        tensors.update({f"{PREFIX}{name}.{k}": v for k, v in ckpt.items()})
    tensors["model.layers.3.mlp.up_proj.qweight"] = np.ones((4, 8), np.int32)  # not ours
    return tensors, floats


# -- the layer ----------------------------------------------------------------------------------
def kv_manager() -> PagedKVCacheManager:
    return scheduled_manager(NKV, D)


def build(cfg, fuse=True, bias=False):
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=False)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE)
    quant = GPTQAttentionWithRope(cfg, rope, NH, NKV, HIDDEN, kvp, has_bias=bias,
                                  _fuse_rope_and_store=fuse)
    ref = AttentionWithRope(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV,
                            hidden_size=HIDDEN, kv_params=kvp, has_bias=bias)
    return rope, kvp, quant, ref


def loaded_layer(sym: bool, desc_act: bool, bits: int = 4):
    """(rope, kv params, the GPTQ layer) loaded from checkpoint(5, group 64)'s tensors."""
    tensors, _ = checkpoint(5, 64, sym, desc_act, bits=bits)
    rope, kvp, quant, _ = build(QuantizationConfig(group_size=64, desc_act=desc_act, sym=sym,
                                                   bits=bits))
    quant.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items()
                           if k.startswith(PREFIX)})
    return rope, kvp, quant


CASES = [(gs, sym, desc, 4, False) for gs in (32, 64, 128, -1) for sym in (True, False)
         for desc in (False, True)]
CASES += [(128, True, False, 8, True), (32, False, True, 8, False), (-1, True, True, 8, True),
          (64, False, False, 4, True)]


@pytest.mark.parametrize("gs,sym,desc_act,bits,bias", CASES)
def test_layer_from_safetensors_matches_float_layer(tmp_path, gs, sym, desc_act, bits, bias):
    tensors, floats = checkpoint(abs(gs) * 4 + 2 * sym + desc_act + bits, gs, sym, desc_act,
                                 bits, bias)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    cfg = QuantizationConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym)
    rope, kvp, quant, ref = build(cfg, fuse=gs != 64, bias=bias)
    quant.load_safetensors(path, PREFIX, strict=False)
    ref.load_state_dict(floats)
    sd = quant.state_dict()
    assert sd["q_proj.weight"].dtype == np.uint8
    assert ("q_proj.qzeros" in sd) == (not sym) and ("q_proj.perm_idx" in sd) == desc_act
    assert sd["q_proj.weight"].shape == (HIDDEN * bits // 8 + 2 * cfg.groups(HIDDEN), NH * D)
    assert ("q_proj.bias" in sd) == bias

    gq, gr = layer_graph(quant, rope, kvp), layer_graph(ref, rope, kvp)
    assert repr(gq).count("gir.qmatmul") == 2  # fused q|k|v, then o_proj
    assert str(parse(str(gq))) == str(gq)  # attrs and weight encodings round-trip
    mq, mr = kv_manager(), kv_manager()
    rng = np.random.default_rng(6)
    for seqs, counts in SCHEDULE:
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        yq = step(gq, mq, seqs, counts, x, sd)
        yr = step(gr, mr, seqs, counts, x, ref.state_dict())
        np.testing.assert_allclose(yq, yr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mq.blocks, mr.blocks, rtol=1e-5, atol=1e-5)
    assert np.array_equal(mq.blocks[:, :, 1 - LAYER], kv_manager().blocks[:, :, 1 - LAYER])


@pytest.mark.parametrize("bits", [4, 8])
def test_wqkv_joins_packed_codes_then_scales(bits):
    tensors, _ = checkpoint(1, 64, True, False, bits)
    cfg = QuantizationConfig(bits=bits, group_size=64, sym=True)
    _, _, quant, _ = build(cfg)
    quant.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items()
                           if k.startswith(PREFIX)})
    with Graph("w", input_types=[]) as g:
        g.output(quant.wqkv)
    (wqkv,) = run(g, weights=quant.state_dict())
    qkv = ("q_proj", "k_proj", "v_proj")
    qweight = np.concatenate([tensors[f"{PREFIX}{p}.qweight"] for p in qkv], axis=1)
    scales = np.concatenate([tensors[f"{PREFIX}{p}.scales"] for p in qkv], axis=1)
    want = np.frombuffer(qweight.astype("<i4").tobytes() + scales.astype("<f2").tobytes(),
                         np.uint8).reshape(-1, (NH + 2 * NKV) * D)
    assert wqkv.shape == (HIDDEN * bits // 8 + 2 * 4, (NH + 2 * NKV) * D)
    assert np.array_equal(wqkv, want)


# -- the op and the linear ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_linear_vs_numpy(fmt):
    rng = np.random.default_rng(8)
    g_idx = make_g_idx(rng, 128, 32, True)
    ckpt, w = quantize(rng, 128, 16, 32, False, g_idx)
    if fmt == "gptq_v2":  # v2 stores the zero point itself
        codes = ((ckpt["qzeros"].view(np.uint32)[:, :, None] >> np.arange(0, 32, 4, dtype=np.uint32))
                 & 15).reshape(-1, 16) + 1
        ckpt["qzeros"] = pack_nibbles(codes, 1)
    lin = GPTQLinear(128, 16, quantization_config=QuantizationConfig(
        group_size=32, desc_act=True, sym=False, checkpoint_format=fmt), has_bias=True)
    bias = rng.standard_normal(16).astype(np.float32)
    lin.load_state_dict({**ckpt, "bias": bias})
    x = rng.standard_normal((7, 128)).astype(np.float32)
    with Graph("lin", input_types=[TensorType(DType.float32, ["n", 128])]) as g:
        g.output(lin(g.inputs[0]))
    (y,) = run(g, x, weights=lin.state_dict())
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64) + bias,
                               rtol=1e-6, atol=1e-6)


def test_errors():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="group_size must be a positive int or -1, got 0"):
        QuantizationConfig(group_size=0)
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 8\) \(4- and 8-bit GPTQ\), "
                                         r"got bits=3"):
        QuantizationConfig(bits=3)
    with pytest.raises(ValueError, match="in_features=256 is not divisible by group_size=96"):
        GPTQLinear(256, 64, quantization_config=QuantizationConfig(group_size=96))
    with pytest.raises(ValueError, match="out_dim=12 must be a multiple of 8"):
        GPTQLinear(256, 12, quantization_config=QuantizationConfig())
    with pytest.raises(ValueError, match="out_dim=6 must be a multiple of 4 \\(packed 8-bit"):
        GPTQLinear(256, 6, quantization_config=QuantizationConfig(bits=8))
    ckpt8, _ = quantize(rng, 128, 16, 32, True, make_g_idx(rng, 128, 32, False), bits=8)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[16, 16\] \(8 4-bit codes per "
                                         r"int32\), got int32 \(32, 16\)"):
        GPTQLinear(128, 16, quantization_config=QuantizationConfig(group_size=32)) \
            .load_state_dict(ckpt8)

    cfg = QuantizationConfig(group_size=32, desc_act=True, sym=False)
    ckpt, _ = quantize(rng, 128, 16, 32, False, make_g_idx(rng, 128, 32, True))
    lin = GPTQLinear(128, 16, quantization_config=cfg)
    bad = ckpt["g_idx"].copy()
    bad[np.flatnonzero(bad == 0)[0]] = 1  # group 0 loses a row, group 1 gains one
    with pytest.raises(ValueError, match=r"g_idx is not a permutation of groups: g_idx assigns "
                                         r"31 rows to group 0"):
        lin.load_state_dict({**ckpt, "g_idx": bad})
    with pytest.raises(ValueError, match=r"g_idx\[\d+\] = 4 is not a group id"):
        lin.load_state_dict({**ckpt, "g_idx": np.where(bad == 1, 4, ckpt["g_idx"])})
    with pytest.raises(ValueError, match="scales has shape \\(2, 16\\), expected \\(4, 16\\)"):
        lin.load_state_dict({**ckpt, "scales": ckpt["scales"][:2]})
    with pytest.raises(ValueError, match="g_idx is not the plain order i // group_size"):
        GPTQLinear(128, 16, quantization_config=QuantizationConfig(group_size=32, sym=False)) \
            .load_state_dict(ckpt)
    with pytest.raises(ValueError, match="sym=True but qzeros hold zero points other than 8"):
        GPTQLinear(128, 16, quantization_config=QuantizationConfig(group_size=32, desc_act=True)) \
            .load_state_dict(ckpt)
    asym8, _ = quantize(rng, 128, 16, 32, False, make_g_idx(rng, 128, 32, False), bits=8)
    with pytest.raises(ValueError, match="sym=True but qzeros hold zero points other than 128"):
        GPTQLinear(128, 16, quantization_config=QuantizationConfig(bits=8, group_size=32)) \
            .load_state_dict(asym8)
    with pytest.raises(ValueError, match=r"8-bit GPTQ weight must be uint8 \[264, out\] \(256 "
                                         r"rows of packed codes \+ 8 of float16 scales"):
        with Graph("g", input_types=[TensorType(DType.float32, ["n", 256]),
                                     TensorType(DType.uint8, [136, 16])]) as g:
            ops.qmatmul("GPTQ", QuantizationConfig(bits=8, group_size=64), *g.inputs)
    with pytest.raises(ValueError, match="missing checkpoint tensors \\['qzeros'\\]"):
        lin.load_state_dict({k: v for k, v in ckpt.items() if k != "qzeros"})

    for bad, shown in ((np.nan, "nan"), (np.inf, "inf"), (np.float32(1e5), "100000.0")):
        sc = ckpt["scales"].astype(np.float32)
        sc[1, 2] = bad
        with pytest.raises(ValueError, match=rf"scales hold 1 value\(s\) that are not finite as "
                                             rf"float16; first at group 1, column 2 \({shown}"):
            lin.load_state_dict(dict(ckpt, scales=sc))

    tensors, _ = checkpoint(2, 32, True, True)
    _, _, quant, _ = build(QuantizationConfig(group_size=32, desc_act=True))
    sd = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    sd["k_proj.g_idx"] = make_g_idx(rng, HIDDEN, 32, True)
    with pytest.raises(ValueError, match="different g_idx orders"):
        quant.load_state_dict(sd)

    with pytest.raises(ValueError, match=r"GPTQ weight must be uint8 \[136, out\] \(128 rows of "
                                         r"packed codes \+ 8 of float16 scales"):
        with Graph("g", input_types=[TensorType(DType.float32, ["n", 256]),
                                     TensorType(DType.uint8, [130, 16])]) as g:
            ops.qmatmul("GPTQ", QuantizationConfig(group_size=64), *g.inputs)
    with pytest.raises(ValueError, match="in_features=256 is not divisible by group_size=96"):
        with Graph("g", input_types=[TensorType(DType.float32, ["n", 256]),
                                     TensorType(DType.uint8, [130, 16])]) as g:
            ops.qmatmul("GPTQ", QuantizationConfig(group_size=96), *g.inputs)
    with pytest.raises(ValueError, match="takes x, weight, qzeros, perm, got 2 operands"):
        with Graph("g", input_types=[TensorType(DType.float32, ["n", 256]),
                                     TensorType(DType.uint8, [136, 16])]) as g:
            ops.qmatmul("GPTQ", QuantizationConfig(group_size=64, sym=False, desc_act=True),
                        *g.inputs)


def test_fusion_pass_turns_unfused_into_fused():
    from graphir.passes import run_passes

    texts = []
    for fuse in (True, False):
        rope, kvp, quant, _ = build(QuantizationConfig(group_size=64, desc_act=True, sym=False),
                                    fuse=fuse)
        g = layer_graph(quant, rope, kvp)
        assert ("gir.rope_split_store" in str(g)) == fuse
        run_passes(g, ["fuse-rope-split-store", "canonicalize", "cse", "dce"])
        texts.append(str(g))
    assert texts[0] == texts[1]
