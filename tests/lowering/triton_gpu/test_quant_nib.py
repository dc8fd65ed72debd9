"""4-bit weights in the nib layout (ops/quant/nib_layout.py, ops/quant_nib.py) and their kernels
(kernels/quant_nib.py) under Triton's interpreter: the repack is exact against the gguf / GPTQ
references for every format, the GEMV and dot kernels match the float64 product for float32,
bfloat16 and float16 X, with split-K, N not a multiple of 4 and K that shrinks the tile; the
cuda rewrite turns qmatmul into nib_repack + nib_matmul, and the CPU gets qmatmul back."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from graphir.lowering.triton_gpu.kernels import quant_nib_config as qn  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_nib import _LOP3, _or_magic  # noqa: E402
from graphir.lowering.triton_gpu.kernels.quant_nib_block import _sbyte  # noqa: E402
from graphir.lowering.triton_gpu.kernels.spec import cdiv  # noqa: E402
from graphir.ops.quant.gguf_blocks import dequantize_gguf  # noqa: E402
from graphir.ops.quant.gguf_quantize import quantize_gguf  # noqa: E402
from graphir.ops.quant.gptq import dequantize_gptq  # noqa: E402
from graphir.ops.quant.gptq_layout import gptq_weight_bytes, pack_rows  # noqa: E402
from graphir.ops.quant_nib import _matmul_rule, _repack_ref, nib_weight  # noqa: E402

GGUF = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K", "q6_k": "Q6_K"}


def gguf_weight(rng, fmt, n, k):
    """(nib operands, float32 reference weight [n, k]) of a random GGUF weight."""
    enc = GGUF[fmt]
    raw = quantize_gguf((rng.standard_normal((n, k)) * 0.1).astype(np.float32), enc)
    ops = _repack_ref([raw], dict(fmt=fmt, k=k, encoding=enc))
    return ops, dequantize_gguf(raw, enc, k)


def gptq_weight(rng, fmt, n, k, group, fmt_v1=True):
    codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, (k // group, n)).astype(np.float16)
    qw = pack_rows(codes, 4)
    zeros = None
    if fmt == "gptq":
        z = rng.integers(0, 15, (k // group, n), dtype=np.uint8)
        zeros = pack_rows(np.ascontiguousarray(z.T), 4).T.copy()
    ins = [gptq_weight_bytes(qw, scales)] + ([zeros] if zeros is not None else [])
    ops = _repack_ref(ins, dict(fmt=fmt, k=k, group_size=group,
                                checkpoint_format="gptq" if fmt_v1 else "gptq_v2"))
    want = dequantize_gptq(qw, scales, zeros, None, group,
                           checkpoint_format="gptq" if fmt_v1 else "gptq_v2")
    return ops, want.T


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q4_k", "q6_k"])
def test_gguf_repack_is_exact(fmt):
    rng = np.random.default_rng(3)
    n, k = 13, 512                               # n not a multiple of 4: zero rows padded
    ops, want = gguf_weight(rng, fmt, n, k)
    assert ops[0].shape == (4, k // 8, 4) and ops[0].dtype == np.int32
    np.testing.assert_array_equal(nib_weight(fmt, n, ops), want)


@pytest.mark.parametrize("fmt,v1", [("gptq", True), ("gptq", False), ("gptq_sym", True)])
def test_gptq_repack_is_exact(fmt, v1):
    rng = np.random.default_rng(4)
    n, k, group = 16, 256, 64
    ops, want = gptq_weight(rng, fmt, n, k, group, v1)
    np.testing.assert_array_equal(nib_weight(fmt, n, ops, group), want)


def launch(x, ops, fmt, n, conf, group=32):
    """y = x @ W^T with the nib kernels of `conf` (fp32 partials + torch sum when split)."""
    k = x.shape[1]
    specs = qn.nib_specs(fmt, {torch.float32: "float32", torch.bfloat16: "bfloat16",
                               torch.float16: "float16"}[x.dtype], conf, group)
    s = specs[0]
    nj, cols = qn.gemv_geometry(k, conf["NJ"], conf["SPLIT_K"])
    assert nj == s.constexprs["NJ"], "configs passed here must already fit K"
    return run_spec(s, x, ops, n, cols, conf["SPLIT_K"], fill=0.0)


def run_spec(s, x, ops, n, cols, split, fill=float("nan")):
    """Launch nib kernel spec s on X and the layout's arrays ops (codes, scales[, extra[,
    crumbs]]; formats without one pass another array the kernel never reads) with cols (the
    kernel's run of K a split): y = x @ W^T as float64, split K's fp32 partials summed by
    torch. The output starts as `fill`."""
    m, k = x.shape
    t = [torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy()) for a in ops]
    t[0] = t[0].view(torch.int32)
    extra = t[2] if len(t) > 2 else t[1]
    crumbs = t[3] if len(t) > 3 else t[0]
    out = torch.full((split, m, n) if split > 1 else (m, n), fill,
                     dtype=torch.float32 if split > 1 else x.dtype)
    s.fn[s.grid_for(M=m, N=n)](x, t[0], t[1], extra, crumbs, out, m, n, k, cols, **s.constexprs,
                               num_warps=s.num_warps)
    return (out.sum(0) if split > 1 else out).double().numpy()


CASES = [("q4_0", 32), ("q4_1", 32), ("q4_k", 32), ("gptq", 64), ("gptq_sym", 128),
         ("q6_k", 32)]


def weight_for(rng, fmt, n, k, group):
    """GPTQ's packed zero points need N % 8 == 0: its N is rounded up (GGUF keeps a ragged N)."""
    return gptq_weight(rng, fmt, n, k, group) if fmt.startswith("gptq") \
        else gguf_weight(rng, fmt, n, k)


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.bfloat16, 2),
                                        (torch.float16, 4)])
