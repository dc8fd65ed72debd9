"""Every cuda lowering's kernels compile offline (no GPU) to sm_90 cubins within Hopper's
shared memory, and `compile_graph(..., "cuda:sm_90")` writes a loadable artifact.

Compilation runs in a subprocess without TRITON_INTERPRET (conftest.py turns the interpreter on
for this directory) and with a private Triton cache, so each run really compiles.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import PARALLEL, run_compiled_mode

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = PARALLEL + r"""
import json, sys
import numpy as np
from graphir import ops
from graphir import DType, Graph, TensorType
from graphir.passes import run_passes
from graphir.lowering.triton_gpu import aot, backend
from tests.gpu import family

def T(*s, dt=DType.float32):
    return TensorType(dt, list(s))

def zoo(dt):
    # One graph touching every generic lowering: fused elementwise groups (float, int, bool,
    # casts), shape ops, reductions, norms, the generic and the hand-written matmul.
    def f(x, y, i, w, idx):
        u = [getattr(ops, n)(x) for n in ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh",
                                          "sigmoid", "silu", "cos", "sin", "floor")]
        b = [ops.pow(x, y), ops.mod(x, y), ops.div(x, y), ops.maximum(x, y), ops.minimum(x, y),
             ops.where(ops.logical_or(ops.greater(x, y), ops.equal(x, y)), x, y),
             ops.clamp(ops.gelu(x, approximate="tanh") + ops.gelu(y), -1.0, 2.0),
             ops.cast(ops.cast(x, DType.float8_e4m3fn), dt)]
        ii = [ops.div(i, i + 1), ops.mod(i, i + 3), ops.cast(ops.cast(i, dt) * 0.5, DType.int32)]
        s = [ops.permute(x, [1, 0]), x[1:3, ::2], ops.broadcast_to(w[0:1, 0:8], [6, 8]),
             ops.concat([x, y], axis=0), *ops.split(x, [3, 5], axis=1), ops.reshape(x, [-1]),
             ops.gather(x, idx, axis=0), ops.scatter(x, y, ops.mod(ops.abs(i), i * 0 + 6), axis=0)]
        r = [ops.sum(x, 0), ops.mean(x, 1), ops.max(x, axis=0), ops.min(x, axis=1),
             ops.argmax(x, 1), ops.softmax(x, 1), ops.rms_norm(x, w[0], 1e-5),
             ops.rms_norm(x, w[0], 1e-5, weight_offset=1.0), ops.layer_norm(x, w[0], w[1], 1e-5)]
        m = [ops.matmul(x, ops.permute(w, [1, 0])), ops.matmul(x, w, transpose_b=True),
             ops.matmul(ops.reshape(x, [-1, 2, 4]), ops.reshape(w, [4, 16]))]
        return u + b + ii + s + r + m
    with Graph("zoo", input_types=[T("n", 8, dt=dt), T("n", 8, dt=dt), T("n", 8, dt=DType.int32),
                                   T(8, 8, dt=dt), T(4, dt=DType.int64)]) as g:
        g.output(*f(*g.inputs))
    return g

graphs = [zoo(DType.float32), zoo(DType.bfloat16)]
for case in family.CASES:
    for fuse in (True, False):
        g, _ = family.build(case, DType.bfloat16, fuse)
        if fuse:
            run_passes(g)
        graphs.append(g)
progs = [backend.lower(g) for g in graphs]
precompile({k: s for p in progs for k, s in p.kernels.items()}.values())
out = {"kernels": {}, "lowered_ops": set()}
for prog in progs:
    out["lowered_ops"].update(s.op for s in prog.plan.steps)
    for key, spec in prog.kernels.items():
        if key in out["kernels"]:
            continue
        c = aot.compile_spec(spec)
        out["kernels"][key] = dict(magic=c.cubin[:4].hex(), shared=c.shared, name=c.name,
                                   scratch=c.global_scratch_size, nparams=len(c.params))
out["lowered_ops"] = sorted(out["lowered_ops"])
# The default bf16 prefill at head dim 128, page 128 reads K/V through TMA (the family above
# has rows too short for it).
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
out["tma_prefill"] = aot.compile_spec(fa.aot_specs(32, 8, 128, 128)[0]).launch_metadata()
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_compiled_mode(SCRIPT, tmp_path_factory, timeout=1200)


def test_every_lowered_kernel_builds_an_sm90_cubin(compiled):
    kernels = compiled["kernels"]
    assert len(kernels) > 40
    for key, info in kernels.items():
        assert info["magic"] == "7f454c46", key  # ELF
        assert 0 <= info["shared"] <= 227 * 1024, key
        # CUDA-graph capture needs no scratch allocation; the matmul's and the prefill's TMA
        # kernels build their descriptors in global scratch, which Kernel.prepare allocates
        # before any capture (the test below).
        assert info["scratch"] == 0 or info["name"] in ("matmul_tma_kernel",
                                                        "flash_prefill_kernel"), key


