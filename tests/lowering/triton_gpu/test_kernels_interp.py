"""The Triton kernels on the CPU (Triton interpreter, see conftest.py) vs float64 numpy."""

import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import matmul as mm
from graphir.lowering.triton_gpu.kernels import paged_decode as pd
from graphir.lowering.triton_gpu.kernels import rms_norm as rn
from graphir.lowering.triton_gpu.kernels import rope_split_store as rss

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


# ---------------------------------------------------------------- rope + split + store
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("qk_norm,block_t,head_block,split", [(False, 1, None, False),
                                                              (True, 4, 4, False),
                                                              (False, 2, 1, False),
                                                              (True, 2, 4, True)])
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


# ---------------------------------------------------------------- attention
ATTN_CASES = [  # mask, window, NH, NKV, new_lens, cache_lens
    ("CAUSAL", 0, 4, 2, [5, 1, 9], [3, 0, 12]),
    ("NULL", 0, 2, 2, [4, 6], [7, 0]),
    ("SLIDING_WINDOW_CAUSAL", 5, 4, 1, [8, 3], [6, 11]),
    ("SLIDING_WINDOW_NONCAUSAL", 4, 2, 1, [6], [9]),
    ("CHUNKED_CAUSAL", 8, 4, 2, [7, 10], [5, 13]),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention(case, dtype):
    mask, window, NH, NKV, new_lens, cache_lens = case
    rng = np.random.default_rng(len(mask) + NH)
    D, PS, L, layer = 16, 4, 2, 1
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, PS, L, dtype)
    q = torch.from_numpy(rng.standard_normal((pb["T"], NH, D))).to(dtype)
    # Small tiles so that several query and key blocks (and page crossings) are exercised.
    got = fa.flash_attention(q, pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], layer,
                             mask=mask, window=window, scale=0.3, block_m=16, block_n=8)
    want = attention_ref(f64(q), f64(pb["blocks"]), pb["lut"], pb["offs"], cache_lens, layer,
                         mask, window, 0.3)
    close(got, want, dtype)


def test_flash_attention_default_tiles():
    rng = np.random.default_rng(5)
    pb = paged_problem(rng, [3, 20], [4, 130], 2, 32, 16, 1, torch.float16)
    q = torch.from_numpy(rng.standard_normal((pb["T"], 4, 32))).to(torch.float16)
    got = fa.flash_attention(q, pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], 0)
    want = attention_ref(f64(q), f64(pb["blocks"]), pb["lut"], pb["offs"], [4, 130], 0,
                         "CAUSAL", 0, 32 ** -0.5)
    close(got, want, torch.float16)


def test_flash_attention_bad_window():
    with pytest.raises(ValueError, match="needs window > 0"):
        u = torch.zeros(2, dtype=torch.int32)
        fa.flash_attention(torch.randn(1, 2, 16), u, u[:1], u[None], torch.randn(2, 2, 1, 4, 2, 16),
                           0, mask="SLIDING_WINDOW_CAUSAL")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask,window,q_per_seq,num_parts", [
    ("CAUSAL", 0, 1, 3), ("CAUSAL", 0, 3, None), ("SLIDING_WINDOW_CAUSAL", 6, 1, 4)])
def test_paged_decode(dtype, mask, window, q_per_seq, num_parts):
    rng = np.random.default_rng(q_per_seq + window)
    NH, NKV, D, PS, L, layer = 8, 2, 16, 8, 2, 0
    new_lens = [1, 1, 1] if q_per_seq == 1 else [3, 1, 2]
    cache_lens = [0, 37, 20]
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, PS, L, dtype)
    q = torch.from_numpy(rng.standard_normal((pb["T"], NH, D))).to(dtype)
    got = pd.paged_decode(q, pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], layer,
                          mask=mask, window=window, q_per_seq=q_per_seq, block_n=16,
                          num_parts=num_parts)
    want = attention_ref(f64(q), f64(pb["blocks"]), pb["lut"], pb["offs"], cache_lens, layer,
                         mask, window, D ** -0.5)
    close(got, want, dtype)


def test_paged_decode_partition_rule():
    assert pd.partition(1, 8, 4096) == (16, 256)
    assert pd.partition(64, 8, 4096) == (1, 4096)
    nparts, part = pd.partition(2, 2, 100000)
    assert part % 64 == 0 and nparts * part >= 100000 and (nparts - 1) * part < 100000


def test_paged_decode_many_partitions():
    """More partitions than the reduce kernel's chunk (16), so chunks get rescaled."""
    rng = np.random.default_rng(21)
    pb = paged_problem(rng, [1, 1], [409, 150], 1, 16, 32, 1, torch.float32)
    q = torch.from_numpy(rng.standard_normal((2, 2, 16))).to(torch.float32)
    # Scores grow along the context so later partitions hold larger maxima.
    pb["blocks"][:, 0] += torch.linspace(0, 3, 32).view(1, 1, 32, 1, 1)
    got = pd.paged_decode(q, pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], 0,
                          block_n=16, num_parts=26)
    want = attention_ref(f64(q), f64(pb["blocks"]), pb["lut"], pb["offs"], [409, 150], 0,
                         "CAUSAL", 0, 16 ** -0.5)
    close(got, want, torch.float32)