def test_gemv_matches_product(fmt, group, dtype, rows):
    # 3 rows of X: a program per row, or 2 / 4 rows a program sharing each decoded word (rows
    # past M re-read the last on load and are masked on store).
    rng = np.random.default_rng(hash((fmt, str(dtype))) % 2**32)
    n, k, m = (40 if fmt.startswith("gptq") else 37), 512, 3
    ops, w = weight_for(rng, fmt, n, k, group)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    conf = dict(GEMV=1, BG=2, NJ=16, num_warps=1, SPLIT_K=1, PREFETCH=1, ROWS=rows)
    got = launch(x, ops, fmt, n, conf, group)
    want = x.double().numpy() @ w.astype(np.float64).T
    tol = 1e-5 if dtype == torch.float32 else 1e-2      # the output's rounding only
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("fmt,group,dtype,split", [
    ("q4_0", 32, torch.float32, 1), ("q4_1", 32, torch.bfloat16, 2),
    ("q4_k", 32, torch.bfloat16, 2), ("gptq", 64, torch.float32, 2),
    ("gptq_sym", 128, torch.float16, 1), ("q6_k", 32, torch.float32, 2)])
def test_block_gemv_matches_product(fmt, group, dtype, split):
    # The one-row GEMV a block a lane (each block's terms applied once to its chained products):
    # 3 rows of X (a program each), ragged N, K split in two; weight loads evict-first, as shipped.
    rng = np.random.default_rng(hash((fmt, str(dtype), 7)) % 2**32)
    n, k, m = (40 if fmt.startswith("gptq") else 37), 512, 3
    ops, w = weight_for(rng, fmt, n, k, group)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    conf = dict(GEMV=1, BLK=1, BG=2, NJ=16, num_warps=1, SPLIT_K=split, WEV=1)
    got = launch(x, ops, fmt, n, conf, group)
    want = x.double().numpy() @ w.astype(np.float64).T
    tol = 1e-5 if dtype == torch.float32 else 1e-2      # the output's rounding only
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("fmt,group", [("q4_k", 32), ("gptq", 64), ("q6_k", 32)])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_gemv_split_k_and_a_shrunk_tile(fmt, group, prefetch):
    rng = np.random.default_rng(9 + prefetch)
    n, k = (24 if fmt == "gptq" else 21), 768    # 96 word columns: NJ 64 shrinks to 32
    ops, w = weight_for(rng, fmt, n, k, group)
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    nj, _ = qn.gemv_geometry(k, 64, 2)
    assert nj == 32
    conf = dict(GEMV=1, BG=1, NJ=nj, num_warps=1, SPLIT_K=2, PREFETCH=prefetch,
                ROWS=(1, 2, 4)[prefetch])
    got = launch(x, ops, fmt, n, conf, group)
    want = x.double().numpy() @ w.astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("m,split,prefetch", [(3, 1, 0), (17, 2, 1)])
