"""The tensor-core kernel for 1-16 rows of X over the nib layout (kernels/quant_nib_tc.py) under
Triton's interpreter: every format (q6_k with its crumbs too) matches the float64 product
(bfloat16 and float16 X, ragged N, split K, X reordered into planes first or not, rows of X from
1 to a tile and a half), and it refuses what it cannot take."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from graphir.lowering.triton_gpu.kernels import quant_nib_config as qn  # noqa: E402

from tests.lowering.triton_gpu.test_quant_nib import run_spec, weight_for  # noqa: E402

DT = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def launch_tc(x, ops, fmt, n, conf, group):
    """y = x @ W^T with the tensor-core kernel (fp32 partials summed by torch when split; X
    reordered into planes first with XP)."""
    m, k = x.shape
    specs = qn.nib_specs(fmt, DT[x.dtype], dict(conf, TC=1), group)
    if conf.get("XP"):
        xs, *specs = specs
        xp = torch.full_like(x, float("nan"))
        xs.fn[xs.grid_for(M=m, K=k)](x, xp, k, **xs.constexprs, num_warps=xs.num_warps)
        assert torch.equal(xp.view(m, k // (8 * conf["NW"]), 8, conf["NW"]),
                           x.view(m, -1, conf["NW"], 8).transpose(2, 3))
        x = xp
    s = specs[0]
    cols = qn.tc_geometry(k, conf["NW"], conf["SPLIT_K"])
    return run_spec(s, x, ops, n, cols, conf["SPLIT_K"])


@pytest.mark.parametrize("fmt,group", [("q4_0", 32), ("q4_1", 32), ("q4_k", 32), ("gptq", 64),
                                       ("gptq_sym", 128), ("q6_k", 32)])
@pytest.mark.parametrize("dtype,m,split,xp", [(torch.bfloat16, 1, 1, 0), (torch.float16, 5, 2, 1),
                                              (torch.bfloat16, 19, 2, 0)])
def test_tc_matches_product(fmt, group, dtype, m, split, xp):
    rng = np.random.default_rng(len(fmt) * 7 + m)
    # N ragged for GGUF (zero rows padded to a multiple of 4, rows past N masked); 512 of K in
    # two steps of 16 word columns a split.
    n, k = (72 if fmt.startswith("gptq") else 70), 512
    ops, w = weight_for(rng, fmt, n, k, group)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    conf = dict(BN=64, NW=16, BM=16, num_warps=4, num_stages=1, SPLIT_K=split, PREFETCH=3 * (split - 1), XP=xp)
    got = launch_tc(x, ops, fmt, n, conf, group)
    want = x.double().numpy() @ w.astype(np.float64).T
    # The weight is rounded to X's type once (s c + m), as the dot tiles round it.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_tc_refuses_what_it_cannot_take():
    conf = dict(TC=1, BN=64, NW=16, BM=16, num_warps=4, SPLIT_K=1)
    with pytest.raises(ValueError, match="unknown format 'q5_k'"):
        qn.nib_specs("q5_k", "bfloat16", conf)
    with pytest.raises(ValueError, match="fp32"):
        qn.nib_specs("q4_0", "float32", conf)
    with pytest.raises(ValueError, match="K=.*multiple of 128"):
        qn.tc_geometry(4096 + 32, 16, 1)
