"""The one-token qkv GEMV with rope_split_store in its epilogue (kernels/gemv_rope_store.py) on
the CPU (Triton interpreter) against float64 numpy: x @ W^T (+ bias), then rope on q and k and
the paged k/v stores as tests/lowering/triton_gpu/test_kernels_interp.py's references do."""
import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import gemv_rope_store as grs
from tests.lowering.triton_gpu.test_flash_attention import paged_problem
from tests.lowering.triton_gpu.test_kernels_interp import close, f64, freqs_cis_np, rope_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


def run(x, w, bias, pb, freqs, blocks, layer, nh, interleaved, pairs, block_k, prefetch=False,
        meta=None):
    nkv, d = blocks.shape[4], blocks.shape[5]
    sp = grs.spec(nh, nkv, d, blocks.shape[3], str(x.dtype).removeprefix("torch."), "float32",
                  interleaved, bias is not None, x.shape[1], pairs, block_k, 1, prefetch, meta)
    q = torch.full((1, nh * d), float("nan"), dtype=x.dtype)
    i32 = lambda t: t.view(torch.int32)  # noqa: E731
    sp.fn[sp.grid_for()](x, w, bias if bias is not None else x, i32(pb["offs_t"]),
                         i32(pb["cache_t"]), i32(pb["lut_t"]), freqs, blocks, q, x.shape[1],
                         len(pb["offs"]) - 1, pb["lut"].shape[1], layer, blocks.shape[2],
                         blocks.shape[0], freqs.shape[0], **sp.constexprs)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved,bias,pairs,block_k,K,prefetch,meta", [
    (False, False, 1, 16, 48, False, 0), (True, True, 2, 32, 40, False, 1),
    (False, True, 4, 16, 64, True, 2), (True, False, 8, 64, 64, False, None),
    (False, True, 2, 16, 40, False, 3), (True, False, 1, 64, 64, False, 3)])
def test_gemv_rope_store(dtype, interleaved, bias, pairs, block_k, K, prefetch, meta):
    rng = np.random.default_rng(5 + pairs + 2 * interleaved)
    NH, NKV, D, PS, L, layer = 4, 2, 16, 4, 2, 1
    # one new token, owned by the third of four sequences (the others add none)
    new_lens, cache_lens = [0, 0, 1, 0], [3, 6, 9, 2]
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, PS, L, dtype)
    N = (NH + 2 * NKV) * D
    x = torch.from_numpy(rng.standard_normal((1, K))).to(dtype)
    w = torch.from_numpy(rng.standard_normal((N, K)) / np.sqrt(K)).to(dtype)
    bv = torch.from_numpy(rng.standard_normal(N)).to(dtype) if bias else None
    freqs = torch.from_numpy(freqs_cis_np(D, 16)).to(torch.float32)
    blocks = pb["blocks"].clone()
    q = run(x, w, bv, pb, freqs, blocks, layer, NH, interleaved, pairs, block_k, prefetch, meta)

    qkv = f64(x) @ f64(w).T + (f64(bv) if bias else 0.0)
    pos = np.array([cache_lens[2]])
    fr = f64(freqs)
    want_q = rope_ref(qkv[:, :NH * D].reshape(1, NH, D), pos, fr, interleaved).reshape(1, -1)
    k = rope_ref(qkv[:, NH * D:(NH + NKV) * D].reshape(1, NKV, D), pos, fr, interleaved)
    v = qkv[:, (NH + NKV) * D:].reshape(1, NKV, D)
    page, slot = pb["lut"][2, pos[0] // PS], pos[0] % PS
    want = f64(pb["blocks"])
    want[page, 0, layer, slot], want[page, 1, layer, slot] = k[0], v[0]
    close(q, want_q, dtype, scale=4)
    close(blocks, want, dtype, scale=4)
    written = np.zeros(blocks.shape[:4], dtype=bool)
    written[page, :, layer, slot] = True
    keep = torch.from_numpy(~written)
    assert torch.equal(blocks[keep], pb["blocks"][keep])  # nothing else written


@pytest.mark.parametrize("meta", [0, 3])
def test_bad_metadata_stays_inside_the_buffers(meta):
    """A position past the rope table and the lookup table, and a page id past the cache:
    clamped as rope_split_store clamps them, so the kernel writes a slot of the cache."""
    rng = np.random.default_rng(3)
    NH, NKV, D, PS, L = 2, 1, 16, 4, 1
    pb = paged_problem(rng, [1], [2], NKV, D, PS, L, torch.float32)
    pb["cache_t"] = torch.tensor([10_000], dtype=torch.int32).view(torch.uint32)
    pb["lut_t"] = torch.full_like(pb["lut_t"], 99)
    x = torch.randn(1, 32)
    w = torch.randn((NH + 2 * NKV) * D, 32)
    blocks = pb["blocks"].clone()
    q = run(x, w, None, pb, torch.from_numpy(freqs_cis_np(D, 8)).float(), blocks, 0, NH,
            False, 2, 16, meta=meta)
    assert torch.isfinite(q).all()
    changed = (blocks != pb["blocks"]).reshape(blocks.shape[0], -1).any(1)
    assert changed.sum() == 1 and changed[0]  # page 0, the replacement of a bad id


def test_pairs_must_stay_in_one_head():
    assert grs.pairs_ok(8, 16) and not grs.pairs_ok(16, 16) and not grs.pairs_ok(3, 128)
    with pytest.raises(ValueError, match="do not divide head_dim"):
        grs.spec(4, 2, 16, 4, "float32", "float32", False, False, 64, 16, 32, 1, False)

