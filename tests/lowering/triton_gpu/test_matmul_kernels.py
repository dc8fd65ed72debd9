"""Every matmul candidate (tiled, split-K, GEMV, TMA) on the CPU under Triton's interpreter
(conftest.py) against float64 numpy, plus the config helpers' checks."""

import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import matmul as mm
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

# Relative L2 error vs float64: bf16 output rounding alone is ~3e-3.
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
# The prefetching GEMVs run the plain loop on a K tail: test_the_prefetching_gemv_... covers both.
TRITON_CONFIGS = sorted(n for n, c in mc.BY_NAME.items()
                        if c["kind"] != "cublaslt" and not c.get("PREFETCH"))
# One config of each kind (and split-K) runs every row count.
KINDS = ["gemv16x512_w4_s1", "gemv16x512_w4_s1_k2", "t64x64x128_g1_w4_s4_k2",
         "t16x16x256_g1_w4_s6", "t128x64x64_g8_w4_s4", "tma128x128x64_g8_w8_s4_p"]


def data(M, N, K, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype)
    bi = torch.randn(N, generator=g).to(dtype) if bias else None
    return a, b, bi


def rel_err(got, a, b, bi):
    want = a.double().numpy() @ b.double().numpy().T
    if bi is not None:
        want = want + bi.double().numpy()
    g = got.double().numpy()
    assert np.isfinite(g).all()
    return np.linalg.norm(g - want) / np.linalg.norm(want)


@pytest.mark.parametrize("name", TRITON_CONFIGS)
def test_every_candidate_bf16_with_bias_and_a_k_tail(name):
    # K = 136 is a multiple of 8 (TMA rows) but of no BLOCK_K: every K-tail path runs.
    a, b, bi = data(17, 72, 136, torch.bfloat16, seed=len(name), bias=True)
    got = mc.run_torch(a, b, bi, config=name)
    assert got.shape == (17, 72) and got.dtype == torch.bfloat16
    assert rel_err(got, a, b, bi) < TOL[torch.bfloat16]


@pytest.mark.parametrize("name", sorted(n for n, c in mc.BY_NAME.items() if c.get("PREFETCH")))
@pytest.mark.parametrize("blocks", [1, 3, 1.5])
@pytest.mark.parametrize("M", [1, 2])
def test_the_prefetching_gemv_over_whole_blocks_and_a_tail(name, blocks, M):
    # K a whole number of blocks (EVEN_K): the double-buffered loop, down to the one-block case
    # where only its prologue and last FMA run; 1.5 blocks: a K tail, the plain masked loop.
    # N = 5 leaves a partial tile of clamped rows.
    cfg = mc.get(name)
    k = int(blocks * cfg["BLOCK_K"])
    a, b, bi = data(M, 5, k, torch.bfloat16, seed=k, bias=M == 2)
    got = mc.run_torch(a, b, bi, config=name)
    assert rel_err(got, a, b, bi) < TOL[torch.bfloat16]


@pytest.mark.parametrize("name", ["gemv2x256_w2_s1", "gemv2x1024_w1_s1_pf", "gemv16x512_w4_s1_k2"])
@pytest.mark.parametrize("K", [512, 200])
def test_the_late_waiting_gemv(name, K):
    """`early` (A, B and the bias unwritten ahead of it) makes an unsplit GEMV wait only
    before its store (LATE_WAIT); a split one keeps its form. The numbers are the same."""
    (spec, *rest) = mc.specs(mc.get(name), "bfloat16", True, K, 6, early=True)
    split = mc.get(name)["SPLIT_K"] > 1
    assert spec.constexprs["LATE_WAIT"] is not split and bool(rest) is split
    assert spec.pdl_early_reads == (() if split else ("a_ptr", "b_ptr", "bias_ptr"))
    assert spec.name.endswith("_late") is not split
    a, b, bi = data(2, 6, K, torch.bfloat16, seed=K, bias=True)
    got = mc.run_torch(a, b, bi, config=name, early=True)
    assert rel_err(got, a, b, bi) < TOL[torch.bfloat16]


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 17, 64, 130])
def test_each_kind_over_row_counts(name, dtype, M):
    K = 256 if M % 2 else 200  # whole K blocks (no masks) and a tail
    # The GEMV runs a program per row: a narrow N (one partial tile) keeps the interpreter quick.
    N = 8 if name.startswith("gemv") else 40
    a, b, bi = data(M, N, K, dtype, seed=M, bias=M % 2 == 1)
    got = mc.run_torch(a, b, bi, config=name)
    assert rel_err(got, a, b, bi) < TOL[dtype]


@pytest.mark.parametrize("name", ["gemv16x512_w4_s1_k2", "t64x64x128_g1_w4_s4_k2",
                                  "tma128x128x64_g8_w8_s4", "t128x256x64_g8_w8_s3"])
def test_writes_stay_inside_the_output(name):
    M, N, K = 5, 24, 72
    a, b, bi = data(M, N, K, torch.bfloat16, seed=3, bias=True)
    pad = 64
    buf = torch.full((M * N + 2 * pad,), float("nan"), dtype=torch.bfloat16)
    out = buf[pad:pad + M * N].view(M, N)
    mc.run_torch(a, b, bi, out=out, config=name)
    assert rel_err(out, a, b, bi) < TOL[torch.bfloat16]
    assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[pad + M * N:]).all()