def test_global_scratch_is_allocated_when_a_launch_is_packed(compiled, monkeypatch):
    # The executor packs every launch of a call key (CallPlanBuilder._prepare -> Kernel.prepare)
    # before it captures the key's CUDA graph; capture allows no allocation, and replays must
    # find the same scratch address. A fake function and driver stand in for the GPU.
    import ctypes

    from graphir.runtime.cuda import driver
    from graphir.runtime.cuda.kernel import Kernel
    from graphir.runtime.cuda.memory import DeviceBuffer
    from graphir.runtime.cuda.module import LaunchSpec

    made, launched = [], []

    def empty(nbytes, dtype="uint8", device=0):
        made.append(nbytes)
        return DeviceBuffer.from_pointer(0x7F00_0000_0000 + (len(made) << 32), (nbytes,),
                                         "uint8")

    class Fn:
        handle, name, max_threads_per_block = 0xF00D, "fake", 1024
        module = type("M", (), {"device": 0})()

        def set_max_dynamic_shared(self, n):
            pass

    real = driver.function
    monkeypatch.setattr(driver, "function", lambda name: (
        lambda *a: launched.append(a[-2]) or 0)  # the packed parameters, either call
        if name in ("cuLaunchKernel", "cuLaunchKernelEx") else real(name))
    monkeypatch.setattr(DeviceBuffer, "empty", staticmethod(empty))
    # The SM count that bounds PDL launches (Kernel asks once, at construction).
    monkeypatch.setattr(driver, "device_attribute", lambda attr, dev=0: 132)
    meta = compiled["tma_prefill"]
    assert meta["global_scratch_size"] == 128  # one TMA descriptor per program
    k = Kernel(Fn(), LaunchSpec.from_metadata(meta))
    nargs = len(meta["params"]) - 2
    scratch_at = lambda p: ctypes.cast(p.params.array[nargs],  # noqa: E731
                                       ctypes.POINTER(ctypes.c_uint64)).contents.value
    big = k.prepare((32, 4, 32), [0x1000] * nargs)
    assert made == [32 * 4 * 32 * 128 + meta["global_scratch_align"]]
    small = k.prepare((32, 1, 2), [0x1000] * nargs)  # fits the same buffer
    assert len(made) == 1 and scratch_at(small) == scratch_at(big)
    monkeypatch.setattr(DeviceBuffer, "empty", staticmethod(
        lambda *a, **kw: pytest.fail("allocated while replaying")))
    for _ in range(3):  # what a capture records and its replays repeat
        big(0x55)
        small(0x55)
    assert len(launched) == 6 and len(set(launched)) == 2  # two packed arrays, reused
    assert scratch_at(big) != 0 and scratch_at(big) % meta["global_scratch_align"] == 0


def test_the_op_zoo_covers_every_lowering_family(compiled):
    ops_seen = " ".join(compiled["lowered_ops"])
    for op in ("fused:", "permute", "slice", "broadcast_to", "concat", "split", "gather",
               "scatter", "sum", "mean", "reduce_max", "reduce_min", "argmax", "softmax",
               "rms_norm", "layer_norm", "matmul", "fused_qkv_matmul", "rope_split_store",
               "rope", "kv_cache_store", "flash_attention_ragged"):
        assert op in ops_seen, op


# Coverage of every registered op by a cuda lowering: tests/backends/test_lowering_coverage.py
# (checked in a fresh process; other tests here register test-only ops).


def test_compile_graph_writes_a_cuda_artifact(tmp_path, monkeypatch):
    # This process runs under TRITON_INTERPRET=1: the backend builds in a subprocess.
    from graphir.examples.llama_attention import build_tiny
    from graphir.lowering.artifact import load_artifact
    from graphir.lowering.driver import compile_graph

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    art = compile_graph(build_tiny(), "cuda:sm_90", out=tmp_path / "tiny.gart")
    art = load_artifact(tmp_path / "tiny.gart", expect_target="cuda:sm_90")
    m = art.manifest
    assert m["backend"] == "triton_gpu"
    names = {md["spec"] for md in m["kernels"].values()}
    assert {"rope_split_store_fp32_decode", "flash_attention_fp32_mask1",
            "paged_decode_partial_fp32_mask1", "matmul_fp32_prefill"} <= names
    for md in m["kernels"].values():
        assert art.file(md["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert ".entry " + md["name"] in art.file(md["ptx"]).read_text()
        assert md["params"][-2]["name"] == "global_scratch"
    steps = m["plan"]["steps"]
    attn = next(s for s in steps if s["op"] == "flash_attention_ragged")
    # Decode variants (per query tile and tuning bucket: direct write; split + reduce) first,
    # the prefill fallback last, its last variant unconditional.
    variants = attn["attrs"]["variants"]
    first = [m["kernels"][v["ops"][0]["launch"]]["spec"] for v in variants]
    k = next(i for i, n in enumerate(first) if n.startswith("flash_attention"))
    assert k > 0 and all(n.startswith("paged_decode_partial") for n in first[:k])
    assert all(n.startswith("flash_attention") for n in first[k:])
    assert variants[-1]["when"] is None and all(v["when"] for v in variants[:-1])
    # rope_split_store: a program per head chunk while tokens x chunks fit one wave, then a
    # program per token, then the two-token prefill form.
    rope = next(s for s in steps if s["op"] == "rope_split_store")["attrs"]["variants"]
    specs = [m["kernels"][v["ops"][0]["launch"]]["spec"] for v in rope]
    assert specs == ["rope_split_store_fp32_decode_heads", "rope_split_store_fp32_decode",
                     "rope_split_store_fp32_prefill"]
    assert rope[0]["when"].endswith("<= 128") and rope[2]["when"] is None
    assert rope[0]["ops"][0]["grid"][1] == "2"  # build_tiny: one q chunk, one k/v chunk


def test_cli_dump_shows_triton_and_ptx(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["GRAPHIR_CACHE_DIR"] = str(tmp_path / "cache")
    ex = str(ROOT / "examples" / "llama_attention.py") + ":build_tiny"
    for stage, marker in (("triton", "@triton.jit"), ("ptx", ".entry")):
        p = subprocess.run([sys.executable, "-m", "graphir.tools.cli", "dump", ex, "--stage", stage],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.count("// -----// " + stage) >= 5 and marker in p.stdout
    p = subprocess.run([sys.executable, "-m", "graphir.tools.cli", "compile", ex, "--target",
                        "cuda:sm_90", "-o", str(tmp_path / "o.gart"), "-q"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and (tmp_path / "o.gart" / "manifest.json").is_file(), p.stderr
