"""GGUF block decoding against the `gguf` package's reference (de)quantizers, bit for bit."""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from graphir.nn.gguf_loader import GGUFTensor, load_gguf, read_gguf  # noqa: E402
from graphir.ops.quant.gguf_blocks import (  # noqa: E402
    GGUF_BLOCK_GEOMETRY,
    dequantize_gguf,
    gguf_block_geometry,
    gguf_row_nbytes,
    gguf_scale_fields,
)
from graphir.ops.quant.gguf_quantize import quantize_gguf  # noqa: E402

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # gguf has quantizers for these
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZED = LEGACY + K_TYPES
FLOATS = ["F32", "F16", "BF16"]
# Byte offsets of the float16 scale fields in each block, from the GGML block definitions.
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
                 "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _weights(rng: np.random.Generator, rows: int, cols: int, low: float = -7) -> np.ndarray:
    """Random signs, magnitudes spread over ~6 decades per row and element; never zero."""
    row_scale = np.exp(rng.uniform(low, 4, (rows, 1)))
    mag = np.exp(rng.uniform(-3, 0, (rows, cols)))
    return (rng.choice([-1.0, 1.0], (rows, cols)) * row_scale * mag).astype(np.float32)


def _random_blocks(rng: np.random.Generator, enc: str, rows: int, cols: int) -> np.ndarray:
    """Random bytes with every scale a finite float16 of random sign and exponent."""
    geo = GGUF_BLOCK_GEOMETRY[enc]
    raw = rng.integers(0, 256, (rows, gguf_row_nbytes(enc, cols)), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, geo.block_bytes)
    for off in SCALE_OFFSETS[enc]:
        exponent = rng.integers(0, 31, blocks.shape[:2]).astype(np.uint8)  # 31 = inf/NaN
        blocks[..., off + 1] = (blocks[..., off + 1] & 0x83) | (exponent << 2)
    return raw


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("enc", QUANTIZED + FLOATS)
def test_geometry_matches_gguf(enc: str) -> None:
    geo = gguf_block_geometry(enc.lower())
    assert (geo.block_elems, geo.block_bytes) == gguf.GGML_QUANT_SIZES[T[enc]]
    assert gguf_block_geometry(T[enc]) is geo


def test_scale_fields() -> None:
    assert {e: sorted(gguf_scale_fields(e).values()) for e in QUANTIZED} == SCALE_OFFSETS
    with pytest.raises(ValueError, match="F16 is a float type; it has no blocks"):
        gguf_scale_fields("F16")


@pytest.mark.parametrize("enc", [*LEGACY, *FLOATS])
@pytest.mark.parametrize("rows,cols", [(1, 256), (7, 512)])
def test_dequantize_equals_gguf_on_gguf_quantized(enc: str, rows: int, cols: int) -> None:
    rng = np.random.default_rng([rows, cols, *enc.encode()])
    w = _weights(rng, rows, cols)
    raw = np.ascontiguousarray(ref_quantize(w, T[enc])).view(np.uint8).reshape(rows, -1)
    ours = dequantize_gguf(raw, enc, cols)
    assert ours.shape == (rows, cols)
    assert _same_bits(ours, ref_dequantize(raw, T[enc]).reshape(rows, cols))


@pytest.mark.parametrize("enc", QUANTIZED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_equals_gguf_on_random_blocks(enc: str, seed: int) -> None:
    # Random bytes reach every nibble, high bit, sign and packed scale pattern, which the K types
    # need since gguf has no quantizer for them.
    rng = np.random.default_rng([seed, len(enc), ord(enc[1]), ord(enc[-1])])
    raw = _random_blocks(rng, enc, 5, 1024)
    assert _same_bits(dequantize_gguf(raw, enc, 1024), ref_dequantize(raw, T[enc]))


# float16 scale values at the edges: zeros of both signs, the smallest subnormal, a subnormal,
# the smallest normal, one, the largest finite value, and negatives.
EDGE_SCALES = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x8001,
                        0xBC00], dtype=np.uint16)


