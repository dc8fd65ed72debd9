"""GGUF: ops.dequantize / ops.qmatmul against the gguf package, and GGUFQAttentionWithRope loaded
from tiny .gguf files against AttentionWithRope on the dequantized weights."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as ref_dequantize

from graphir import ops
from graphir import DType, Graph, TensorType, parse
from graphir.ops._build import apply
from graphir.ops.quant.gguf_blocks import gguf_scale_fields
from graphir.nn import GGUFQAttentionWithRope, GGUFQLinear
from graphir.ops import QuantizationEncoding
from graphir.runtime.interpreter import InterpreterError, run
from tests.nn.gguf_convert import MIXES, encode
from tests.nn.gguf_layer import D, HIDDEN, NAMES, NH, NKV, kv_manager, layers  # noqa: F401
from tests.nn.harness import LAYER, PAGE, SCHEDULE, layer_graph, step

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] + K_TYPES
ALL = QUANTIZED + ["F16", "BF16", "F32"]


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


@pytest.mark.parametrize("enc", QUANTIZED)
def test_dequantize_op_random_bytes_bit_for_bit(enc):
    # Arbitrary codes and sub-block scales (not only what a quantizer emits); finite f16 scales.
    rng = np.random.default_rng(2)
    geo = gguf.GGML_QUANT_SIZES[T[enc]]
    blocks = rng.integers(0, 256, (3, 2 * geo[1]), dtype=np.uint8)
    per = blocks.reshape(3, 2, -1)
    for off in gguf_scale_fields(enc).values():
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
    with pytest.raises(ValueError, match="unsupported quantization encoding 'IQ4_NL'"):
        build("IQ4_NL", ["n", 32], [8, 18])
    with pytest.raises(ValueError, match="qmatmul: unsupported encoding 'Q8_K'"):
        with Graph("g", input_types=[TensorType(DType.float32, ["n", 256]),
                                     TensorType(DType.uint8, [8, 292])]) as g:
            apply("qmatmul", list(g.inputs), encoding="Q8_K")
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
def write_gguf(path, tensors: dict, arch: str = "llama", **meta) -> None:
    """A .gguf with llama.cpp's attention metadata for the test's shape (`meta` overrides)."""
    writer = gguf.GGUFWriter(str(path), arch)
    kv = dict(block_count=2, context_length=128, embedding_length=HIDDEN, head_count=NH,
              head_count_kv=NKV, rope_freq_base=10000.0, layer_norm_rms_eps=1e-6) | meta
    for key, value in kv.items():
        if value is not None:
            getattr(writer, f"add_{key}")(value)
    for name, (enc, payload) in tensors.items():
        raw = {"raw_dtype": T[enc]} if payload.dtype == np.uint8 else {}
        writer.add_tensor(name, payload, **raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_file(path, enc, seed: int, bias: bool = False, **meta) -> dict:
    """A .gguf with block 1's attention in `enc` (one name, or one per projection; block 0 is
    decoy data); returns the payloads."""
    rng = np.random.default_rng(seed)
    encs = enc if isinstance(enc, dict) else dict.fromkeys(NAMES, enc)
    tensors = {}
    for blk in (0, 1):
        for ours, (theirs, out, n_in) in NAMES.items():
            w = (rng.standard_normal((out, n_in)) * 0.08).astype(np.float32)
            tensors[f"blk.{blk}.{theirs}.weight"] = (encs[ours], encode(w, encs[ours]))
            if bias and ours != "o_proj":
                tensors[f"blk.{blk}.{theirs}.bias"] = ("F32", rng.standard_normal(out)
                                                       .astype(np.float32))
    write_gguf(path, tensors, **meta)
    return tensors


@pytest.mark.parametrize("enc,bias", [(e, False) for e in ALL] + [("Q4_K", True),
                                                                  ("Q4_K_M", True),
                                                                  ("legacy", False)])
def test_layer_from_gguf_matches_float_layer(tmp_path, enc, bias):
    path = tmp_path / f"attn_{enc}.gguf"
    encs = MIXES.get(enc, dict.fromkeys(NAMES, enc))
    tensors = make_file(path, encs, seed=len(enc) + 7 * bias, bias=bias)
    # Built for Q8_0 everywhere: loading adopts each tensor's stored encoding.
    rope, kvp, quant, ref = layers("Q8_0", has_bias=bias)
    quant.load_from_gguf(path, layer=1)
    assert {k: v.value for k, v in quant.quantization_encodings.items()} == encs
    stored = quant.state_dict()
    if encs["k_proj"] in QUANTIZED:
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
        assert repr(gq).count("gir.qmatmul") == 2 and "gir.qmatmul" not in repr(gr)
    elif enc in MIXES:
        # q, k, v in runs of neighbours stored alike (one qmatmul each run), then o_proj
        qkv = [encs[n] for n in ("q_proj", "k_proj", "v_proj")]
        runs = 1 + sum(a != b for a, b in zip(qkv, qkv[1:]))
        assert enc != "Q4_K_M" or runs == 2   # q and k (Q4_K) in one, v (Q6_K)
        assert repr(gq).count("gir.qmatmul") == runs + 1
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


def test_mixed_encodings_have_no_single_wqkv():
    _, _, quant, _ = layers(MIXES["Q4_K_M"])
    assert quant.quantization_encoding is None
    assert quant.quantization_encodings["v_proj"] is QuantizationEncoding.Q6_K
    with pytest.raises(ValueError, match=r"q/k/v are stored in different encodings \(q_proj=Q4_K, "
                                         r"k_proj=Q4_K, v_proj=Q6_K\); there is no single wqkv"):
        with Graph("w", input_types=[]):
            quant.wqkv
    _, _, same, _ = layers({**MIXES["Q4_K_M"], "v_proj": "Q4_K"})
    assert same.quantization_encoding is QuantizationEncoding.Q4_K


def test_layer_errors(tmp_path):
    path = tmp_path / "q8.gguf"
    make_file(path, "Q8_0", seed=3)
    rope, kvp, quant, _ = layers("Q4_0")
    with pytest.raises(ValueError, match=r"q8.gguf: layer must be an int in \[0, 2\), got 5"):
        quant.load_from_gguf(path, layer=5)
    _, _, neox, _ = layers("Q4_0", il=False)
    with pytest.raises(ValueError, match=r"the file's llama attention has interleaved=True \(the "
                                         r"RoPE pairing of the architecture\), this layer has False"):
        neox.load_from_gguf(path, layer=1)
    _, _, biased, _ = layers("Q4_0", has_bias=True)
    with pytest.raises(ValueError, match="has has_bias=False, this layer has True"):
        biased.load_from_gguf(path, layer=1)
    for meta, message in [
        (dict(head_count_kv=4), "has num_key_value_heads=4, this layer has 2"),
        (dict(rope_freq_base=5e5), "the file's rope theta is 500000.0, the layer's rope has 10000"),
        (dict(rope_dimension_count=32), "rope.dimension_count 32 differs from the head size 64"),
        (dict(head_count=None), "GGUF metadata has no 'llama.attention.head_count'"),
    ]:
        make_file(path, "Q8_0", seed=3, **meta)
        with pytest.raises(ValueError, match=message):
            quant.load_from_gguf(path, layer=1)
    make_file(path, "Q8_0", seed=3, arch="gemma2")
    with pytest.raises(ValueError, match="GGUF architecture 'gemma2' is not supported"):
        quant.load_from_gguf(path, layer=1)
    with pytest.raises(ValueError, match="in_dim: Q4_K: n_cols=96 is not a multiple of the "
                                         "block size"):
        GGUFQLinear(96, 8, quantization_encoding="Q4_K")
    with pytest.raises(ValueError, match=r"clip_qkv cannot clamp quantized blocks \(q_proj=Q4_0"):
        layers("Q4_0", clip_qkv=0.5)
    with pytest.raises(ValueError, match=r"needs exactly the keys \['k_proj', 'o_proj', 'q_proj', "
                                         r"'v_proj'\], got \['q_proj'\]"):
        layers({"q_proj": "Q4_K"})
    with pytest.raises(ValueError, match="quantization_encoding of v_proj must be a GGUF "
                                         "encoding, got GPTQ"):
        layers({**MIXES["Q4_K_M"], "v_proj": "GPTQ"})


def test_unsupported_tensor_type_is_named(tmp_path):
    rng = np.random.default_rng(11)
    tensors = make_file(tmp_path / "a.gguf", "Q4_0", seed=4)
    n = HIDDEN // 32 * gguf.GGML_QUANT_SIZES[T.IQ4_NL][1]
    tensors["blk.1.attn_v.weight"] = ("IQ4_NL", rng.integers(0, 256, (NKV * D, n), np.uint8))
    path = tmp_path / "iq.gguf"
    write_gguf(path, tensors)
    _, _, quant, _ = layers("Q4_0")
    quant.load_from_gguf(path, layer=0)  # block 0 does not need the IQ4_NL tensor
    with pytest.raises(ValueError, match="tensor 'blk.1.attn_v.weight': GGUF encoding IQ4_NL is "
                                         "not supported"):
        quant.load_from_gguf(path, layer=1)


def test_from_gguf_reads_the_sliding_window(tmp_path):
    path = tmp_path / "sw.gguf"
    make_file(path, "Q8_0", seed=5, arch="qwen2", bias=True, sliding_window=6)
    attn = GGUFQAttentionWithRope.from_gguf(path, 1, max_seq_len=64, page_size=PAGE)
    assert attn.sliding_window == 6 and attn.rope.interleaved is False and attn.has_bias
    assert attn.mask_variant.name == "SLIDING_WINDOW_CAUSAL_MASK"


def test_truncated_gguf_file(tmp_path):
    path = tmp_path / "t.gguf"
    make_file(path, "Q4_K", seed=9)
    data = path.read_bytes()
    rope, kvp, quant, _ = layers("Q4_K")
    for cut in (100, len(data) - 40):  # inside the last tensor's blocks; inside the header
        path.write_bytes(data[:-cut])
        with pytest.raises(ValueError, match="cannot read the GGUF file"):
            quant.load_from_gguf(path, layer=1)


@pytest.mark.parametrize("enc", ["Q6_K", "Q4_K_M"])
def test_fusion_pass_turns_unfused_into_fused(enc):
    from graphir.passes import run_passes

    texts = []
    for fuse in (True, False):
        rope, kvp, quant, _ = layers(MIXES.get(enc, enc), _fuse_rope_and_store=fuse)
        g = layer_graph(quant, rope, kvp)
        assert ("gir.rope_split_store" in str(g)) == fuse
        run_passes(g, ["fuse-rope-split-store", "canonicalize", "cse", "dce"])
        texts.append(str(g))
    assert texts[0] == texts[1]
