"""The quantized matmul kernels compile offline (no GPU) to sm_90 cubins: every GGUF encoding's
decoder, every row bucket's tile config (the decode GEMV buckets and the dot buckets), GPTQ 4-
and 8-bit with zeros and desc_act; each fits Hopper's shared memory and spills nothing; GPTQ's
packed words stream through cp.async; the GEMV kernels use no tensor cores."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import PARALLEL, RESOURCES, run_compiled_mode

SCRIPT = RESOURCES + PARALLEL + r"""
import json
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import quant as qk, quant_gptq as gk
from graphir.lowering.triton_gpu.kernels.quant_gguf import FORMATS

jobs = []
for enc in FORMATS:
    k = 4096
    rb = k // FORMATS[enc].block_elems * FORMATS[enc].block_bytes
    for m in (1, 16):
        jobs.append((f"{enc}/m{m}", qk.matmul_specs(enc, "bfloat16", qk.config_for(m, enc, 4096, k,
                                                                                 gemv=m == 1), rb)))
    if enc in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K"):
        for m in (2, 4):
            jobs.append((f"{enc}/m{m}", qk.matmul_specs(
                enc, "bfloat16", qk.config_for(m, enc, 14336, k, gemv=True), rb)))
for enc in ("Q4_K", "Q6_K", "Q3_K"):
    for m in (64, None):
        jobs.append((f"{enc}/m{m}", qk.matmul_specs(enc, "bfloat16", qk.config_for(m, enc, 4096, 4096),
                                                    4096 // 256 * FORMATS[enc].block_bytes)))
for m in (1, None):
    jobs.append((f"Q8_0/fp32/m{m}", qk.matmul_specs("Q8_0", "float32",
                                                    qk.config_for(m, "Q8_0", 4096, 4096, "float32"))))
jobs.append(("gptq/fp32", gk.matmul_specs(
    "float32", gk.config_for(1, 4096, 4096, 4, "float32", gemv=False), has_zeros=True)))
jobs.append(("Q4_0/fp16", qk.matmul_specs("Q4_0", "float16", qk.config_for(64, "Q4_0", 4096, 4096))))
jobs.append(("Q4_K/fp16/m1", qk.matmul_specs("Q4_K", "float16", qk.config_for(1, "Q4_K", 4096, 4096),
                                             2304)))
jobs.append(("dequant", [qk.dequant_spec("Q4_K"), qk.dequant_spec("Q5_0")]))
jobs.append(("gptq/fp32/gemv", gk.matmul_specs("float32", gk.config_for(
    4, 4096, 4096, 4, "float32", gemv=True), has_zeros=True, has_perm=True, n=4096)))
for m in (1, 2, 4, 16, 64, None):
    for bits, z, perm in ((4, False, False), (4, True, True), (8, True, True)):
        conf = gk.config_for(m, 4096, 4096, bits, gemv=m is not None and m <= 4)
        jobs.append((f"gptq{bits}{'z' if z else ''}{'p' if perm else ''}/m{m}",
                     gk.matmul_specs("bfloat16", conf, bits=bits, has_zeros=z, has_perm=perm,
                                     n=4096)))
precompile([s for _, specs in jobs for s in specs])
out = {}
for label, specs in jobs:
    for s in specs:
        c = aot.compile_spec(s)
        out[f"{label}/{s.name}"] = record(s, c)
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_compiled_mode(SCRIPT, tmp_path_factory, timeout=1500)


def test_every_kernel_compiles_fits_and_does_not_spill(compiled):
    from graphir.lowering.triton_gpu.aot import MAX_SHARED_SM90

    assert len(compiled) >= 80
    for name, c in compiled.items():
        assert c["magic"] == "7f454c46", name          # an ELF cubin
        assert c["shared"] <= MAX_SHARED_SM90, (name, c["shared"])
        if c["res"] is not None:
            reg, stack, local = c["res"]
            assert stack == 0 and local == 0, (name, c["res"])


def test_tensor_cores_and_async_copies(compiled):
    for name, c in compiled.items():
        if "matmul" in name:
            assert c["wgmma"] + c["mma"] > 0, name   # the decoded tile goes to the tensor cores
        if "gemv" in name:
            assert c["wgmma"] + c["mma"] == 0, name  # decode batches: fp32 FMAs
        if name.startswith("gptq") and "matmul" in name:
            assert c["cp_async"] > 0, name           # dense packed words: pipelined copies