@pytest.mark.parametrize("enc", QUANTIZED)
def test_dequantize_equals_gguf_on_edge_scales(enc: str) -> None:
    rng = np.random.default_rng([7, ord(enc[1]), ord(enc[-1])])
    geo = GGUF_BLOCK_GEOMETRY[enc]
    n = len(EDGE_SCALES)
    raw = _random_blocks(rng, enc, n, n * geo.block_elems)
    blocks = raw.reshape(n, n, geo.block_bytes)
    for k, off in enumerate(SCALE_OFFSETS[enc]):
        # every (row, block) pair gets a different combination of edge values for d and dmin/m
        vals = EDGE_SCALES[(np.arange(n)[:, None] + (k + 1) * np.arange(n)[None, :]) % n]
        blocks[..., off] = (vals & 0xFF).astype(np.uint8)
        blocks[..., off + 1] = (vals >> 8).astype(np.uint8)
    ours = dequantize_gguf(raw, enc, n * geo.block_elems)
    assert np.isfinite(ours).all()
    assert _same_bits(ours, ref_dequantize(raw, T[enc]))


@pytest.mark.parametrize("enc", [*LEGACY, *FLOATS])
def test_quantize_bytes_equal_gguf(enc: str) -> None:
    rng = np.random.default_rng(10 + len(enc))
    w = _weights(rng, 6, 256)
    ref = np.ascontiguousarray(ref_quantize(w, T[enc])).view(np.uint8).reshape(6, -1)
    assert np.array_equal(quantize_gguf(w, enc), ref)


# Bound on |dequant(quant(w)) - w| relative to the max |w| of its block: Q4_0 clips the top code
# (one step, 1/8); Q8_0 half a step (1/254) plus the float16 rounding of d; Q4_K / Q6_K half a
# step plus the 6-bit / 8-bit rounding of the sub-block scales.
# Q4_1 / Q5_x: half a step of 15 / 31 over the block's range (2 max|w|); Q2_K: 3 levels per
# 16-value sub-block with 4-bit sub-block scales; Q3_K: codes -4..3 with the extreme at -4, so a
# value of the opposite sign and equal magnitude clips one step (1/4); Q5_K as Q4_K with 31 levels.
ROUND_TRIP_TOL = {"Q4_0": 0.126, "Q4_1": 0.07, "Q5_0": 0.065, "Q5_1": 0.035, "Q8_0": 0.0045,
                  "Q2_K": 0.4, "Q3_K": 0.26, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}


@pytest.mark.parametrize("enc", QUANTIZED)
def test_quantize_round_trip(enc: str) -> None:
    rng = np.random.default_rng(20 + ord(enc[1]) + len(enc))
    w = _weights(rng, 4, 512, low=-2)  # keeps the float16 scales out of the subnormal range
    raw = quantize_gguf(w, enc)
    assert raw.shape == (4, gguf_row_nbytes(enc, 512))
    ours = dequantize_gguf(raw, enc, 512)
    assert _same_bits(ours, ref_dequantize(raw, T[enc]))
    block = GGUF_BLOCK_GEOMETRY[enc].block_elems
    block_max = np.abs(w).reshape(4, -1, block).max(axis=-1, keepdims=True)
    rel = np.abs(ours - w).reshape(4, -1, block) / block_max
    assert rel.max() < ROUND_TRIP_TOL[enc]
    assert rel.max() > 0  # the quantizer really rounds


