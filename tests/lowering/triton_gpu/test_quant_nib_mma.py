"""The warp-MMA kernel for 1-8 rows of X over the nib layout (kernels/quant_nib_mma.py) under
Triton's interpreter, where its lane-level MMA runs as the plain sums across lanes (the PTX itself
is checked by test_quant_nib_mma_ptx.py): every format, Q6_K's crumbs and sub-block scales too,
matches the float64 product (bfloat16 and float16 X, a ragged N, X rows past 8 in a second program
row or, with two sets of 8 rows a program, past 16, warps sharing the blocks, two blocks a step, split K, symmetric codes scaled after the MMA or
rounded with their scale), and it refuses what it cannot take."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from graphir.lowering.triton_gpu.kernels import quant_nib_config as qn  # noqa: E402

from tests.lowering.triton_gpu.test_quant_nib import run_spec, weight_for  # noqa: E402

DT = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def launch_mma(x, ops, fmt, n, conf, group):
    """y = x @ W^T with the warp-MMA kernel (fp32 partials summed by torch when split)."""
    k = x.shape[1]
    (s, *_) = qn.nib_specs(fmt, DT[x.dtype], dict(conf, MMA=1), group)
    bps = qn.mma_geometry(k, conf["num_warps"], conf["SPLIT_K"], conf["NB"])
    return run_spec(s, x, ops, n, bps, conf["SPLIT_K"])


@pytest.mark.parametrize("fmt,group,dtype,m,warps,nb,split,sa,xn", [
    ("q4_0", 32, torch.bfloat16, 1, 1, 1, 1, 1, 1),
    ("q4_0", 32, torch.float16, 4, 2, 1, 2, 0, 1),
    ("q4_1", 32, torch.float16, 3, 2, 2, 1, 1, 1),
    ("q4_k", 32, torch.bfloat16, 13, 2, 1, 2, 1, 2),
    ("gptq", 64, torch.float16, 5, 1, 2, 2, 1, 1),
    ("gptq_sym", 128, torch.bfloat16, 19, 2, 1, 1, 1, 2),
    ("q6_k", 32, torch.bfloat16, 2, 2, 2, 1, 1, 1),
    ("q4_k", 32, torch.float16, 2, 1, 4, 2, 1, 1),
])
def test_mma_matches_product(fmt, group, dtype, m, warps, nb, split, sa, xn):
    rng = np.random.default_rng(len(fmt) * 11 + m)
    # N ragged for GGUF (zero rows padded to a multiple of 4, rows past N masked), 512 of K.
    n, k = (72 if fmt.startswith("gptq") else 70), 512
    ops, w = weight_for(rng, fmt, n, k, group)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    conf = dict(num_warps=warps, NB=nb, SPLIT_K=split, PREFETCH=(split == 1) + (nb == 1), SA=sa,
                XN=xn)
    got = launch_mma(x, ops, fmt, n, conf, group)
    want = x.double().numpy() @ w.astype(np.float64).T
    # The weight is rounded to X's type once (s c + m), as the tensor-core kernel rounds it,
    # but for symmetric codes scaled after the MMA (SA): then only the output is rounded.
    exact = sa and fmt in ("q4_0", "gptq_sym")
    tol = (4e-3 if dtype == torch.bfloat16 else 1e-3) if exact else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_mma_refuses_what_it_cannot_take():
    conf = dict(MMA=1, num_warps=2, NB=1, SPLIT_K=1)
    with pytest.raises(ValueError, match="unknown format 'q5_k'"):
        qn.nib_specs("q5_k", "bfloat16", conf)
    with pytest.raises(ValueError, match="fp32"):
        qn.nib_specs("q4_0", "float32", conf)
    with pytest.raises(ValueError, match="NB must be 1, 2 or 4"):
        qn.nib_specs("q4_0", "bfloat16", dict(conf, NB=3))
    with pytest.raises(ValueError, match="XN must be 1 or 2"):
        qn.nib_specs("q4_0", "bfloat16", dict(conf, XN=3))
    with pytest.raises(ValueError, match="K=4128 must be a multiple of 32 x 2 warps x 1"):
        qn.mma_geometry(4128, 2, 1)
    assert qn.mma_geometry(4096, 4, 1, 2) == 128
    assert qn.mma_geometry(4096, 4, 3, 2) == 48       # whole steps of 8 blocks, 3 splits
