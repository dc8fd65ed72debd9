"""The decode GEMV kernels (kernels/quant_gemv.py) under Triton's interpreter against the
gguf package's dequantize: every GGUF encoding at every GEMV bucket (M = 1, 2, 3, 4), float32
and bfloat16 activations, split-K with a ragged last run, N and K tails; and the selection rule
(which M take the GEMV path, the switch, the lowering's buckets)."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from graphir.lowering.triton_gpu.kernels import quant as qk  # noqa: E402
from graphir.lowering.triton_gpu.kernels import quant_gemv as qg  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_gguf import FORMATS  # noqa: E402
from tests.lowering.triton_gpu.test_quant_gguf import (F16_FIELDS, QUANTIZED,  # noqa: E402
                                                       float_reference, float_rows,
                                                       random_blocks, reference)


def _product(enc, raw, x):
    w = reference(raw, enc) if enc in F16_FIELDS else float_reference(raw, enc)
    return x.astype(np.float64) @ w.astype(np.float64).T


@pytest.mark.parametrize("enc", QUANTIZED + ["F16", "BF16", "F32"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_matches_dequantized_product(enc, m):
    rng = np.random.default_rng(100 * m + FORMATS[enc].id)
    n, k = 37, 512      # N not a multiple of the tile, two super-blocks per row
    raw = random_blocks(rng, enc, n, k) if enc in F16_FIELDS else float_rows(rng, enc, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    conf = qk.config_for(m, enc, n, k, "float32", gemv=True)
    assert conf["GEMV"] and conf["BLOCK_M"] >= m
    got = qk.launch_matmul(torch.from_numpy(x), torch.from_numpy(raw), enc, conf=conf).numpy()
    want = _product(enc, raw, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("enc", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_K"])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_split_k_ragged_runs_bfloat16(enc, m):
    rng = np.random.default_rng(5 + m + FORMATS[enc].id)
    n, k = 45, 1280
    raw = random_blocks(rng, enc, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
    conf = qk.config_for(m, enc, n, k, gemv=True)
    groups = k // FORMATS[enc].E
    per = 2 * conf["NG"] + 1        # not a multiple of NG: the last step of a run is partial
    conf.update(SPLIT_K=-(-groups // per), groups_per_split=per)
    assert conf["SPLIT_K"] > 1 and (conf["NG"] == 1 or per % conf["NG"])
    got = qk.launch_matmul(x, torch.from_numpy(raw), enc, conf=conf).float().numpy()
    want = _product(enc, raw, x.double().numpy())
    # The weight is not rounded to bf16 on this path: only the output rounding remains.
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=4e-3 * np.abs(want).max())


@pytest.mark.parametrize("enc", ["Q4_0", "Q6_K", "F16"])
def test_gemv_float16_activations(enc):
    rng = np.random.default_rng(77 + FORMATS[enc].id)
    n, k, m = 19, 256, 2
    raw = random_blocks(rng, enc, n, k) if enc in F16_FIELDS else float_rows(rng, enc, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.float16)
    conf = qk.config_for(m, enc, n, k, "float16", gemv=True)
    got = qk.launch_matmul(x, torch.from_numpy(raw), enc, conf=conf).float().numpy()
    want = _product(enc, raw, x.double().numpy())
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-3 * np.abs(want).max())


def test_gptq_gemv_float16_activations():
    rng = np.random.default_rng(78)
    k, n, m, gs = 256, 40, 1, 32
    weight, _ = checkpoint(rng, k, n, gs, 4, True)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.float16)
    conf = gk.config_for(m, n, k, 4, "float16")
    assert conf["GEMV"]
    got = gk.launch_matmul(x, torch.from_numpy(weight), gs, conf=conf).float().numpy()
    want = gptq_reference(x.double().numpy(), weight, None, None, gs, 4, True, "gptq")
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-3 * np.abs(want).max())


def test_selection_follows_the_switch(monkeypatch):
    assert qg.GEMV_ENABLED
    for m in (1, 2, 3, 4):
        assert qk.config_for(m, "Q4_K", 4096, 4096).get("GEMV")
    for m in (5, 16, 64, None):
        assert not qk.config_for(m, "Q4_K", 4096, 4096).get("GEMV")
    assert not qk.config_for(1, "Q4_K", 4096, 4096, gemv=False).get("GEMV")
    assert qk.bucket_tops() == [1, 2, 4, 16, 64, None]
    spec = qk.matmul_specs("Q4_K", "bfloat16", qk.config_for(1, "Q4_K", 4096, 4096), 2304)[0]
    assert spec.fn is qg.gguf_gemv_kernel and "gemv" in spec.name
    monkeypatch.setattr(qg, "GEMV_ENABLED", False)
    assert not qk.config_for(1, "Q4_K", 4096, 4096).get("GEMV")
    assert qk.bucket_tops() == [16, 64, None]
    assert qk.config_for(1, "Q4_K", 4096, 4096, gemv=True)["GEMV"]
    with pytest.raises(ValueError, match="no GEMV bucket"):
        qk.config_for(16, "Q4_K", 4096, 4096, gemv=True)


def test_gemv_fills_the_gpu_at_batch_one():
    for enc in ("Q4_0", "Q4_K", "Q6_K", "Q8_0"):
        for n in (4096, 14336):
            c = qk.config_for(1, enc, n, 4096)
            programs = -(-n // c["BLOCK_N"]) * c["SPLIT_K"]
            assert programs >= 2 * qk.SM_COUNT, (enc, n, c)


@pytest.mark.parametrize("enc", ["Q4_0", "Q4_K", "Q6_K", "Q8_0"])
def test_dot_path_still_serves_batch_one_when_forced(enc):
    rng = np.random.default_rng(FORMATS[enc].id)
    raw = random_blocks(rng, enc, 21, 512)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    conf = qk.config_for(1, enc, 21, 512, "float32", gemv=False)
    assert "GEMV" not in conf
    got = qk.launch_matmul(torch.from_numpy(x), torch.from_numpy(raw), enc, conf=conf).numpy()
    want = _product(enc, raw, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# -- GPTQ ------------------------------------------------------------------------------------------
from graphir.lowering.triton_gpu.kernels import quant_gptq as gk  # noqa: E402
from tests.lowering.triton_gpu.test_quant_gptq import checkpoint  # noqa: E402
from tests.lowering.triton_gpu.test_quant_gptq import reference as gptq_reference  # noqa: E402

GPTQ_CASES = [(32, False, True, 4), (128, True, False, 4), (-1, False, False, 8),
              (32, True, True, 8), (128, False, False, 4)]


@pytest.mark.parametrize("gs,desc,sym,bits", GPTQ_CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gptq_gemv_matches_reference(gs, desc, sym, bits, m):
    rng = np.random.default_rng(abs(gs) + 2 * desc + 5 * sym + bits + 100 * m)
    k, n = 256, 40
    weight, qzeros = checkpoint(rng, k, n, gs, bits, sym)
    perm = rng.permutation(k).astype(np.int32) if desc else None
    fmt = "gptq" if gs != 128 else "gptq_v2"
    x = rng.standard_normal((m, k)).astype(np.float32)
    conf = gk.config_for(m, n, k, bits, "float32", gemv=True)
    assert conf["GEMV"] and conf["BLOCK_M"] >= m
    want = gptq_reference(x, weight, qzeros, perm, gs, bits, sym, fmt)
    got = gk.launch_matmul(torch.from_numpy(x), torch.from_numpy(weight), gs, bits=bits,
                           qzeros=None if qzeros is None else torch.from_numpy(qzeros),
                           perm=None if perm is None else torch.from_numpy(perm),
                           checkpoint_format=fmt, conf=conf).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_gemv_split_k_bfloat16(bits):
    rng = np.random.default_rng(40 + bits)
    k, n, m, gs = 1024, 72, 2, 128
    weight, qzeros = checkpoint(rng, k, n, gs, bits, False)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
    conf = gk.config_for(m, n, k, bits, gemv=True)
    steps = -(-k // conf["BLOCK_K"])
    conf.update(tiles_per_split=3, SPLIT_K=-(-steps // 3))     # a ragged last run
    assert conf["SPLIT_K"] > 1 and steps % 3
    got = gk.launch_matmul(x, torch.from_numpy(weight), gs, bits=bits,
                           qzeros=torch.from_numpy(qzeros), checkpoint_format="gptq_v2",
                           conf=conf).float().numpy()
    want = gptq_reference(x.double().numpy(), weight, qzeros, None, gs, bits, False, "gptq_v2")
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=4e-3 * np.abs(want).max())


def test_gptq_selection():
    # Without desc_act the GEMV serves M = 1 only; with it, M <= 4 (quant_gemv.GEMV_MAX_M).
    assert gk.config_for(1, 4096, 4096).get("GEMV")
    for m in (2, 4, 16):
        assert not gk.config_for(m, 4096, 4096).get("GEMV")
    for m in (1, 3, 4):
        assert gk.config_for(m, 4096, 4096, has_perm=True).get("GEMV")
    assert not gk.config_for(16, 4096, 4096, has_perm=True).get("GEMV")
    assert gk.config_for(4, 4096, 4096, gemv=True)["GEMV"]
    assert gk.bucket_tops() == [1, 16, 64, None]
    assert gk.bucket_tops(has_perm=True) == [1, 2, 4, 16, 64, None]
    for n in (4096, 14336):
        c = gk.config_for(1, n, 4096)
        assert -(-n // c["BLOCK_N"]) * c["SPLIT_K"] >= 2 * qk.SM_COUNT, c
