"""Quantized-weight ops and the float8 path compiled for the CPU match the interpreter.

GGUF blocks come from the gguf package's quantizer (Q4_0, Q8_0), ours (the others) and random
bytes with finite scales (every code and sub-block scale pattern); GPTQ weights from the
independent AutoGPTQ-layout packer of tests/nn/test_gptq_attention.py. Decoded weights must be
bit-identical; products agree to f32 accumulation error. qmatmul runs its register path (fewer
rows than the tile path's MR, and the rows / columns the tiles leave) and its tile path (MR-row
blocks against a decoded tile): row counts 1, 3, MR, 2 MR + 5 and column counts with and without
a partial panel cover both, and the kernel never holds a float copy of the weight.
"""
import numpy as np
import pytest

from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType
from graphir.dtype import round_to
from graphir.nn import GPTQLinear
from graphir.nn.float8_config import Float8Config
from graphir.nn.linear import Linear
from graphir.ops import QuantizationConfig
from graphir.ops.quant.gguf_quantize import quantize_gguf
from graphir.runtime.interpreter import run

from .harness import assert_matches_interpreter, execute

pytest.importorskip("mlir.ir")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as T  # noqa: E402

K = 512
QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of every block's float16 scale fields (random bytes elsewhere)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _mr() -> int:
    from graphir.lowering.mlir_cpu.cpu_target import host_target
    from graphir.lowering.mlir_cpu.lowerings.quant_kernels import QuantTiles

    cpu = host_target()
    return QuantTiles.pick(cpu.f32_lanes, cpu.vector_registers).mr


def _encode(rng, enc: str, rows: int) -> np.ndarray:
    w = (rng.standard_normal((rows, K)) * rng.uniform(0.05, 3, (rows, 1))).astype(np.float32)
    if enc in ("Q4_0", "Q8_0"):
        return np.ascontiguousarray(gguf_quants.quantize(w, T[enc])).view(np.uint8).reshape(rows, -1)
    if enc in QUANTIZED:
        return quantize_gguf(w, enc)
    if enc == "F32":
        return w.view(np.uint8)
    if enc == "F16":
        return w.astype(np.float16).view(np.uint8)
    return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16


def _random_blocks(rng, enc: str, rows: int) -> np.ndarray:
    """Random bytes in every code and packed-scale field, finite float16 scales."""
    from graphir.ops.quant.gguf_blocks import gguf_block_geometry

    geo = gguf_block_geometry(enc)
    n = K // geo.block_elems
    blocks = rng.integers(0, 256, (rows, n, geo.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[enc]:
        blocks[..., off:off + 2] = rng.uniform(-0.1, 0.1, (rows, n)).astype(np.float16)[
            ..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def _compare(graph, inputs, exact: set[int], weights=None, tol=1e-5):
    want = run(graph, *inputs, weights=weights)
    got = execute("cpu", graph, *inputs, weights=weights)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape)
        if i in exact:
            assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), f"output {i} not exact"
        else:
            # f32 accumulation against float64: error relative to the row's magnitude
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, np.abs(w).max()),
                                       err_msg=f"output {i}")


@pytest.mark.parametrize("enc", QUANTIZED + ["F32", "F16", "BF16"])
def test_gguf_dequantize_and_qmatmul(enc):
    rng = np.random.default_rng(QUANTIZED.index(enc) if enc in QUANTIZED else len(enc))
    # 72 output rows: two whole panels and a partial one on every target; 24: no whole panel
    blocks = [_encode(rng, enc, 72), _encode(rng, enc, 24)]
    if enc in QUANTIZED:
        blocks.append(_random_blocks(rng, enc, 72))
    types = [TensorType(DType.float32, ["n", K])] + [TensorType(DType.uint8, list(b.shape))
                                                    for b in blocks]
    with Graph("gguf", input_types=types) as g:
        x, *ws = g.inputs
        outs = []
        for w in ws:
            outs += [ops.dequantize(enc, w), ops.qmatmul(enc, None, x, w)]
        g.output(*outs)
    from graphir.runtime.session import InferenceSession

    model = InferenceSession().load(g, weights={})
    for m in (1, 3, _mr(), 2 * _mr() + 5):   # register path, tile path, both
        x = rng.standard_normal((m, K)).astype(np.float32)
        want, got = run(g, x, *blocks), model.execute(x, *blocks)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape)
            if i % 2 == 0:   # decoded weights: bit for bit
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{enc} output {i}"
            else:
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()),
                                           err_msg=f"{enc} rows {m} output {i}")


