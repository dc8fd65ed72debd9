"""GPTQ matmul kernel under Triton's interpreter (conftest.py) against the qmatmul op's float64
reference: group sizes 32 / 128 / -1, with and without desc_act, symmetric and asymmetric
(both checkpoint formats), 4 and 8 bits, M = 1, 3, 17, split-K, bfloat16 activations."""
import numpy as np
import pytest
import torch

import graphir.ops  # noqa: F401  (registers the ops)
from graphir.lowering.triton_gpu.kernels import quant_gptq as gk
from graphir.opdef import lookup
from graphir.ops.quant.gptq_layout import gptq_weight_bytes, pack_rows

N_OUT = 40


def checkpoint(rng, k: int, n: int, group_size: int, bits: int, sym: bool):
    """(weight uint8 [k*bits/8 + 2G, n], qzeros int32 [G, n*bits/32] or None) of random codes."""
    groups = k // (k if group_size == -1 else group_size)
    codes = rng.integers(0, 1 << bits, (k, n), dtype=np.uint8)
    scales = (rng.uniform(0.2, 1.0, (groups, n)) * rng.choice([-1, 1], (groups, n)) * 0.05)
    weight = gptq_weight_bytes(pack_rows(codes, bits), scales.astype(np.float16))
    qzeros = None
    if not sym:
        zeros = rng.integers(0, (1 << bits) - 1, (groups, n), dtype=np.uint8)
        qzeros = pack_rows(np.ascontiguousarray(zeros.T), bits).T.copy()
    return weight, qzeros


def reference(x, weight, qzeros, perm, group_size, bits, sym, fmt):
    attrs = dict(encoding="GPTQ", group_size=group_size, desc_act=perm is not None, sym=sym,
                 checkpoint_format=fmt, bits=bits)
    ins = [x.astype(np.float64), weight] + ([qzeros] if qzeros is not None else []) \
        + ([perm] if perm is not None else [])
    return lookup("qmatmul").reference(ins, attrs)[0]


CASES = [(gs, desc, sym, bits) for gs in (32, 128, -1) for desc in (False, True)
         for sym in (True, False) for bits in (4, 8)]


@pytest.mark.parametrize("gs,desc,sym,bits", CASES)
def test_matches_reference(gs, desc, sym, bits):
    rng = np.random.default_rng(abs(gs) + 2 * desc + 5 * sym + bits)
    k = 256
    weight, qzeros = checkpoint(rng, k, N_OUT, gs, bits, sym)
    perm = rng.permutation(k).astype(np.int32) if desc else None
    fmt = "gptq" if gs != 128 else "gptq_v2"
    for m in (1, 3, 17):
        x = rng.standard_normal((m, k)).astype(np.float32)
        want = reference(x, weight, qzeros, perm, gs, bits, sym, fmt)
        got = gk.launch_matmul(torch.from_numpy(x), torch.from_numpy(weight), gs, bits=bits,
                               qzeros=None if qzeros is None else torch.from_numpy(qzeros),
                               perm=None if perm is None else torch.from_numpy(perm),
                               checkpoint_format=fmt).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_and_bfloat16(bits):
    rng = np.random.default_rng(bits)
    k, gs, m = 1024, 128, 2
    weight, qzeros = checkpoint(rng, k, N_OUT, gs, bits, False)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
    conf = gk.config_for(m, N_OUT, k, bits)
    conf.update(BLOCK_K=128, tiles_per_split=3, SPLIT_K=3)
    got = gk.launch_matmul(x, torch.from_numpy(weight), gs, bits=bits,
                           qzeros=torch.from_numpy(qzeros), conf=conf).float().numpy()
    want = reference(x.float().numpy(), weight, qzeros, None, gs, bits, False, "gptq")
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2 * np.abs(want).max())


def test_shapes_the_kernel_refuses():
    with pytest.raises(ValueError, match="multiples of 8"):
        gk.check_shape(260, 64, 4, 4)
    assert gk.check_shape(256, 64, -1, 4) == 256
