"""The Triton kernels on the CPU (Triton interpreter, see conftest.py) vs float64 numpy.

The paged decode kernels have their own files: test_paged_decode*.py; the prefill attention
kernel: test_flash_attention*.py."""

import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import matmul as mm
from graphir.lowering.triton_gpu.kernels import rms_norm as rn
from graphir.lowering.triton_gpu.kernels import rope_split_store as rss
from tests.lowering.triton_gpu.test_flash_attention import paged_problem

# The interpreter turns 1-element index arrays into ints with a numpy DeprecationWarning.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def f64(x):
    return x.detach().to(torch.float64).numpy()


def close(got, want, dtype, scale=1.0):
    np.testing.assert_allclose(f64(got), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


# ---------------------------------------------------------------- references (float64 numpy)
def freqs_cis_np(head_dim, max_seq_len, theta=10000.0):
    inv = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(
        np.float32)
    t = np.arange(2 * max_seq_len, dtype=np.float32)
    ang = (t[:, None] * inv[None, :]).astype(np.float64)
    return np.stack([np.cos(ang), np.sin(ang)], axis=-1).reshape(2 * max_seq_len, head_dim)


def rms_ref(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_ref(x, pos, freqs, interleaved):
    """x [T, H, D] float64, pos [T] int."""
    D = x.shape[-1]
    cos = freqs[pos][:, None, 0::2]
    sin = freqs[pos][:, None, 1::2]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : D // 2], x[..., D // 2:]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : D // 2], out[..., D // 2:] = ra, rb
    return out


def token_positions(offs, cache_lens):
    seq, pos = [], []
    for b in range(len(offs) - 1):
        n = offs[b + 1] - offs[b]
        seq += [b] * n
        pos += list(range(cache_lens[b], cache_lens[b] + n))
    return np.array(seq, dtype=np.int64), np.array(pos, dtype=np.int64)


# ---------------------------------------------------------------- matmul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,config,bias", [(3, 40, 48, "decode", True),
                                               (130, 36, 80, "prefill", False)])
def test_matmul(dtype, M, N, K, config, bias):
    g = torch.Generator().manual_seed(M * N + K)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype)
    bi = torch.randn(N, generator=g).to(dtype) if bias else None
    got = mm.matmul(a, b, bi, config=config)
    want = f64(a) @ f64(b).T + (f64(bi) if bias else 0)
    assert got.dtype == dtype and got.shape == (M, N)
    close(got, want, dtype, scale=np.sqrt(K))


@pytest.mark.parametrize("rowwise,colwise,config", [(False, False, "decode"),
                                                    (True, True, "prefill")])
def test_matmul_fp8(rowwise, colwise, config):
    g = torch.Generator().manual_seed(7)
    M, N, K = (5, 24, 64) if config == "decode" else (70, 20, 96)
    a = (torch.randn(M, K, generator=g) * 2).to(torch.float8_e4m3fn)
    b = (torch.randn(N, K, generator=g) * 2).to(torch.float8_e4m3fn)
    sa = torch.rand(M if rowwise else 1, generator=g) + 0.5
    sb = torch.rand(N if colwise else 1, generator=g) + 0.5
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    got = mm.matmul_fp8(a, b, sa, sb, bias=bias, out_dtype=torch.float32, config=config)
    sa_ = f64(sa).reshape(-1, 1) if rowwise else f64(sa)[0]
    sb_ = f64(sb).reshape(1, -1) if colwise else f64(sb)[0]
    want = (f64(a) @ f64(b).T) * sa_ * sb_ + f64(bias)
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-3)


def test_matmul_bad_shapes():
    with pytest.raises(ValueError, match="matmul: need a"):
        mm.matmul(torch.randn(2, 3), torch.randn(4, 5))


# ---------------------------------------------------------------- rms norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D", [(7, 48), (70, 64)])
def test_rms_norm(dtype, R, D):
    g = torch.Generator().manual_seed(R + D)
    x = (torch.randn(R, D, generator=g) * 3).to(dtype)
    w = torch.randn(D, generator=g).to(dtype)
    got = rn.rms_norm(x, w, eps=1e-5)
    close(got, rms_ref(f64(x), f64(w), 1e-5), dtype, scale=4)


def test_rms_norm_per_head_view():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 3 * 16, generator=g)
    w = torch.randn(16, generator=g)
    got = rn.rms_norm(q.view(5, 3, 16), w)
    want = rms_ref(f64(q).reshape(5, 3, 16), f64(w), 1e-6)
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- rope + split + store
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("qk_norm,block_t,head_block,split", [(False, 1, None, False),
                                                              (True, 4, 4, False),
                                                              (False, 2, 1, False),
                                                              (True, 2, 4, True),
                                                              (False, 1, 4, True)])
def test_rope_split_store(dtype, interleaved, qk_norm, block_t, head_block, split):
    rng = np.random.default_rng(11 + block_t + 2 * interleaved)
    NH, NKV, D, PS, L, layer = 6, 2, 16, 4, 3, 1
    new_lens, cache_lens = [3, 0, 1, 5], [2, 4, 9, 0]
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, PS, L, dtype)
    T = pb["T"]
    qkv = torch.from_numpy(rng.standard_normal((T, (NH + 2 * NKV) * D))).to(dtype)
    freqs = torch.from_numpy(freqs_cis_np(D, 16)).to(torch.float32)
    qw = torch.from_numpy(rng.standard_normal(D)).to(dtype) if qk_norm else None
    kw = torch.from_numpy(rng.standard_normal(D)).to(dtype) if qk_norm else None
    blocks = pb["blocks"].clone()
    q_out = rss.rope_split_store(qkv, pb["offs_t"], pb["cache_t"], pb["lut_t"], freqs, blocks,
                                 layer, NH, interleaved, qw, kw, eps=1e-6, block_t=block_t,
                                 head_block=head_block, split_heads=split)

    x = f64(qkv)
    q = x[:, :NH * D].reshape(T, NH, D)
    k = x[:, NH * D:(NH + NKV) * D].reshape(T, NKV, D)
    v = x[:, (NH + NKV) * D:].reshape(T, NKV, D)
    if qk_norm:
        q, k = rms_ref(q, f64(qw), 1e-6), rms_ref(k, f64(kw), 1e-6)
    seq, pos = token_positions(pb["offs"], cache_lens)
    fr = f64(freqs)
    want_blocks = f64(pb["blocks"])
    pages, slots = pb["lut"][seq, pos // PS], pos % PS
    want_blocks[pages, 0, layer, slots] = rope_ref(k, pos, fr, interleaved)
    want_blocks[pages, 1, layer, slots] = v
    close(q_out, rope_ref(q, pos, fr, interleaved).reshape(T, NH * D), dtype, scale=4)
    close(blocks, want_blocks, dtype, scale=4)
    # Everything not written (other layers, other slots, the null page) is bit-identical.
    written = np.zeros(blocks.shape[:4], dtype=bool)
    written[pages, :, layer, slots] = True
    assert torch.equal(blocks[torch.from_numpy(~written)], pb["blocks"][torch.from_numpy(~written)])


def test_rope_split_store_bad_qkv():
    blocks = torch.randn(3, 2, 1, 4, 2, 16)
    u = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="qkv must be"):
        rss.rope_split_store(torch.randn(3, 10), u, u[:1], u[None], torch.randn(8, 16), blocks,
                             0, 4)