@pytest.mark.parametrize("dt", [DType.bfloat16, DType.float16])
def test_qmatmul_narrow_and_batched_activations(dt):
    rng = np.random.default_rng(1)
    b4, b6 = _encode(rng, "Q4_K", 32), _encode(rng, "Q6_K", 24)
    with Graph("q", input_types=[TensorType(dt, [2, "n", K]), TensorType(DType.uint8, list(b4.shape)),
                                 TensorType(DType.uint8, list(b6.shape))]) as g:
        x, w4, w6 = g.inputs
        g.output(ops.qmatmul("Q4_K", None, x, w4), ops.qmatmul("Q6_K", None, x, w6))
    x = round_to(rng.standard_normal((2, 3, K)) * 0.2, dt).astype(np.float32 if dt is DType.bfloat16
                                                                  else np.float16)
    assert_matches_interpreter(g, x, b4, b6, rtol=2e-2, atol=2e-2)


def _gptq_linear(rng, name, n_out, gs, sym, desc, fmt, bits=4):
    from tests.nn.test_gptq_attention import make_g_idx, pack_nibbles, quantize

    ckpt, _ = quantize(rng, 128, n_out, gs, sym, make_g_idx(rng, 128, gs, desc), bits=bits)
    if fmt == "gptq_v2":  # v2 stores the zero point itself, not zero - 1
        words = ckpt["qzeros"].view(np.uint32)
        codes = ((words[:, :, None] >> np.arange(0, 32, bits, dtype=np.uint32))
                 & ((1 << bits) - 1)).reshape(words.shape[0], -1) + 1
        ckpt["qzeros"] = pack_nibbles(codes, 1, bits)
    cfg = QuantizationConfig(bits=bits, group_size=gs, desc_act=desc, sym=sym,
                             checkpoint_format=fmt)
    lin = GPTQLinear(128, n_out, quantization_config=cfg, name=name, has_bias=name == "a")
    if name == "a":
        ckpt["bias"] = rng.standard_normal(n_out).astype(np.float32)
    lin.load_state_dict({f"{name}.{k}": v for k, v in lin.convert_checkpoint(ckpt).items()})
    return lin


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_qmatmul_variants(bits):
    rng = np.random.default_rng(2 + bits)
    # (name, out, group, sym, desc_act, format): 24 / 16 outputs take the register path only,
    # 64 whole panels, 96 panels and a partial one; a group of 4 (4-bit) or 2 (8-bit) values
    # is not a whole int32 word
    specs = [("a", 32, 32, False, True, "gptq"), ("b", 24, 64, True, False, "gptq"),
             ("c", 16, -1, False, False, "gptq_v2"), ("d", 48, 32, True, True, "gptq"),
             ("e", 16, 128, False, True, "gptq_v2"), ("f", 64, 16, False, False, "gptq"),
             ("g", 96, 16 // bits, True, True, "gptq"), ("h", 96, 128, False, True, "gptq_v2")]
    if bits == 8:  # asymmetric 8-bit zero points pack 4 a word: 4 outputs take vectors of 4
        specs.append(("i", 36, 32, False, False, "gptq"))
    lins = [_gptq_linear(rng, *s, bits=bits) for s in specs]
    with Graph("gptq", input_types=[TensorType(DType.float32, ["n", 128])]) as g:
        g.output(*[lin(g.inputs[0]) for lin in lins])
    assert str(g).count("gir.qmatmul") == len(specs)
    weights = {k: v for lin in lins for k, v in lin.state_dict().items()}
    from graphir.runtime.session import InferenceSession

    model = InferenceSession().load(g, weights=weights)
    for m in (1, 7, _mr(), 2 * _mr() + 3):
        x = rng.standard_normal((m, 128)).astype(np.float32)
        for i, (a, b) in enumerate(zip(model.execute(x), run(g, x, weights=weights))):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()),
                                       err_msg=f"rows {m}, layer {specs[i][0]}")


