"""GGUF: ops.dequantize / ops.qmatmul against the gguf package, and GGUFQAttentionWithRope loaded
from tiny .gguf files against AttentionWithRope on the dequantized weights."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from graphir import ops
from graphir import DType, Graph, TensorType, parse
from graphir.nn import (AttentionWithRope, GGUFQAttentionWithRope, GGUFQLinear, KVCacheParams,
                RotaryEmbedding)
from graphir.ops import QuantizationEncoding
from graphir.ops.quant.gguf_quantize import quantize_gguf
from graphir.runtime.interpreter import InterpreterError, run
from graphir.runtime.kv_cache import PagedKVCacheManager
from tests.nn.harness import LAYER, LAYERS, PAGE, SCHEDULE, layer_graph, scheduled_manager, step

HIDDEN, NH, NKV, D = 256, 4, 2, 64  # K-quants need rows that are whole 256-value blocks
QUANTIZED = ["Q4_0", "Q8_0", "Q4_K", "Q6_K"]
ALL = QUANTIZED + ["F16", "BF16", "F32"]
NAMES = {"q_proj": ("attn_q", NH * D, HIDDEN), "k_proj": ("attn_k", NKV * D, HIDDEN),
         "v_proj": ("attn_v", NKV * D, HIDDEN), "o_proj": ("attn_output", HIDDEN, NH * D)}


def encode(w: np.ndarray, enc: str) -> np.ndarray:
    """GGUF payload of float rows: the gguf package's quantizer where it has one, ours for K."""
    if enc in ("Q4_K", "Q6_K"):
        return quantize_gguf(w, enc)
    if enc == "F16":
        return w.astype(np.float16)
    if enc == "F32":
        return w
    return np.ascontiguousarray(ref_quantize(w, T[enc])).view(np.uint8).reshape(w.shape[0], -1)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# -- ops --------------------------------------------------------------------------------------
@pytest.mark.parametrize("enc", ALL)
def test_dequantize_op_matches_gguf_bit_for_bit(enc):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    blocks = np.ascontiguousarray(encode(w, enc)).view(np.uint8).reshape(6, -1)
    with Graph("deq", input_types=[TensorType(DType.uint8, list(blocks.shape))]) as g:
        g.output(ops.dequantize(enc, g.inputs[0]))
    (ours,) = run(g, blocks)
    assert ours.dtype == np.float32 and ours.shape == (6, 512)
    assert np.array_equal(bits(ours), bits(ref_dequantize(blocks, T[enc])))


@pytest.mark.parametrize("enc", ["Q4_K", "Q6_K"])
def test_dequantize_op_random_bytes_bit_for_bit(enc):
    # Arbitrary codes and sub-block scales (not only what a quantizer emits); finite f16 scales.
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (3, 2 * (144 if enc == "Q4_K" else 210)), dtype=np.uint8)
    per = blocks.reshape(3, 2, -1)
    scale_at = [0, 2] if enc == "Q4_K" else [208]
    for off in scale_at:
        per[..., off:off + 2] = rng.uniform(-0.1, 0.1, (3, 2)).astype(np.float16)[..., None] \
            .view(np.uint8)
    with Graph("deq", input_types=[TensorType(DType.uint8, list(blocks.shape))]) as g:
        g.output(ops.dequantize(QuantizationEncoding.parse(enc), g.inputs[0]))
    (ours,) = run(g, blocks)
    assert np.array_equal(bits(ours), bits(ref_dequantize(blocks, T[enc])))


