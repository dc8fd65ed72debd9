"""The Triton kernels on the CPU (Triton interpreter, see conftest.py) vs float64 numpy."""

import numpy as np
import pytest
import torch

from lowering.triton_gpu.kernels import flash_attention as fa
from lowering.triton_gpu.kernels import matmul as mm
from lowering.triton_gpu.kernels import paged_decode as pd
from lowering.triton_gpu.kernels import rms_norm as rn
from lowering.triton_gpu.kernels import rope_split_store as rss

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


def mask_ok(mask, qp, kp, w):
    if mask == "NULL":
        return True
    if mask == "CAUSAL":
        return kp <= qp
    if mask == "SLIDING_WINDOW_CAUSAL":
        return kp <= qp and qp - kp < w
    if mask == "SLIDING_WINDOW_NONCAUSAL":
        return qp - kp < w
    return kp <= qp and kp // w == qp // w


def attention_ref(q, blocks, lut, offs, cache_lens, layer, mask, window, scale):
    """q [T, NH, D] float64; keys/values gathered from the paged float64 blocks."""
    T, NH, D = q.shape
    NKV, PS = blocks.shape[4], blocks.shape[3]
    out = np.zeros((T, NH, D))
    for b in range(len(offs) - 1):
        kv_len = cache_lens[b] + offs[b + 1] - offs[b]
        kp = np.arange(kv_len)
        pages = lut[b, kp // PS]
        k = blocks[pages, 0, layer, kp % PS]  # [kv_len, NKV, D]
        v = blocks[pages, 1, layer, kp % PS]
        for i, t in enumerate(range(offs[b], offs[b + 1])):
            qp = cache_lens[b] + i
            allowed = np.array([mask_ok(mask, qp, p, window) for p in kp])
            for h in range(NH):
                g = h // (NH // NKV)
                s = k[:, g] @ q[t, h] * scale
                s = np.where(allowed, s, -np.inf)
                p = np.exp(s - s.max())
                out[t, h] = (p / p.sum()) @ v[:, g]
    return out.reshape(T, NH * D)


# ---------------------------------------------------------------- problem builders
def paged_problem(rng, new_lens, cache_lens, NKV, D, page_size, num_layers, dtype):
    batch = len(new_lens)
    offs = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    total = [c + n for c, n in zip(cache_lens, new_lens)]
    max_pages = max(-(-t // page_size) for t in total) + 1
    need = sum(-(-t // page_size) for t in total)
    num_pages = need + 2  # spare pages stay untouched; the last one is the null page
    perm = rng.permutation(num_pages - 1)
    lut = np.full((batch, max_pages), num_pages - 1, dtype=np.int64)
    used = 0
    for b, t in enumerate(total):
        n = -(-t // page_size)
        lut[b, :n] = perm[used:used + n]
        used += n
    blocks = torch.from_numpy(rng.standard_normal(
        (num_pages, 2, num_layers, page_size, NKV, D))).to(dtype)
    u32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).view(torch.uint32)
    return dict(offs=offs, lut=lut, blocks=blocks, offs_t=u32(offs), cache_t=u32(cache_lens),
                lut_t=u32(lut), T=int(offs[-1]))


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
