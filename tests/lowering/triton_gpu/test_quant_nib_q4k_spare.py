"""q4_k's super-block word (float16 d, dmin) carried in the nib scales' spare bits
(ops/quant/nib_layout.py SPARE_FIELDS) and gathered across lanes by the one-row block GEMV
(kernels/quant_nib_block.py `_q4k_spare_terms`), under Triton's interpreter (its butterflies are
tl.flip there too): the bits rebuild the word exactly for every block of random checkpoints, and
the block GEMV whose step spans whole super-blocks gets the float64 product with the `supers`
operand overwritten by NaNs (so it reads the spare bits only), where the tile that spans less
does read it; operands nib_repack did not make (spare bits bare) decode from `supers` in the
reference, in the kernel with SPARE=0, and in the cuda plan of a graph written by hand."""
import re

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from graphir.ops.quant.nib_layout import q4_k_spare_supers  # noqa: E402
from graphir.ops.quant_nib import nib_weight  # noqa: E402

from tests.lowering.triton_gpu.test_quant_nib import gguf_weight, launch  # noqa: E402
from tests.lowering.triton_gpu.nib_hand import bare as _bare, bare_q4_k  # noqa: E402


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


def test_the_reference_decodes_bare_scales_from_supers():
    # The spare bits are a copy for the one-row GPU GEMV: the op's meaning comes from `supers`.
    ops, want = gguf_weight(np.random.default_rng(2), "q4_k", 8, 256)
    np.testing.assert_array_equal(nib_weight("q4_k", 8, [ops[0], _bare(ops[1]), ops[2]]), want)


def test_spare_off_reads_supers():
    # SPARE=0: the whole-super-block tile loads `supers` (NaN here shows it did) and gets the
    # product from bare scales, where the spare-bit gather gets other numbers from them.
    rng = np.random.default_rng(9)
    n, k = 12, 1024
    ops, w = gguf_weight(rng, "q4_k", n, k)
    x = torch.from_numpy(rng.standard_normal((1, k)).astype(np.float32))
    conf = dict(GEMV=1, BLK=1, BG=1, NJ=64, num_warps=1, SPLIT_K=1, WEV=1, SPARE=0)
    nan = [ops[0], ops[1], np.full_like(ops[2], 0xFF)]
    assert np.isnan(launch(x, nan, "q4_k", n, conf)).all()
    bare = [ops[0], _bare(ops[1]), ops[2]]
    want = x.double().numpy() @ w.astype(np.float64).T
    np.testing.assert_allclose(launch(x, bare, "q4_k", n, conf), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    spare = launch(x, bare, "q4_k", n, dict(conf, SPARE=1))
    assert not np.allclose(spare, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_compiled_plan_reads_supers_for_hand_packed_operands():
    # A graph written with nib_matmul over operands nib_repack did not make: the cuda plan's
    # one-row GEMV takes its terms from `supers` (kernel name suffix "n"), so bare scales give
    # the reference's numbers; the qmatmul rewrite's plan keeps the spare-bit gather.
    from graphir.dtype import DType, round_to
    from graphir.runtime.interpreter import run
    from tests.lowering.triton_gpu.test_backend_interp import interp_executor
    from tests.lowering.triton_gpu.test_quant_nib import _qmatmul_graph

    n, k = 12, 1024
    rng = np.random.default_rng(4)
    g, weights = bare_q4_k(rng, n, k)
    x = round_to(rng.standard_normal((1, k)), DType.bfloat16)
    ex, dev = interp_executor(g, weights)
    (got,) = ex.execute(x)
    (want,) = run(g, x, weights=weights)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    (name,) = [s for s in dev.launched if s.startswith("nib_q4_k_")]
    assert re.match(r"nib_q4_k_gemvblk_g\d+j\d+e?n_", name), name
    g2, raw = _qmatmul_graph("Q4_K", n, k, "bfloat16")
    ex2, dev2 = interp_executor(g2, {"w": raw})
    ex2.execute(x)
    (name2,) = [s for s in dev2.launched if s.startswith("nib_q4_k_")]
    assert re.match(r"nib_q4_k_gemvblk_g\d+j\d+e?_", name2), name2


def test_the_cpu_refuses_hand_written_nib_matmul_by_name():
    # The CPU has no nib kernels: it takes nib_matmul back to qmatmul over nib_repack's
    # results only, and names what the op is for when it cannot.
    pytest.importorskip("mlir.ir")
    from graphir.lowering.driver import compile_graph

    g, _ = bare_q4_k(np.random.default_rng(3), 12, 256)
    with pytest.raises(ValueError, match=r"gir.nib_matmul has no CPU lowering, and its rewrite "
                                         r"into other ops does not apply here .*nib_repack"):
        compile_graph(g, "cpu")