@pytest.mark.parametrize("enc", QUANTIZED)
def test_qmatmul_op_vs_float64(enc):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    blocks = encode(w, enc)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    with Graph("qmm", input_types=[TensorType(DType.float32, ["n", 256]),
                                   TensorType(DType.uint8, list(blocks.shape))]) as g:
        g.output(ops.qmatmul(enc, None, *g.inputs))
    (y,) = run(g, x, blocks)
    want = x.astype(np.float64) @ ref_dequantize(blocks, T[enc]).astype(np.float64).T
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_op_type_errors():
    def build(enc, x_shape, w_shape):
        with Graph("g", input_types=[TensorType(DType.float32, x_shape),
                                     TensorType(DType.uint8, w_shape)]) as g:
            g.output(ops.qmatmul(enc, None, *g.inputs))

    with pytest.raises(ValueError, match=r"Q4_K rows of 140 bytes are not whole blocks "
                                         r"\(144 bytes per 256-value block\)"):
        build("Q4_K", ["n", 256], [8, 140])
    with pytest.raises(ValueError, match=r"in_features=96 is not a multiple of the Q4_K block"):
        build("Q4_K", ["n", 96], [8, 144])
    with pytest.raises(ValueError, match=r"hold 256 values, x has in_features=512 \(needs 288"):
        build("Q4_K", ["n", 512], [8, 144])
    with pytest.raises(ValueError, match="unsupported quantization encoding 'Q5_1'"):
        build("Q5_1", ["n", 32], [8, 18])
    with pytest.raises(ValueError, match="Q8_0 takes no quantization config"):
        with Graph("g", input_types=[TensorType(DType.float32, ["n", 32]),
                                     TensorType(DType.uint8, [8, 34])]) as g:
            ops.qmatmul("Q8_0", ops.QuantizationConfig(), *g.inputs)
    with pytest.raises(ValueError, match="Q6_K weight must be uint8"):
        with Graph("g", input_types=[TensorType(DType.int32, [8, 210])]) as g:
            g.output(ops.dequantize("Q6_K", g.inputs[0]))


def test_corrupt_blocks_fail_at_load_and_run():
    rng = np.random.default_rng(4)
    blocks = encode(rng.standard_normal((8, 64)).astype(np.float32), "Q4_0").copy()
    blocks[3, 18:20] = [0x00, 0x7E]  # second block of row 3: scale d = NaN
    lin = GGUFQLinear(64, 8, quantization_encoding="Q4_0")
    with pytest.raises(ValueError, match=r"corrupt Q4_0 data: 1 block\(s\) have a non-finite "
                                         r"scale 'd'; first at row 3, block 1"):
        lin.load_state_dict({"weight": blocks})
    with pytest.raises(ValueError, match=r"truncated data: 64 columns need 36 bytes per row"):
        lin.load_state_dict({"weight": np.zeros((8, 18), np.uint8)})
    with Graph("g", input_types=[TensorType(DType.uint8, [8, 36])]) as g:
        g.output(ops.dequantize("Q4_0", g.inputs[0]))
    with pytest.raises(InterpreterError, match="corrupt Q4_0 data"):
        run(g, blocks)