def test_dot_matches_product(fmt, group, m, split, prefetch):
    rng = np.random.default_rng(m + split + len(fmt))
    n, k = (24 if fmt.startswith("gptq") else 22), 256
    ops, w = weight_for(rng, fmt, n, k, group)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
    conf = dict(BM=16, BG=4, NJ=8, num_warps=4, num_stages=1, SPLIT_K=split, PREFETCH=prefetch)
    got = launch(x, ops, fmt, n, conf, group)
    want = x.double().numpy() @ w.astype(np.float64).T
    # The dot rounds the decoded weight to bfloat16, as the GGUF dot kernels do.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("fmt,group", CASES)
def test_dequant_kernel_matches_the_reference(fmt, group):
    # The many-row path's decode into X's dtype: the reference's values within bfloat16's
    # ulp (the interpreter's float32 -> bfloat16 cast truncates, the GPU's rounds).
    rng = np.random.default_rng(len(fmt) + group)
    n, k = (24 if fmt.startswith("gptq") else 22), 768     # 96 word columns: NJ 16
    ops, w = weight_for(rng, fmt, n, k, group)
    spec = qn.nib_dequant_spec(fmt, "bfloat16", k, group)
    t = [torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy()) for a in ops]
    t[0] = t[0].view(torch.int32)
    out = torch.full((n, k), float("nan"), dtype=torch.bfloat16)
    spec.fn[spec.grid_for(N=n, K=k)](t[0], t[1], t[2] if len(t) > 2 else t[1],
                                     t[3] if len(t) > 3 else t[0], out, n, k,
                                     **spec.constexprs, num_warps=spec.num_warps)
    want = w.astype(np.float32)
    np.testing.assert_allclose(out.float().numpy(), want, rtol=2.0**-7, atol=1e-6)


def test_gemv_geometry_refuses_an_empty_split():
    # 96 word columns in 4 splits of 32 would leave the fourth with none (its first tile, loaded
    # before the loop, would lie past the row).
    assert qn.gemv_geometry(768, 32, 3) == (32, 32)
    with pytest.raises(ValueError, match="leaves the last split empty"):
        qn.gemv_geometry(768, 32, 4)
    with pytest.raises(ValueError, match="leaves the last split empty"):
        qn.mma_geometry(4096 + 1024, 4, 16, 2)      # 160 blocks in runs of 16
    with pytest.raises(ValueError, match="leaves the last split empty"):
        qn.tc_geometry(768, 16, 4)


