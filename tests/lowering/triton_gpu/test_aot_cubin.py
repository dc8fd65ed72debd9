"""Every kernel compiles offline (no GPU) to an sm_90 cubin that fits Hopper's shared memory.

Compilation runs in a subprocess without TRITON_INTERPRET (conftest.py turns the interpreter on
for this directory) and with a private Triton cache, so each run really compiles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import json, re
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import flash_attention as fa, matmul as mm, paged_decode as pd
from graphir.lowering.triton_gpu.kernels import rms_norm as rn, rope_split_store as rss
from graphir.lowering.triton_gpu.lowerings import rope_store as rs

specs = (mm.aot_specs("bfloat16", has_bias=True) + mm.aot_specs("float16")
         + mm.aot_specs_fp8("bfloat16", a_rowwise=True, b_colwise=True)
         + rn.aot_specs(128) + rn.aot_specs(4096)
         + rss.aot_specs(32, 8, 128, 128)
         + rss.aot_specs(16, 4, 64, 128, interleaved=False, use_qk_norm=True)
         + fa.aot_specs(32, 8, 128, 128, mask="CAUSAL")
         + fa.aot_specs(32, 8, 128, 128, mask="SLIDING_WINDOW_CAUSAL")
         + fa.aot_specs(8, 8, 256, 128, dtype="float16", mask="CHUNKED_CAUSAL")
         + pd.aot_specs(32, 8, 128, 128)
         + [rs.kv_store_spec(0, 8, 128, 128, "bf16", "bf16"),
            rs.rope_spec(32, 128, "bf16", "fp32", True)])
out = {}
for s in specs:
    c = aot.compile_spec(s)
    entry = re.search(r"\.entry\s+(\w+)\s*\(([^)]*)\)", c.ptx)
    out[s.name + "/" + str(len(out))] = dict(
        magic=c.cubin[:4].hex(), shared=c.shared, name=c.name, params=c.params,
        ptx_params=entry.group(2).count(".param"), ptx_name=entry.group(1),
        has_stages=sorted(k for k in ("ttir", "ttgir", "llir", "ptx") if c.stage(k)),
        meta=c.launch_metadata(), grid=s.grid_for(**{a: 300 for a in s.grid_args}),
        res=resources(c.cubin), nh=s.constexprs.get("NH"))
try:
    aot.compile_kernel(mm.matmul_kernel, {"a_ptr": "*bf16"}, {})
except ValueError as e:
    out["error"] = str(e)
print("JSON" + json.dumps(out))
"""


# For the offline-compile scripts: registers, stack and local memory of a cubin (cuobjdump
# ships with Triton), None where cuobjdump is missing.
RESOURCES = r"""
import os, re, subprocess, tempfile
import triton
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def cuobjdump(cubin, flag):
    # cuobjdump's output for a cubin (flag: -res-usage, -sass); None without cuobjdump.
    if not os.path.exists(BIN):
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([BIN, flag, f.name], capture_output=True, text=True,
                              timeout=60).stdout
    finally:
        os.unlink(f.name)

def resources(cubin):
    out = cuobjdump(cubin, "-res-usage")
    if out is None:
        return None
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return [int(x) for x in m.groups()]

def record(s, c):
    # What the offline-compile tests check of spec s's compiled cubin c.
    return dict(shared=c.shared, name=s.name, magic=c.cubin[:4].hex(), res=resources(c.cubin),
                cp_async=c.ptx.count("cp.async"), wgmma=c.ptx.count("wgmma.mma_async"),
                mma=c.ptx.count("mma.sync"), lop3=c.ptx.count("1258291200, 0xEA"),
                packed=c.ptx.count("sub.rn.bf16x2") + c.ptx.count("sub.rn.f16x2"),
                evict_first=c.ptx.count("L1::evict_first"),
                tma=c.ptx.count("cp.async.bulk.tensor"))
"""


# For the offline-compile scripts: precompile(specs) builds a list of specs on two spawned
# workers (CI has two cores and pytest uses one), after which aot.compile_spec returns those
# cubins from memory; a spec whose parallel compile failed compiles again in the script, so
# the error surfaces where the script expects it.
PARALLEL = r"""
from graphir.lowering.triton_gpu import aot as _aot
from graphir.lowering.triton_gpu import tuning_gpu as _tg
_MEMO, _SERIAL = {}, _aot.compile_spec

def precompile(specs):
    specs = {repr(_tg._job(s)): s for s in specs}
    for k, c in _tg.compile_specs(specs, 90, workers=2).items():
        if not isinstance(c, Exception):
            _MEMO[k] = c

def _compile_spec(spec, target=_aot.SM90):
    c = _MEMO.get(repr(_tg._job(spec))) if target == _aot.SM90 else None
    return c if c is not None else _SERIAL(spec, target)

_aot.compile_spec = _compile_spec
"""