# -- the layer ----------------------------------------------------------------------------------
def write_gguf(path, tensors: dict) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    for name, (enc, payload) in tensors.items():
        raw = {"raw_dtype": T[enc]} if payload.dtype == np.uint8 else {}
        writer.add_tensor(name, payload, **raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_file(path, enc: str, seed: int, bias: bool = False) -> dict:
    """A .gguf with block 1's attention in `enc` (block 0 is decoy data); returns the payloads."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for blk in (0, 1):
        for ours, (theirs, out, n_in) in NAMES.items():
            w = (rng.standard_normal((out, n_in)) * 0.08).astype(np.float32)
            tensors[f"blk.{blk}.{theirs}.weight"] = (enc, encode(w, enc))
            if bias and ours != "o_proj":
                tensors[f"blk.{blk}.{theirs}.bias"] = ("F32", rng.standard_normal(out)
                                                       .astype(np.float32))
    write_gguf(path, tensors)
    return tensors


def kv_manager() -> PagedKVCacheManager:
    return scheduled_manager(NKV, D)


def layers(enc, **opts):
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=True)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE)
    common = dict(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV, hidden_size=HIDDEN,
                  kv_params=kvp, **opts)
    quant = GGUFQAttentionWithRope(dtype=DType.uint8, quantization_encoding=enc, **common)
    return rope, kvp, quant, AttentionWithRope(**common)


@pytest.mark.parametrize("enc,bias", [(e, False) for e in ALL] + [("Q4_K", True)])
def test_layer_from_gguf_matches_float_layer(tmp_path, enc, bias):
    path = tmp_path / f"attn_{enc}.gguf"
    tensors = make_file(path, enc, seed=len(enc) + 7 * bias, bias=bias)
    rope, kvp, quant, ref = layers(enc, has_bias=bias)
    quant.load_from_gguf(path, layer=1)
    stored = quant.state_dict()
    if enc in QUANTIZED:
        assert stored["q_proj.weight"].dtype == np.uint8
        assert np.array_equal(stored["k_proj.weight"], tensors["blk.1.attn_k.weight"][1])
    float_sd = {}
    for ours, (theirs, _, _) in NAMES.items():
        enc_, payload = tensors[f"blk.1.{theirs}.weight"]
        rows = np.ascontiguousarray(payload).view(np.uint8).reshape(payload.shape[0], -1)
        float_sd[f"{ours}.weight"] = ref_dequantize(rows, T[enc_]).astype(np.float32)
        assert np.array_equal(bits(getattr(quant, ours).dequantized_weight()),
                              bits(float_sd[f"{ours}.weight"]))
        if bias and ours != "o_proj":
            float_sd[f"{ours}.bias"] = tensors[f"blk.1.{theirs}.bias"][1]
    ref.load_state_dict(float_sd)

    gq, gr = layer_graph(quant, rope, kvp), layer_graph(ref, rope, kvp)
    if enc in QUANTIZED:
        assert "gir.qmatmul" in repr(gq) and "gir.qmatmul" not in repr(gr)
        assert str(parse(str(gq))) == str(gq)  # attrs and weight encodings round-trip
    mq, mr = kv_manager(), kv_manager()
    rng = np.random.default_rng(5)
    for seqs, counts in SCHEDULE:
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        yq = step(gq, mq, seqs, counts, x, quant.state_dict())
        yr = step(gr, mr, seqs, counts, x, ref.state_dict())
        np.testing.assert_allclose(yq, yr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mq.blocks, mr.blocks, rtol=1e-5, atol=1e-5)
    assert np.array_equal(mq.blocks[:, :, 1 - LAYER], kv_manager().blocks[:, :, 1 - LAYER])


def test_layer_errors(tmp_path):
    rope, kvp, quant, _ = layers("Q4_0")
    path = tmp_path / "q8.gguf"
    make_file(path, "Q8_0", seed=3)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: stored as Q8_0, the layer's "
                                         "quantization_encoding is Q4_0"):
        quant.load_from_gguf(path, layer=0)
    with pytest.raises(ValueError, match="no tensor 'blk.5.attn_q.weight'"):
        quant.load_from_gguf(path, layer=5)
    with pytest.raises(ValueError, match="interleaved RoPE"):
        GGUFQAttentionWithRope(rope=RotaryEmbedding(HIDDEN, NH, 1e4, 64, head_dim=D,
                                                    interleaved=False),
                               num_attention_heads=NH, num_key_value_heads=NKV,
                               hidden_size=HIDDEN, kv_params=kvp, dtype=DType.uint8,
                               quantization_encoding="Q4_0")
    with pytest.raises(ValueError, match="in_dim: Q4_K: n_cols=96 is not a multiple of the "
                                         "block size"):
        GGUFQLinear(96, 8, quantization_encoding="Q4_K")
    with pytest.raises(ValueError, match="clip_qkv cannot clamp Q4_0 blocks"):
        layers("Q4_0", clip_qkv=0.5)


def test_truncated_gguf_file(tmp_path):
    path = tmp_path / "t.gguf"
    make_file(path, "Q4_K", seed=9)
    data = path.read_bytes()
    rope, kvp, quant, _ = layers("Q4_K")
    for cut in (100, len(data) - 40):  # inside the last tensor's blocks; inside the header
        path.write_bytes(data[:-cut])
        with pytest.raises(ValueError, match="cannot read the GGUF file"):
            quant.load_from_gguf(path, layer=1)


def test_fusion_pass_turns_unfused_into_fused():
    from graphir.passes import run_passes

    texts = []
    for fuse in (True, False):
        rope, kvp, quant, _ = layers("Q6_K", _fuse_rope_and_store=fuse)
        g = layer_graph(quant, rope, kvp)
        assert ("gir.rope_split_store" in str(g)) == fuse
        run_passes(g, ["fuse-rope-split-store", "canonicalize", "cse", "dce"])
        texts.append(str(g))
    assert texts[0] == texts[1]
