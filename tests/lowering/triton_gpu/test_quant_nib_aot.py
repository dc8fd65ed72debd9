"""The nib kernels (kernels/quant_nib.py) compile offline to sm_90 cubins for every format and
row bucket the lowering ships (NIB_BUCKETS) and the many-row decode, plus float32 / float16
activations: each fits Hopper's shared memory and spills nothing; the GEMV and the decode use
no tensor cores and decode with the one-instruction mask-or (inline lop3); the dot buckets and
the tensor-core kernel (16-bit X, 5-16 rows) multiply on tensor cores. The warp-MMA kernel
(quant_nib_mma.py) compiles for every format and both 16-bit types with its lane tensors in one
layout (lane p of the tensor in lane p % 32 of warp p // 32) and no layout conversion or shared
memory inside its loop: its inline MMA depends on that placement. The shipped one-row GEMV and
warp-MMA buckets load the weight evict-first (the hint is in their PTX)."""

import re

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import PARALLEL, RESOURCES, run_compiled_mode

SCRIPT = RESOURCES + PARALLEL + r"""
import json
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import quant_nib_config as qn

jobs = []
for fmt in qn.FMT_IDS:
    group = 128 if fmt.startswith("gptq") else 32
    # 16 rows: the warp-MMA kernel's two-set form (split 4 for 4096 rows, 1 for 14336); of a
    # K that is a multiple of 128 but not of 256: the tensor-core kernel.
    for m, n, k in ((1, 4096, 4096), (4, 4096, 4096), (16, 4096, 4096), (16, 14336, 4096),
                    (16, 14336, 4224)):
        conf, _ = qn.nib_config(m, k, n, fmt, "bfloat16")
        if not conf.get("DEQUANT"):
            jobs.append((f"{fmt}/m{m}n{n}", qn.nib_specs(fmt, "bfloat16", conf, group)))
    jobs.append((f"{fmt}/dequant", [qn.nib_dequant_spec(fmt, "bfloat16", 4096, group)]))
for dt in ("float32", "float16"):
    for m in (1, 16):
        jobs.append((f"q4_k/{dt}/m{m}",
                     qn.nib_specs("q4_k", dt, qn.nib_config(m, 4096, 4096, "q4_k", dt)[0])))
    jobs.append((f"q4_k/{dt}/dequant", [qn.nib_dequant_spec("q4_k", dt, 4096)]))
for i, fmt in enumerate(qn.FMT_IDS):
    # Beside the shipped bucket (bfloat16, above): float16 X, or symmetric codes rounded with
    # their scale (SA 0), two steps of prefetch, a program of 8 warps.
    dt = ("bfloat16", "float16")[i % 2]
    conf = dict(MMA=1, num_warps=8, NB=2, SPLIT_K=2, PREFETCH=2, SA=i % 2)
    jobs.append((f"{fmt}/{dt}/mma", qn.nib_specs(fmt, dt, conf, 128 if fmt.startswith("gptq") else 32)))
precompile([s for _, specs in jobs for s in specs])
out = {}
for label, specs in jobs:
    for s in specs:
        c = aot.compile_spec(s)
        out[f"{label}/{s.name}"] = rec = record(s, c)
        if "_mma_" in s.name:
            ttgir = c.asm["ttgir"]
            loop = ttgir[ttgir.index("scf.for"):]
            loop = loop[:loop.index("scf.yield")]
            rec["loop_converts"] = loop.count("ttg.convert_layout") + loop.count("ttg.local_")
            w = s.num_warps
            rec["lane_layout"] = (f"threadsPerWarp = [32, 1], warpsPerCTA = [{w}, 1]" in ttgir
                                  and f"threadsPerWarp = [32], warpsPerCTA = [{w}]" in ttgir)
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


def test_mma_kernel_keeps_its_lane_layout(compiled):
    mma = {k: c for k, c in compiled.items() if "_mma_" in c["name"]}
    # The variants above and each format's shipped buckets (4 rows; 16 rows of a 4096- and a
    # 14336-row weight: two sets of 8 rows of X a program), and float16 X at 16 rows.
    assert len(mma) == 6 + 6 + 6 + 6 + 1
    assert sum("_mma_x2" in c["name"] for c in mma.values()) == 13
    for k, c in mma.items():
        xn, nb = (int(v) for v in re.search(r"_mma_x(\d)b(\d)", c["name"]).groups())
        assert c["mma"] == 4 * nb * xn and c["wgmma"] == 0, k     # blocks x 2 tiles x 2 (x sets)
        assert c["packed"] == 16 * nb, k    # 8 pairs a tile and block (symmetric: exact codes)
        assert c["loop_converts"] == 0 and c["lane_layout"], k
        assert c["shared"] <= 2048, k       # the warps' final sum only


def test_gemv_decodes_on_the_fma_pipe_and_dot_on_tensor_cores(compiled):
    gemv = {k: c for k, c in compiled.items()
            if "_gemv_" in c["name"] or "_gemvblk_" in c["name"] or "_dequant_" in c["name"]}
    dot = {k: c for k, c in compiled.items() if "_matmul_" in c["name"] or "_tc_" in c["name"]
           or "_mma_" in c["name"]}
    assert gemv and dot and any("_tc_" in c["name"] for c in dot.values())
    for k, c in gemv.items():
        assert c["wgmma"] == 0 and c["mma"] == 0 and c["lop3"] > 0, k
    # The shipped one-row GEMV loads its weight evict-first (four code words a step, q6_k's
    # crumbs too; the prefetch before the loop and the one in it), X with the default policy.
    # So do the shipped warp-MMA buckets (a 16-byte load of four code words a block).
    blk = {k: c for k, c in compiled.items() if "_gemvblk_" in c["name"]}
    mma = {k: c for k, c in compiled.items()
           if "_mma_" in c["name"] and "/mma/" not in k and "e_" in c["name"]}
    assert blk and all("e_" in c["name"] for c in blk.values()) and len(mma) >= 12
    for k, c in {**blk, **mma}.items():
        assert c["evict_first"] >= (2 if "_mma_" in c["name"] else 8), k
    for k, c in dot.items():
        # 64 or more weight rows a tile take wgmma (W in registers), fewer mma.sync; the
        # tensor-core kernel decodes two values an instruction (packed 16-bit arithmetic).
        assert c["wgmma"] + c["mma"] > 0, k
        packed = "_tc_" in c["name"] or "_mma_" in c["name"]
        assert (c["packed"] > 0) if packed else (c["lop3"] > 0), k