def run_compiled_mode(script: str, tmp_path_factory, timeout: int) -> dict:
    """Run `script` in a fresh Python without the interpreter and with private Triton and
    codegen caches; returns the JSON it prints on a line starting with "JSON"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["GRAPHIR_CODEGEN_DIR"] = str(tmp_path_factory.mktemp("codegen"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON"))
    return json.loads(line[4:])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_compiled_mode(RESOURCES + SCRIPT, tmp_path_factory, timeout=600)


def test_every_kernel_builds_a_cubin(compiled):
    kernels = {k: v for k, v in compiled.items() if k != "error"}
    assert len(kernels) == 21
    for key, info in kernels.items():
        assert info["magic"] == "7f454c46", key  # ELF
        assert 0 <= info["shared"] <= 227 * 1024, key
        assert info["has_stages"] == ["llir", "ptx", "ttgir", "ttir"], key
        assert info["ptx_name"] == info["name"], key


def test_launch_parameters_include_the_scratch_pointers(compiled):
    for key, info in compiled.items():
        if key == "error":
            continue
        # Triton 3.6 appends global_scratch and profile_scratch to the user's parameters.
        assert info["ptx_params"] == len(info["params"]), key
        assert [p[0] for p in info["params"][-2:]] == ["global_scratch", "profile_scratch"]
        meta = info["meta"]
        # The TMA prefill kernels keep one 128-byte descriptor per program in global scratch,
        # which the runtime allocates when it packs a launch (before any graph capture).
        tma_prefill = key.startswith("flash_attention") and meta["global_scratch_size"] == 128
        assert meta["global_scratch_size"] == 0 or tma_prefill, key
        assert meta["profile_scratch_size"] == 0, key
        assert meta["block"][0] == 32 * meta["num_warps"]


def test_grid_rules(compiled):
    grids = {k.split("/")[0]: v["grid"] for k, v in compiled.items() if k != "error"}
    assert grids["matmul_bf16_prefill_bias"] == [3 * 3, 1, 1]  # cdiv(300, 128) ** 2
    assert grids["rope_split_store_bf16_decode"] == [300, 1, 1]
    # the last specs of that name (16 / 4 heads of 64): 1024 elements a chunk, one q chunk of
    # 16 heads and one k/v chunk
    assert grids["rope_split_store_bf16_decode_heads"] == [300, 2, 1]
    assert grids["rope_split_store_bf16_prefill"] == [150, 1, 1]  # cdiv(300, BLOCK_T=2)
    assert grids["flash_attention_bf16_mask1"] == [3, 32, 300]  # q blocks, heads, sequences
    assert grids["paged_decode_reduce_bf16"] == [300 * 32, 1, 1]


def test_signature_mismatch_is_a_clear_error(compiled):
    assert "signature keys" in compiled["error"]


def test_rope_and_kv_store_kernels_do_not_spill(compiled):
    """The RoPE / paged-store kernels clamp their metadata-derived indices (defence in depth)
    at no register cost: no spills, and the plain rope_split_store keeps the registers it had
    before the clamps (40 decode, 32 prefill: full occupancy for the bandwidth-bound prefill)."""
    limits = {"rope_split_store_bf16_decode": 40, "rope_split_store_bf16_prefill": 32}
    seen = 0
    for key, info in compiled.items():
        name = key.split("/")[0]
        if key == "error" or not name.startswith(("rope", "kv_store")) or info["res"] is None:
            continue
        seen += 1
        regs, stack, local = info["res"]
        assert stack == 0 and local == 0, (key, info["res"])
        if name in limits and info["nh"] == 32:  # the plain (32, 8, 128) shapes
            assert regs <= limits[name], (key, regs)
    assert seen in (0, 8)


def test_every_kernel_may_overlap_its_predecessor(compiled):
    """Each kernel starts with pdl_wait (kernels/pdl.py), so its PTX waits for the kernels
    before it ahead of any global access and the runtime launches it with programmatic
    stream serialization."""
    for key, info in compiled.items():
        if key != "error":
            assert info["meta"]["launch_pdl"] is True, key