def test_config_buckets_fit_k_and_fill_the_gpu():
    for m in (1, 2, 3, 16, 64, 65, None):
        for k in (4096, 14336, 11008, 4128, 4224, 352):
            for n in (4096, 14336, 40):
                for fmt, dt in (("q4_0", "bfloat16"), ("q4_k", "float32"), ("gptq", "float16"),
                                ("q6_k", "bfloat16")):
                    conf, cols = qn.nib_config(m, k, n, fmt, dt)
                    if conf.get("DEQUANT"):
                        continue
                    if conf.get("MMA"):
                        # 3-8 rows of 16-bit X (2 of a large weight): the warp-MMA kernel,
                        # whole steps of NB blocks a warp in each split, ~4 programs an SM.
                        # 9-16 rows: two sets of 8 rows a program, ~3 programs an SM.
                        assert dt != "float32" and (qn.mma_first_row(fmt, n) <= m <= 8
                                                    or 8 < m <= 16), m
                        assert conf.get("XN", 1) == (2 if m > 8 else 1)
                        step = conf["num_warps"] * conf["NB"]
                        assert (k // 32) % step == 0 and cols % step == 0
                        assert cdiv(k // 32, cols) <= conf["SPLIT_K"]
                        if n < 8448 and k % 1024 == 0 and not (fmt == "q6_k" and m > 8):
                            # Fewer than two programs an SM: 8 warps of 4 blocks a step.
                            assert (conf["num_warps"], conf["NB"], conf["SPLIT_K"]) == (8, 4, 1)
                        elif k >= 4096:
                            want = 500 if conf.get("XN", 1) == 1 else 400
                            assert cdiv(n, 32) * conf["SPLIT_K"] >= min(want, 2 * n // 32) \
                                or not qn.fills(k // 32, step, 2 * conf["SPLIT_K"])
                        continue
                    nj = conf["NW"] if conf.get("TC") else conf["NJ"]
                    assert (k // 8) % nj == 0 and cols % nj == 0
                    assert cdiv(k // 8, cols) <= conf["SPLIT_K"]
                    if conf.get("TC"):
                        # 5-16 rows of 16-bit X: the tensor-core kernel, its grid ~4 programs
                        # an SM where K allows.
                        assert 4 < (m or 0) <= 16 and dt != "float32" and k % 128 == 0
                        assert m > 8 or k % 256
                        assert m <= 8 or k % 256
                        if k >= 4096:
                            assert cdiv(n, conf["BN"]) * conf["SPLIT_K"] >= min(500, 16 * n // 64) \
                                or not qn.fills(k // 8, conf["NW"], 2 * conf["SPLIT_K"])
                    elif not conf.get("GEMV") and k >= 4096:
                        # Dot tiles of a 4096-row weight split K to fill the 132 SMs twice,
                        # unless twice the split would leave one without columns.
                        sp = conf["SPLIT_K"]
                        assert cdiv(n, 4 * conf["BG"]) * sp >= min(264, 8 * cdiv(n, 64)) \
                            or not qn.fills(k // 8, nj, 2 * sp), (k, n, sp)
    assert qn.nib_config(1, 4096)[0].get("BLK") and qn.nib_config(1, 4096)[0].get("WEV")
    assert qn.nib_config(1, 4096, 14336)[0]["num_warps"] == 1
    # K = 11008 (32 word columns a step): fewer blocks than lanes, so the word-a-lane GEMV.
    assert qn.nib_config(1, 11008)[0].get("GEMV") and not qn.nib_config(1, 11008)[0].get("BLK")
    assert qn.nib_config(16, 4096, 14336)[0].get("XN") == 2
    assert qn.nib_config(16, 4096)[0].get("XN") == 2 and qn.nib_config(16, 4096)[0]["NB"] == 4
    assert qn.nib_config(16, 4096, 14336)[0]["SPLIT_K"] == 1
    assert qn.nib_config(16, 4096, 4096, "q6_k")[0]["SPLIT_K"] == 4
    assert qn.nib_config(2, 4096)[0].get("GEMV") and qn.nib_config(2, 4096, 14336)[0].get("MMA")
    assert qn.nib_config(8, 4096)[0].get("MMA") and qn.nib_config(8, 4096, 4096, "q6_k")[0].get("MMA")
    assert qn.nib_config(8, 4096, 4096, "q4_0", "float32")[0].get("GEMV")
    # Q6_K takes the warp-MMA kernel from two rows on either weight, the block GEMV at one.
    assert qn.nib_config(1, 4096, 14336, "q6_k")[0].get("BLK")
    assert qn.nib_config(2, 4096, 14336, "q6_k")[0].get("MMA")
    assert qn.nib_config(1, 4096, 4096, "q6_k")[0].get("GEMV")
    assert qn.nib_config(2, 4096, 4096, "q6_k")[0].get("MMA")
    assert qn.nib_config(1, 4096, 14336, "q6_k", "float32")[0].get("GEMV")
    assert qn.nib_config(16, 4096, 4096, "q4_0", "float32")[0].get("BM") == 16
    assert qn.nib_config(16, 4096, 14336, "q6_k")[0].get("MMA")
    assert qn.nib_config(16, 4096, 4096, "q6_k", "float32")[0].get("DEQUANT")
    # K = 4128 (not a multiple of 128): the dot tiles, not the tensor-core kernel; 4224 (not
    # of 256): the GEMV's 4-row programs and the tensor-core kernel, not the warp-MMA kernel.
    assert not qn.nib_config(16, 4128)[0].get("TC") and qn.nib_config(16, 11008)[0].get("MMA")
    assert qn.nib_config(16, 4224)[0].get("TC")
    assert qn.nib_config(4, 4224)[0].get("GEMV") and qn.nib_config(8, 4224)[0].get("TC")
    assert qn.nib_config(8, 11008)[0].get("MMA")


def _qmatmul_graph(enc, n, k, dtype="float32"):
    from graphir import Graph, TensorType, Weight, ops
    from graphir.dtype import DType

    raw = quantize_gguf((np.random.default_rng(0).standard_normal((n, k)) * 0.1)
                        .astype(np.float32), enc)
    with Graph("q", input_types=[TensorType(DType[dtype], ["T", k])]) as g:
        w = Weight("w", DType.uint8, list(raw.shape))
        g.output(ops.qmatmul(enc, None, g.inputs[0], w))
    return g, raw


def test_cuda_rewrite_and_the_way_back():
    import graphir.lowering.triton_gpu.backend  # noqa: F401  (registers the cuda lowerings)
    from graphir.lowering.driver import _copy, decompose
    from graphir.runtime.interpreter import run

    g, raw = _qmatmul_graph("Q4_K", 12, 256)
    cu = _copy(g)
    decompose(cu, "cuda")
    text = str(cu)
    assert "gir.nib_repack" in text and "gir.nib_matmul" in text and "gir.qmatmul" not in text
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    want = run(g, x, weights={"w": raw})[0]
    np.testing.assert_allclose(run(cu, x, weights={"w": raw})[0], want, rtol=1e-5, atol=1e-6)
    back = _copy(cu)
    decompose(back, "cpu")
    assert "gir.nib_" not in str(back) and "gir.qmatmul" in str(back)
    np.testing.assert_allclose(run(back, x, weights={"w": raw})[0], want, rtol=1e-6, atol=1e-7)


def test_rule_names_the_bad_operand():
    from graphir import TensorType
    from graphir.dtype import DType

    x = TensorType(DType.bfloat16, [2, 256])
    codes = TensorType(DType.int32, [3, 32, 4])
    bad = TensorType(DType.uint8, [3, 8, 4])          # q4_0 scales are [3, 8, 8] bytes
    with pytest.raises(ValueError, match="operand 2 must be u8"):
        _matmul_rule([x, codes, bad], dict(fmt="q4_0", out=12))
    with pytest.raises(ValueError, match="fmt must be one of"):
        _matmul_rule([x, codes, bad], dict(fmt="q5_0", out=12))


@pytest.mark.parametrize("enc,dtype,k", [("Q4_K", "float32", 256), ("Q6_K", "bfloat16", 256),
                                         ("Q4_0", "bfloat16", 256), ("Q4_0", "bfloat16", 384)])
def test_compiled_plan_takes_each_row_bucket(enc, dtype, k):
    # One compiled cuda plan of a qmatmul, run by the plan runner with its kernels under the
    # interpreter at a row count of each bucket: the GEMV (1 row, 3 rows in a program, 6 in
    # two), the dot (10), for 16-bit X the warp-MMA kernel (3 and 6; 10 in its two-set form)
    # instead, or, where K is a multiple of 128 but not of 256, the GEMV (3) and the
    # tensor-core kernel (6, 10); and the decode into scratch + the plain matmul (70).
    from graphir.runtime.interpreter import run
    from tests.lowering.triton_gpu.test_backend_interp import interp_executor

    from graphir.dtype import DType, round_to

    g, raw = _qmatmul_graph(enc, 12, k, dtype)
    ex, dev = interp_executor(g, {"w": raw})
    rng = np.random.default_rng(len(enc))
    tol = 1e-4 if dtype == "float32" else 2e-2     # bf16: the output's and the decode's rounding
    if dtype == "float32":
        want_kernels = ("gemv_r1", "gemv_r4", "gemv_r4", "matmul_m16", "dequant")
    elif k % 256:
        want_kernels = ("gemv_r1", "gemv_r4", "_tc_", "_tc_", "dequant")
    else:
        want_kernels = ("gemv_r1", "_mma_x1", "_mma_x1", "_mma_x2", "dequant")
    for m, kernel in zip((1, 3, 6, 10, 70), want_kernels):
        x = round_to(rng.standard_normal((m, k)), DType[dtype])
        dev.launched.clear()
        (got,) = ex.execute(x)
        (want,) = run(g, x, weights={"w": raw})
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
        nib = [k for k in dev.launched if k.startswith(f"nib_{enc.lower()}_")]
        assert nib and kernel in nib[0], (m, dev.launched)
        if kernel == "_tc_":
            # X reordered into the kernel's planes first, into the variant's scratch.
            assert any(k.startswith("nib_x_planes_") for k in dev.launched), dev.launched
        if kernel == "dequant":
            assert any(k.startswith(("matmul_", "cublaslt_")) for k in dev.launched), dev.launched


@pytest.mark.parametrize("enc", ["Q4_K", "Q6_K"])
def test_compiled_plan_takes_the_block_gemv_for_one_row(enc):
    # One row of X over K = 1024 (128 word columns: the block GEMV's tile whole), through the
    # compiled cuda plan under the interpreter.
    from graphir.runtime.interpreter import run
    from tests.lowering.triton_gpu.test_backend_interp import interp_executor

    from graphir.dtype import DType, round_to

    g, raw = _qmatmul_graph(enc, 12, 1024, "bfloat16")
    ex, dev = interp_executor(g, {"w": raw})
    x = round_to(np.random.default_rng(5).standard_normal((1, 1024)), DType.bfloat16)
    (got,) = ex.execute(x)
    (want,) = run(g, x, weights={"w": raw})
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert [k for k in dev.launched if k.startswith(f"nib_{enc.lower()}_")][0].startswith(
        f"nib_{enc.lower()}_gemvblk_"), dev.launched


@pytest.mark.parametrize("dtype,after", [("float32", 4), ("bfloat16", 16)])
def test_plan_variants_end_at_the_decode_path(dtype, after):
    # Q6_K leaves the nib kernels after 4 rows of float32 X (16 of 16-bit X: the warp-MMA
    # kernel takes 3-16): the plan's variants are the nib buckets, then the decode + matmul
    # variants ending with the catch-all, and nothing unreachable after it.
    import graphir.lowering.triton_gpu.backend  # noqa: F401  (registers the cuda lowerings)
    from graphir.lowering.driver import _copy, decompose
    from graphir.lowering.triton_gpu.backend import lower

    from graphir.lowering.triton_gpu import tuning

    g, _ = _qmatmul_graph("Q6_K", 12, 256, dtype)
    g = _copy(g)
    decompose(g, "cuda")
    with tuning.using(tuning.Selector()) as sel:
        steps = lower(g).plan.to_json()["steps"]
    # The matmul after the decode is chosen (and would be tuned) only past the nib buckets.
    (site,) = [s for s in sel.sites if s.family == "matmul"]
    want = ["m16", "m64", "m256", "m1024", "large"] if after == 4 else \
        ["m64", "m256", "m1024", "large"]
    assert [ch.bucket for ch in site.choices] == want
    (step,) = [s for s in steps if s["op"] == "nib_matmul"]
    whens = [v["when"] for v in step["attrs"]["variants"]]
    assert whens[-1] is None and None not in whens[:-1], whens
    rows = whens[0].rsplit(" <= ", 1)[0]       # the row count's expression
    tops = (1, 2, 4) if after == 4 else (1, 2, 8, 16)
    assert whens[:len(tops)] == [f"{rows} <= {top}" for top in tops], whens


@triton.jit
def _mask_or_kernel(x_ptr, o_ptr, EXP: tl.constexpr):
    v = tl.load(x_ptr + tl.arange(0, 16))
    tl.store(o_ptr + tl.arange(0, 16), _or_magic(v, 0xF0, EXP))


def test_the_mask_or_takes_only_the_magics_its_asm_has():
    """_or_magic ORs the float 2**EXP into masked codes; on the GPU its inline lop3 is picked
    from a table of magics, so an EXP outside it must fail to compile, not take another's."""
    x = torch.from_numpy(np.random.default_rng(5).integers(-2**31, 2**31, 16, dtype=np.int64)
                         .astype(np.int32))
    for exp in (23, 19, 15, 11):
        o = torch.empty_like(x)
        _mask_or_kernel[(1,)](x, o, exp)
        magic = np.float32(2.0 ** exp).view(np.int32)
        assert np.array_equal(o.numpy(), (x.numpy() & 0xF0) | magic), exp
        assert f" {magic}, 0xEA;" in _LOP3[exp].value
    with pytest.raises(Exception):
        _mask_or_kernel[(1,)](x, torch.empty_like(x), 7)


@triton.jit
def _sbyte_kernel(w_ptr, o_ptr):
    w = tl.load(w_ptr + tl.arange(0, 64))[:, None]
    r = tl.arange(0, 4)[None, :]
    tl.store(o_ptr + tl.arange(0, 64)[:, None] * 4 + r, _sbyte(w, r))


def test_q6_scale_bytes_decode_as_signed_int8():
    """The block GEMV reads q6_k's int8 scales four to a word (_sbyte): each of the 256 byte
    values, at every byte position, comes out as its signed value exactly."""
    b = np.random.default_rng(11).permutation(256).astype(np.uint8).reshape(64, 4)
    w = torch.from_numpy(b.view(np.int32).reshape(64).copy())   # byte r at bits 8r
    o = torch.empty(64, 4)
    _sbyte_kernel[(1,)](w, o)
    assert np.array_equal(o.numpy(), b.view(np.int8).astype(np.float32))
