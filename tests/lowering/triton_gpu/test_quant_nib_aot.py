"""The nib kernels (kernels/quant_nib.py) compile offline to sm_90 cubins for every format and
row bucket the lowering ships (NIB_BUCKETS) and the many-row decode, plus float32 / float16
activations: each fits Hopper's shared memory and spills nothing; the GEMV and the decode use
no tensor cores and decode with the one-instruction mask-or (inline lop3); the dot buckets and
the tensor-core kernel (16-bit X, 5-16 rows) multiply on tensor cores."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import RESOURCES, run_compiled_mode

SCRIPT = RESOURCES + r"""
import json
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import quant_nib_config as qn

jobs = []
for fmt in qn.FMT_IDS:
    group = 128 if fmt.startswith("gptq") else 32
    for m in (1, 16):
        conf, _ = qn.nib_config(m, 4096, 4096, fmt, "bfloat16")
        if not conf.get("DEQUANT"):
            jobs.append((f"{fmt}/m{m}", qn.nib_specs(fmt, "bfloat16", conf, group)))
    jobs.append((f"{fmt}/dequant", [qn.nib_dequant_spec(fmt, "bfloat16", 4096, group)]))
for dt in ("float32", "float16"):
    for m in (1, 16):
        jobs.append((f"q4_k/{dt}/m{m}",
                     qn.nib_specs("q4_k", dt, qn.nib_config(m, 4096, 4096, "q4_k", dt)[0])))
    jobs.append((f"q4_k/{dt}/dequant", [qn.nib_dequant_spec("q4_k", dt, 4096)]))
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


def test_every_nib_kernel_compiles_fits_and_does_not_spill(compiled):
    assert len(compiled) >= 6 * 4
    for key, c in compiled.items():
        assert c["shared"] <= 227 * 1024, key
        if c["res"] is not None:
            regs, stack, local = c["res"]
            assert stack == 0 and local == 0, (key, c["res"])


def test_gemv_decodes_on_the_fma_pipe_and_dot_on_tensor_cores(compiled):
    gemv = {k: c for k, c in compiled.items()
            if "_gemv_" in c["name"] or "_dequant_" in c["name"]}
    dot = {k: c for k, c in compiled.items() if "_matmul_" in c["name"] or "_tc_" in c["name"]}
    assert gemv and dot and any("_tc_" in c["name"] for c in dot.values())
    for k, c in gemv.items():
        assert c["wgmma"] == 0 and c["mma"] == 0 and c["lop3"] > 0, k
    for k, c in dot.items():
        # 64 or more weight rows a tile take wgmma (W in registers), fewer mma.sync; the
        # tensor-core kernel decodes two values an instruction (packed 16-bit arithmetic).
        assert c["wgmma"] + c["mma"] > 0, k
        assert (c["packed"] > 0) if "_tc_" in c["name"] else (c["lop3"] > 0), k