@pytest.mark.parametrize("enc,dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_arrays_pass_through(enc: str, dtype: type) -> None:
    w = _weights(np.random.default_rng(3), 3, 8).astype(dtype)
    out = dequantize_gguf(w, enc, 8)
    assert out.dtype == np.float32 and np.array_equal(out, w.astype(np.float32))


def test_empty_rows() -> None:
    assert dequantize_gguf(np.zeros((0, 36), np.uint8), "Q4_0", 64).shape == (0, 64)


def _valid(enc: str = "Q4_0", cols: int = 64) -> np.ndarray:
    return _random_blocks(np.random.default_rng(5), enc, 2, cols)


@pytest.mark.parametrize(
    "make,enc,n_cols,message",
    [
        (lambda: _valid().astype(np.int8), "Q4_0", 64, "Q4_0: raw must have dtype uint8, got int8"),
        (lambda: _valid().view(np.float16), "Q4_0", 64, "raw must have dtype uint8, got float16"),
        (lambda: np.zeros((2, 64)), "F32", 64, "F32: raw must have dtype uint8 or float32, got float64"),
        (lambda: _valid().reshape(-1), "Q4_0", 64, "raw must be 2-D [rows, bytes_per_row], got shape (72,)"),
        (lambda: _valid()[:, :30], "Q4_0", 64, "row byte count 30 is not a multiple of the block size (18 bytes"),
        (lambda: _valid(), "Q4_0", 60, "Q4_0: n_cols=60 is not a multiple of the block size (32 elements"),
        (lambda: _valid()[:, :18], "Q4_0", 64, "Q4_0: truncated data: 64 columns need 36 bytes per row (2 blocks), got 18"),
        (lambda: _valid("Q6_K", 512)[:, :210], "Q6_K", 512, "Q6_K: truncated data: 512 columns need 420 bytes"),
        (lambda: _valid(), "Q4_0", 32, "Q4_0: 32 columns need 18 bytes per row (1 blocks), got 36"),
        (lambda: np.zeros((2, 8), np.float32), "F32", 4, "F32: expected a [rows, 4] float32 array"),
        (lambda: _valid(), "Q8_K", 64, "unsupported GGUF encoding 'Q8_K'"),
        (lambda: [[1, 2]], "Q8_0", 32, "raw must be a numpy array, got list"),
    ],
)
def test_bad_input_raises(make, enc: str, n_cols: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        dequantize_gguf(make(), enc, n_cols)


@pytest.mark.parametrize(
    "enc,offset,field,bits",
    [
        ("Q4_0", 0, "d", 0x7E00),  # NaN
        ("Q4_1", 2, "m", 0x7C00),  # +inf in the offset only
        ("Q5_0", 0, "d", 0xFE00),
        ("Q5_1", 0, "d", 0x7C00),
        ("Q8_0", 0, "d", 0xFC00),  # -inf
        ("Q2_K", 82, "dmin", 0x7E01),
        ("Q3_K", 108, "d", 0x7C00),
        ("Q4_K", 0, "d", 0x7C00),  # +inf
        ("Q4_K", 2, "dmin", 0x7E01),  # NaN in the min scale only
        ("Q5_K", 0, "d", 0xFC00),
        ("Q6_K", 208, "d", 0x7C00),
    ],
)
def test_non_finite_scale_is_corrupt(enc: str, offset: int, field: str, bits: int) -> None:
    geo = GGUF_BLOCK_GEOMETRY[enc]
    raw = _random_blocks(np.random.default_rng(6), enc, 3, 2 * geo.block_elems)
    raw[2, geo.block_bytes + offset] = bits & 0xFF  # row 2, block 1
    raw[2, geo.block_bytes + offset + 1] = bits >> 8
    with pytest.raises(ValueError, match=f"corrupt {enc} data: 1 block.*'{field}'; first at row 2, block 1"):
        dequantize_gguf(raw, enc, 2 * geo.block_elems)


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="Q4_K: cols=128 is not a multiple of the block size"):
        quantize_gguf(np.ones((2, 128), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="Q8_0: weights contain NaN or infinite values"):
        quantize_gguf(np.full((1, 32), np.inf, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="weights must be 2-D"):
        quantize_gguf(np.ones(32, np.float32), "Q8_0")


# --- file loading -------------------------------------------------------------------------------

FILE_TENSORS = [  # name, encoding, logical shape (numpy order)
    ("blk.0.attn_q.weight", "Q4_K", (8, 256)),
    ("blk.0.attn_k.weight", "Q6_K", (4, 512)),
    ("blk.0.attn_v.weight", "Q4_0", (4, 64)),
    ("blk.0.attn_output.weight", "Q8_0", (6, 96)),
    ("blk.0.ffn_experts.weight", "Q8_0", (2, 3, 64)),
    ("blk.1.attn_q.weight", "Q2_K", (2, 256)),
    ("blk.1.attn_k.weight", "Q3_K", (2, 512)),
    ("blk.1.attn_v.weight", "Q5_K", (3, 256)),
    ("blk.1.ffn_up.weight", "Q4_1", (2, 64)),
    ("blk.1.ffn_down.weight", "Q5_0", (2, 32)),
    ("blk.1.ffn_gate.weight", "Q5_1", (3, 96)),
    ("blk.0.attn_norm.weight", "F32", (64,)),
    ("token_embd.weight", "F16", (5, 32)),
    ("output.weight", "BF16", (3, 32)),
]


def _write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for name, (enc, payload) in tensors.items():
        if payload.dtype == np.uint8:
            writer.add_tensor(name, payload, raw_dtype=T[enc])
        else:
            writer.add_tensor(name, payload)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_load_gguf_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(7)
    written: dict[str, tuple[str, np.ndarray]] = {}
    floats: dict[str, np.ndarray] = {}
    for name, enc, shape in FILE_TENSORS:
        w = _weights(rng, int(np.prod(shape[:-1])), shape[-1])
        floats[name] = w
        if enc == "F32":
            payload = w.reshape(shape)
        elif enc == "F16":
            payload = w.astype(np.float16).reshape(shape)
        elif enc in K_TYPES:
            payload = quantize_gguf(w, enc)
        else:
            payload = np.ascontiguousarray(ref_quantize(w, T[enc])).view(np.uint8).reshape(w.shape[0], -1)
        if payload.dtype == np.uint8 and len(shape) == 3:
            payload = payload.reshape(*shape[:-1], -1)  # the writer derives dims from this shape
        written[name] = (enc, payload)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, written)

    loaded = load_gguf(path)
    assert list(loaded) == [t[0] for t in FILE_TENSORS]
    for name, enc, shape in FILE_TENSORS:
        t = loaded[name]
        assert isinstance(t, GGUFTensor) and t.encoding == enc and t.shape == shape
        payload = written[name][1]
        if enc in ("F32", "F16"):
            assert t.data.dtype == payload.dtype and np.array_equal(t.data, payload)
            continue
        rows = int(np.prod(shape[:-1]))
        assert t.data.dtype == np.uint8 and t.data.shape == (rows, gguf_row_nbytes(enc, shape[-1]))
        assert np.array_equal(t.data, payload.reshape(rows, -1))
        ours = dequantize_gguf(t.data, t.encoding, t.shape[-1])
        assert _same_bits(ours, ref_dequantize(payload.reshape(rows, -1), T[enc]))
        tol = max(0.1, ROUND_TRIP_TOL.get(enc, 0))
        assert np.allclose(ours, floats[name], rtol=0, atol=tol * np.abs(floats[name]).max())


def test_load_gguf_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        load_gguf(tmp_path / "missing.gguf")
    raw = np.random.default_rng(8).integers(0, 256, (2, 18), dtype=np.uint8)
    path = tmp_path / "iq.gguf"
    _write_gguf(path, {"w": ("IQ4_NL", raw)})
    with pytest.raises(ValueError, match="tensor 'w': GGUF encoding IQ4_NL is not supported"):
        load_gguf(path)
    f = read_gguf(path)  # the file itself reads; only the tensor is refused
    assert f.unsupported == {"w": "IQ4_NL"} and f.metadata["general.architecture"] == "llama"
    with pytest.raises(ValueError, match="no tensor 'x' \\(for q_proj.weight\\)"):
        f.tensor("x", "q_proj.weight")