@pytest.mark.parametrize("name", sorted(n for n, c in mc.BY_NAME.items()
                                         if c["kind"] == "tma" and c["PERSISTENT"]))
@pytest.mark.parametrize("sms", [1, 2])
def test_persistent_programs_walk_several_tiles(monkeypatch, name, sms):
    # Fewer programs than tiles: each program runs several tiles, so the epilogue's own tile
    # counter must follow the main loop's; N = 264 also splits a 256-wide tile's two epilogue
    # halves between a full and a clipped store.
    monkeypatch.setattr(mc, "NUM_SMS", sms)
    a, b, bi = data(130, 264, 64, torch.bfloat16, seed=sms, bias=True)
    assert mc.main_grid(mc.get(name), 130, 264)[0] == sms
    assert rel_err(mc.run_torch(a, b, bi, config=name), a, b, bi) < TOL[torch.bfloat16]


def test_tma_options_are_checked():
    with pytest.raises(ValueError, match="cannot warp-specialize a subtiled epilogue"):
        mc.tma(128, 256, 64, 8, 4, 3, subtile=True, ws=True)
    spec, = mc.specs(mc.get("tma128x256x64_g8_w4_s3_p_ws"), "bfloat16", False, 4096, 6144)
    # Warp specialization runs the K loop; the persistent loop is then not flattened.
    assert spec.constexprs["WARP_SPECIALIZE"] and not spec.constexprs["FLATTEN"]
    spec, = mc.specs(mc.get("tma128x256x64_g8_w8_s4_p_e"), "bfloat16", False, 4096, 6144)
    assert spec.constexprs["EPILOGUE_SUBTILE"] and spec.constexprs["FLATTEN"]


def test_matmul_wrapper_default_and_legacy_names():
    a, b, bi = data(3, 40, 48, torch.float32, seed=5, bias=True)
    for config in (None, "decode", "prefill"):
        assert rel_err(mm.matmul(a, b, bi, config=config), a, b, bi) < 1e-5


def test_empty_rows_launch_nothing():
    a, b, _ = data(1, 16, 32, torch.bfloat16, seed=1, bias=False)
    out = mc.run_torch(a[:0], b, config="gemv16x512_w4_s1")
    assert out.shape == (0, 16)


def test_bad_configs_and_operands_are_clear_errors():
    with pytest.raises(ValueError, match="unknown matmul config 'nope'"):
        mc.get("nope")
    with pytest.raises(ValueError, match="lacks"):
        mc.get({"kind": "tile", "name": "x", "BLOCK_M": 16})
    with pytest.raises(ValueError, match="kind in"):
        mc.get({"kind": "magic"})
    with pytest.raises(ValueError, match="unknown matmul bucket"):
        mc.candidates("m2", "bfloat16", 64, 64)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        mc.candidates("m1", "int32", 64, 64)
    with pytest.raises(ValueError, match="no KernelSpec"):
        mc.specs(mc.CUBLASLT, "bfloat16", False)
    with pytest.raises(ValueError, match="bias must be"):
        mc.run_torch(torch.randn(2, 8), torch.randn(4, 8), torch.randn(3))
    with pytest.raises(ValueError, match="need a"):
        mc.run_torch(torch.randn(2, 8), torch.randn(4, 9))


def test_eligibility_and_buckets():
    assert [mc.bucket_of(m) for m in (0, 1, 2, 16, 17, 64, 65, 256, 1024, 1025)] == \
        ["m1", "m1", "m16", "m16", "m64", "m64", "m256", "m256", "m1024", "large"]
    tma = mc.BY_NAME["tma128x256x64_g8_w8_s3"]
    assert mc.ineligible(tma, "bfloat16", 6144, 4104) is None
    assert "multiples of 8" in mc.ineligible(tma, "bfloat16", 6144, 4098)
    assert all(c["kind"] != "tma" for c in mc.candidates("large", "bfloat16", 6144, 4098))
    for bucket, _ in mc.BUCKETS:
        assert mc.default_config(bucket, "bfloat16", 6144, 4096)["kind"] != "cublaslt"
        names = [c["name"] for c in mc.candidates(bucket, "bfloat16", 6144, 4096)]
        assert "cublaslt" in names and len(set(names)) == len(names)


def test_launches_are_launch_rules_for_a_symbolic_m():
    plan = mc.launches(mc.get("t64x64x128_g1_w4_s4_k2"), "bfloat16", True, 6144, 4096, "T")
    assert [s.name for s in plan["specs"]] == ["matmul_bf16_t64x64x128_g1_w4_s4_k2_bias",
                                              "matmul_splitk_reduce_bf16_k2_bias"]
    assert plan["scratch"] == [("part", "float32", "((T) * (6144)) * (2)")]
    (_, g0, a0), (_, g1, a1) = plan["ops"]
    assert g0 == ("(cdiv(T, 64)) * (96)", 2, 1) and a0[2:4] == ["a", "part"]
    assert a1 == ["part", "bias", "c", "M", "N"]
    # The partial kernel never sees the bias; the reduce adds it. K=4096 splits evenly.
    assert plan["specs"][0].constexprs["HAS_BIAS"] is False
    assert plan["specs"][0].constexprs["EVEN_K"] is True
    persist = mc.launches(mc.get("tma128x128x64_g8_w8_s4_p"), "bfloat16", False, 6144, 4096,
                          8192)
    assert persist["ops"][0][1] == (mc.NUM_SMS, 1, 1)
