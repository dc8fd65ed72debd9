"""Every matmul candidate compiles offline for sm_90 (no GPU): it fits Hopper's shared memory,
spills nothing, and the compiler did what the config is for (wgmma tiles, TMA descriptors in
Triton's global scratch, warp-specialized producer/consumer warp groups, a subtiled epilogue). Compiles in a subprocess without the interpreter (conftest.py)."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import PARALLEL, run_compiled_mode

SCRIPT = PARALLEL + r"""
import json, os, re, subprocess, tempfile
import triton
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
def all_specs():
    for dtype, table in (("bfloat16", mc.CANDIDATES), ("float32", mc.FP32_CANDIDATES)):
        for cfg in {c["name"]: c for cs in table.values() for c in cs}.values():
            if cfg["kind"] != "cublaslt":
                for spec in mc.specs(cfg, dtype, True, K=4096, N=6144):
                    yield dtype, cfg, spec

precompile([spec for _, _, spec in all_specs()])
out = {}
for dtype, table in (("bfloat16", mc.CANDIDATES), ("float32", mc.FP32_CANDIDATES)):
    for cfg in {c["name"]: c for cs in table.values() for c in cs}.values():
        if cfg["kind"] == "cublaslt":
            continue
        for spec in mc.specs(cfg, dtype, True, K=4096, N=6144):
            c = aot.compile_spec(spec)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(c.ptx)
            log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr
            os.unlink(f.name)
            spill = re.search(r"(\d+) bytes spill stores", log)
            out[dtype + "/" + spec.name] = dict(
                kind=cfg["kind"], block_m=cfg.get("BLOCK_M"), magic=c.cubin[:4].hex(),
                ws=bool(cfg.get("WS")), subtile=bool(cfg.get("SUBTILE")), warps=c.num_warps,
                setmaxnreg="setmaxnreg" in c.ptx,
                stores=c.ptx.count("cp.async.bulk.tensor.2d.global.shared::cta"),
                shared=c.shared, scratch=c.global_scratch_size,
                wgmma="wgmma.mma_async" in c.ptx, mma_sync="mma.sync" in c.ptx,
                tma="cp.async.bulk.tensor" in c.ptx, spill=int(spill.group(1)) if spill else -1,
                last_params=[p[0] for p in c.params[-2:]])
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_compiled_mode(SCRIPT, tmp_path_factory, timeout=1200)


def test_every_candidate_builds_and_fits(compiled):
    from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

    names = {c["name"] for cs in mc.CANDIDATES.values() for c in cs if c["kind"] != "cublaslt"}
    built = {k.split("/", 1)[1] for k in compiled if k.startswith("bfloat16/")}
    assert {f"matmul_bf16_{n}_bias" for n in names} <= built
    for key, info in compiled.items():
        assert info["magic"] == "7f454c46", key
        assert 0 <= info["shared"] <= 227 * 1024, key
        assert info["spill"] == 0, key
        assert info["last_params"] == ["global_scratch", "profile_scratch"], key


def test_the_compiler_used_hopper_features(compiled):
    for key, info in compiled.items():
        if "splitk_reduce" in key:
            continue
        if info["kind"] == "tma":
            # Three device-side descriptors of 128 bytes each per program (a fourth copy for
            # the producer warp group when warp-specialized).
            assert info["tma"] and info["wgmma"], key
            assert info["scratch"] == (512 if info["ws"] else 384), key
            # Warp specialization took: 1 producer + 2 consumer warp groups, registers moved.
            assert (info["warps"] == 12 and info["setmaxnreg"]) == info["ws"], key
        else:
            assert not info["tma"] and info["scratch"] == 0, key
        if info["kind"] == "tile" and info["block_m"] >= 64:
            assert info["wgmma"], key
        if info["kind"] == "tile" and info["block_m"] == 16:
            assert info["mma_sync"], key  # wgmma needs 64 rows; skinny tiles use mma.sync
        if info["kind"] == "gemv":
            assert not info["wgmma"] and not info["mma_sync"], key
    # The subtiled epilogue stores its tile in two halves: twice the TMA stores.
    whole = compiled["bfloat16/matmul_bf16_tma128x256x64_g8_w8_s3_p_bias"]
    halves = compiled["bfloat16/matmul_bf16_tma128x256x64_g8_w8_s4_p_e_bias"]
    assert halves["subtile"] and halves["stores"] == 2 * whole["stores"]