@pytest.mark.parametrize("enc", ["Q4_K", "Q8_0", "GPTQ", "GPTQ8"])
def test_qmatmul_kernel_holds_no_float_copy_of_the_weight(enc):
    """Every f32 buffer of the qmatmul kernel is a tile: none is near the weight's size."""
    import re

    from graphir import Weight
    from graphir.lowering.mlir_cpu.backend import emit_module
    from graphir.ops.quant.gguf_blocks import gguf_row_nbytes
    from graphir.ops.quant.gptq_layout import gptq_weight_rows

    n, k = 512, 2048
    with Graph("q", input_types=[TensorType(DType.float32, ["t", k])]) as g:
        if enc.startswith("GPTQ"):
            bits = 8 if enc == "GPTQ8" else 4
            w = Weight("w", DType.uint8, [gptq_weight_rows(k, 128, bits), n])
            y = ops.qmatmul("GPTQ", QuantizationConfig(group_size=128, bits=bits),
                            g.inputs[0], w)
        else:
            w = Weight("w", DType.uint8, [n, gguf_row_nbytes(enc, k)])
            y = ops.qmatmul(enc, None, g.inputs[0], w)
        g.output(y)
    ctx, module, plan = emit_module(g)
    with ctx:
        text = str(module)
    assert [s.op for s in plan.steps] == ["qmatmul"]
    sizes = []
    for dims in re.findall(r"(?:memref|tensor)<([0-9?x]+)xf32", text):
        static = [int(d) for d in dims.split("x") if d != "?"]
        sizes.append(int(np.prod(static)) if static else 0)
    assert sizes and max(sizes) <= n * k // 8, (max(sizes), n * k)


@pytest.mark.parametrize("enc", ["Q4_K", "Q5_K", "Q6_K", "Q4_0"])
def test_gguf_row_path_scales_and_prefetch(enc):
    """The row path (a decode step) prefetches the weight rows ahead; the K-quants with 6-bit
    packed scales read each sub-block's scale from the table of small integers (one broadcast
    load, no vector decode of the scales), the others decode their scale vectors."""
    from graphir.lowering.mlir_cpu.lowerings.quant_decoders import TABLE, decoder_for
    from graphir.lowering.mlir_cpu.lowerings.quant_gguf import gguf_matmul_text
    from graphir.lowering.mlir_cpu.lowerings.quant_kernels import QuantTiles
    from graphir.ops.quant.gguf_blocks import gguf_row_nbytes

    n = 40   # fewer rows than one panel: the row path only
    text = gguf_matmul_text(f"tensor<?x{K}xf32>", f"tensor<{n}x{gguf_row_nbytes(enc, K)}xi8>",
                            f"tensor<?x{n}xf32>", decoder_for(enc, K), K, n,
                            QuantTiles.pick(16, 32))
    assert "memref.prefetch" in text
    assert (f"memref<{TABLE}xf32>" in text) == (enc in ("Q4_K", "Q5_K"))


def test_float8_conversions_exact():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 64)) * np.exp2(rng.integers(-14, 10, (6, 64)))).astype(np.float32)
    x[0, :8] = [0.0, -0.0, np.nan, np.inf, -np.inf, 448.0, 464.0, 1e6]
    x[1, :8] = [2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -6, -1.5 * 2.0 ** -7, 1e-30,
                15 * 2.0 ** -10, 0.30078125]  # ties to even, subnormals, the smallest normal
    codes = np.arange(256, dtype=np.uint8).reshape(4, 64)
    from graphir.dtype import from_bits

    with Graph("f8", input_types=[TensorType(DType.float32, ["n", 64]),
                                  TensorType(DType.float8_e4m3fn, [4, 64])]) as g:
        xv, c = g.inputs
        q = ops.cast(xv, DType.float8_e4m3fn)
        g.output(q, ops.cast(q, DType.float32), ops.cast(c, DType.float32),
                 ops.cast(c, DType.bfloat16), ops.cast(ops.cast(xv, DType.bfloat16),
                                                       DType.float8_e4m3fn))
    got = assert_matches_interpreter(g, x, from_bits(codes, DType.float8_e4m3fn), rtol=0, atol=0)
    assert np.isnan(got[2]).sum() == 2  # 0x7F and 0xFF


@pytest.mark.parametrize("cfg", [Float8Config.static(), Float8Config.dynamic()],
                         ids=["static", "dynamic"])
def test_float8_linear(cfg):
    rng = np.random.default_rng(4)
    lin = Linear(64, 32, DType.float32, DeviceRef.CPU(), has_bias=True, float8_config=cfg)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    rowwise = cfg.weight_scale.granularity.value == "rowwise"
    scale = (np.abs(w).max(axis=1, keepdims=True) if rowwise else np.abs(w).max()) / 448.0
    sd = {"weight": round_to(w / scale, DType.float8_e4m3fn),
          "weight_scale": np.asarray(scale, np.float32), "bias": rng.standard_normal(32)
          .astype(np.float32)}
    if cfg.is_static:
        sd["input_scale"] = np.asarray(0.02, np.float32)
    lin.load_state_dict(sd)
    with Graph("f8lin", input_types=[TensorType(DType.float32, ["n", 64])]) as g:
        g.output(lin(g.inputs[0]))
    x = rng.standard_normal((6, 64)).astype(np.float32)
    assert_matches_interpreter(g, x, weights=lin.state_dict(), rtol=1e-4, atol=1e-4)
