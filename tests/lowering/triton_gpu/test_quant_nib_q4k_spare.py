"""q4_k's super-block word (float16 d, dmin) carried in the nib scales' spare bits
(ops/quant/nib_layout.py SPARE_FIELDS) and gathered across lanes by the one-row block GEMV
(kernels/quant_nib_block.py `_q4k_spare_terms`), under Triton's interpreter (its butterflies are
tl.flip there too): the bits rebuild the word exactly for every block of random checkpoints, and
the block GEMV whose step spans whole super-blocks gets the float64 product with the `supers`
operand overwritten by NaNs (so it reads the spare bits only), where the tile that spans less
does read it; the op's reference refuses scales whose spare bits do not carry the words."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from graphir.ops.quant.nib_layout import q4_k_spare_supers  # noqa: E402
from graphir.ops.quant_nib import nib_weight  # noqa: E402

from tests.lowering.triton_gpu.test_quant_nib import gguf_weight, launch  # noqa: E402


@pytest.mark.parametrize("n,k", [(13, 512), (8, 2048)])
def test_spare_bits_rebuild_the_super_block_word(n, k):
    ops, want = gguf_weight(np.random.default_rng(n + k), "q4_k", n, k)
    scales = np.ascontiguousarray(ops[1]).view(np.uint16)          # [G, K / 32, 4]
    supers = np.ascontiguousarray(ops[2]).view(np.uint32)          # [G, K / 256, 4]
    assert np.array_equal(q4_k_spare_supers(scales), supers)
    real = np.arange(scales.shape[0] * 4).reshape(-1, 4)[:, None, :] < n     # not padding rows
    # Each spare bit position is set somewhere (random d / dmin), so none is dropped unseen.
    used = np.bitwise_or.reduce(scales[np.broadcast_to(real, scales.shape)] & 0xC0C0)
    assert used == 0xC0C0


@pytest.mark.parametrize("nj,split,dtype", [(32, 2, torch.float32), (64, 1, torch.bfloat16),
                                            (128, 1, torch.float16)])
def test_block_gemv_takes_d_from_the_spare_bits(nj, split, dtype):
    rng = np.random.default_rng(nj + split)
    n, k, m = 37, 2048, 3                  # 8 super-blocks a row: 1-4 steps of 1-4 each
    ops, w = gguf_weight(rng, "q4_k", n, k)
    ops = [ops[0], ops[1], np.full_like(ops[2], 0xFF)]   # supers: float16 NaN bits
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    conf = dict(GEMV=1, BLK=1, BG=2, NJ=nj, num_warps=1, SPLIT_K=split, WEV=1)
    got = launch(x, ops, "q4_k", n, conf)
    want = x.double().numpy() @ w.astype(np.float64).T
    tol = 1e-5 if dtype == torch.float32 else 1e-2      # the output's rounding only
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_a_step_short_of_a_super_block_reads_supers():
    # 16 word columns a step = 4 blocks, half a super-block: the lanes cannot rebuild the word,
    # so that tile loads it (here NaN: the output shows it was read).
    rng = np.random.default_rng(5)
    ops, _ = gguf_weight(rng, "q4_k", 8, 512)
    ops = [ops[0], ops[1], np.full_like(ops[2], 0xFF)]
    x = torch.from_numpy(rng.standard_normal((1, 512)).astype(np.float32))
    conf = dict(GEMV=1, BLK=1, BG=1, NJ=16, num_warps=1, SPLIT_K=1, WEV=1)
    assert np.isnan(launch(x, ops, "q4_k", 8, conf)).all()


def test_the_reference_refuses_scales_without_the_words():
    # Operands packed without the spare bits (by hand, not by nib_repack) would give the one-row
    # GPU GEMV other d / dmin than the other kernels: the op's reference names the mismatch.
    ops, _ = gguf_weight(np.random.default_rng(2), "q4_k", 8, 256)
    bare = np.ascontiguousarray(ops[1]).view(np.uint16) & 0x3F3F
    with pytest.raises(ValueError, match="spare bits do not carry the supers"):
        nib_weight("q4_k", 8, [ops[0], bare.view(np.uint8), ops[2]])
