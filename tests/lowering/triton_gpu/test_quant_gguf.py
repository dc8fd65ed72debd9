"""GGUF dequantize-in-the-loop kernels under Triton's interpreter (conftest.py) against the gguf
package's dequantize: every encoding, M = 1, 3, 17 rows, float32 / bfloat16 activations, split-K
and not, and the dequantize kernel bit for bit."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from graphir.lowering.triton_gpu.kernels import quant as qk  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_gguf import FORMATS  # noqa: E402

# Byte offsets of the float16 scale fields in each block (random bytes there could be NaN).
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZED = sorted(F16_FIELDS)


def random_blocks(rng, enc: str, n: int, k: int) -> np.ndarray:
    """GGUF rows [n, row_bytes] of random codes and sub-block scales with finite f16 scales:
    every bit pattern of a block is a valid block, not only what a quantizer emits."""
    f = FORMATS[enc]
    nb = k // f.block_elems
    raw = rng.integers(0, 256, (n, nb, f.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS.get(enc, ()):
        d = (rng.standard_normal((n, nb)) * 0.05).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * f.block_bytes)


def reference(raw: np.ndarray, enc: str) -> np.ndarray:
    return gguf_dequantize(raw, gguf.GGMLQuantizationType[enc]).astype(np.float32)


def float_rows(rng, enc: str, n: int, k: int) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(np.float32)
    if enc == "F16":
        return w.astype(np.float16).view(np.uint8).reshape(n, -1)
    if enc == "BF16":
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, -1)
    return w.view(np.uint8).reshape(n, -1)


def float_reference(raw: np.ndarray, enc: str) -> np.ndarray:
    if enc == "F16":
        return raw.view(np.float16).astype(np.float32)
    if enc == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float32).copy()


@pytest.mark.parametrize("enc", QUANTIZED + ["F16", "BF16", "F32"])
def test_dequantize_kernel_is_bit_exact(enc):
    rng = np.random.default_rng(len(enc) + FORMATS[enc].id)
    k = 512
    raw = random_blocks(rng, enc, 5, k) if enc in F16_FIELDS else float_rows(rng, enc, 5, k)
    want = reference(raw, enc) if enc in F16_FIELDS else float_reference(raw, enc)
    got = qk.launch_dequantize(torch.from_numpy(raw), enc, k).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("enc", QUANTIZED)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matmul_matches_dequantized_product(enc, m):
    rng = np.random.default_rng(10 * m + FORMATS[enc].id)
    n, k = 37, 512   # N not a multiple of the tile, two super-blocks per row
    raw = random_blocks(rng, enc, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = x.astype(np.float64) @ reference(raw, enc).astype(np.float64).T
    got = qk.launch_matmul(torch.from_numpy(x), torch.from_numpy(raw), enc).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("enc,split", [("Q4_0", 3), ("Q4_K", 2), ("Q6_K", 2), ("Q8_0", 5)])
def test_split_k_and_bfloat16(enc, split):
    rng = np.random.default_rng(3)
    n, k, m = 20, 1024, 2
    raw = random_blocks(rng, enc, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
    conf = qk.config_for(m, enc, n, k)
    groups = k // FORMATS[enc].E
    per = -(-groups // split)
    per = -(-per // conf["NG"]) * conf["NG"]
    conf.update(SPLIT_K=-(-groups // per), groups_per_split=per)
    assert conf["SPLIT_K"] > 1
    got = qk.launch_matmul(x, torch.from_numpy(raw), enc, conf=conf).float().numpy()
    w = torch.from_numpy(reference(raw, enc)).to(torch.bfloat16).double().numpy()
    want = x.double().numpy() @ w.T
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2 * np.abs(want).max())


def test_float_encodings_and_tails():
    rng = np.random.default_rng(7)
    for enc in ("F16", "BF16", "F32"):
        raw = float_rows(rng, enc, 9, 48)
        x = rng.standard_normal((3, 48)).astype(np.float32)
        want = x.astype(np.float64) @ float_reference(raw, enc).astype(np.float64).T
        got = qk.launch_matmul(torch.from_numpy(x), torch.from_numpy(raw), enc).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_rows_that_are_not_whole_groups_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        qk.config_for(1, "Q4_K", 64, 384)
    with pytest.raises(ValueError, match="no cuda GGUF decoder"):
        qk.config_for(1, "IQ2_XS", 64, 256)
