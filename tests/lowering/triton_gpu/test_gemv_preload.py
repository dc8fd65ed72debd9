"""The GEMV that loads the start of its weight before its PDL wait (matmul_skinny.gemv_kernel's
PRELOAD_K): the PTX check that lets only loads of the named weights precede the wait, the
kernel under the interpreter, and the lowering, which asks for it only when B is a weight."""

import numpy as np
import pytest
import torch

from graphir import DType, Graph, TensorType, Weight, ops
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.backend import lower
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc
from graphir.lowering.triton_gpu.kernels.pdl import waits_before_memory

from .test_aot_cubin import run_compiled_mode
from .test_backend_interp import InterpDevice

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

PRELOADS = sorted(n for n, c in mc.BY_NAME.items() if c.get("PRELOAD_K"))

HEAD = (".visible .entry k(\n.param .u64 .ptr .global .align 1 k_param_0,\n"
        ".param .u64 .ptr .global .align 1 k_param_1,\n.param .u32 k_param_2\n)\n{\n"
        "ld.param.b64 %rd1, [k_param_0];\nld.param.b64 %rd2, [k_param_1];\n"
        "ld.param.b32 %r1, [k_param_2];\nmov.u32 %r2, %ctaid.x;\nmul.wide.s32 %rd3, %r2, %r1;\n")
WAIT = "griddepcontrol.wait; // dummy %r9\n"


@pytest.mark.parametrize("body, preload, ok", [
    # From the weight (param 1) at an offset of the program id times a 32-bit scalar.
    ("add.s64 %rd4, %rd2, %rd3;\n@%p1 ld.global.L1::evict_first.v4.b32 {%r3, %r4, %r5, %r6},"
     " [ %rd4 + 0 ], %rd7;\n", (1,), True),
    ("add.s64 %rd4, %rd2, %rd3;\nld.global.b32 %r3, [%rd4];\n", (), False),   # not named
    ("add.s64 %rd4, %rd1, %rd3;\nld.global.b32 %r3, [%rd4];\n", (1,), False),  # param 0: x
    # Both params in one address (weight + x): x's bytes pick where it reads.
    ("add.s64 %rd4, %rd1, %rd2;\nld.global.b32 %r3, [%rd4];\n", (1,), False),
    # An address read from memory, even from the weight itself.
    ("ld.global.b64 %rd4, [%rd2];\nld.global.b32 %r3, [%rd4];\n", (1,), False),
    ("add.s64 %rd4, %rd2, %rd3;\nst.global.b32 [%rd4], %r1;\n", (1,), False),   # a store
    ("add.s64 %rd4, %rd2, %rd3;\nld.b32 %r3, [%rd4];\n", (1,), False),          # generic
    ("add.s64 %rd4, %rd2, %rd3;\natom.global.add.u32 %r3, [%rd4], 1;\n", (1,), False),
    ("ld.global.b32 %r3, [%rd8];\n", (1,), False),                              # undefined
    ("add.s64 %rd4, %rd2, %rd3;\nprefetch.global.L2 [%rd4];\n", (1,), False),
])
def test_only_loads_of_the_named_weights_may_precede_the_wait(body, preload, ok):
    assert waits_before_memory(HEAD + body + WAIT + "ret;\n}\n", preload) is ok


def test_without_a_wait_nothing_is_launched_early():
    assert waits_before_memory(HEAD + "ld.global.b32 %r3, [%rd2];\nret;\n}\n", (1,)) is False


def data(M, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16(),
            torch.randn(N, generator=g).bfloat16())


def rel_err(got, a, b, bias):
    want = a.double().numpy() @ b.double().numpy().T + bias.double().numpy()
    return np.linalg.norm(got.double().numpy() - want) / np.linalg.norm(want)


@pytest.mark.parametrize("name", PRELOADS)
@pytest.mark.parametrize("extra", [1, 2])
def test_preloading_gemv_against_float64(name, extra):
    # K = the preload plus one or two blocks (the plain or double-buffered loop after it);
    # N = 5: a partial tile of clamped rows; two rows of X and a bias.
    cfg = mc.get(name)
    K = cfg["PRELOAD_K"] + extra * cfg["BLOCK_K"]
    spec, = mc.specs(cfg, "bfloat16", True, K, 5, b_fixed=True)
    assert spec.constexprs["PRELOAD_K"] == cfg["PRELOAD_K"] and spec.pdl_preload == ("b_ptr",)
    a, b, bias = data(2, 5, K, seed=K)
    got = mc.run_torch(a, b, bias, config=name, b_fixed=True)
    assert rel_err(got, a, b, bias) < 1e-2


@pytest.mark.parametrize("b_fixed, K, why", [
    (False, 4096, "B may be written by the plan"),
    (True, None, "K unknown"),
    (True, 1024, "nothing left after the preload"),
    (True, 1024 + 128, "K not whole blocks"),
])
def test_the_preload_is_dropped_where_it_cannot_apply(b_fixed, K, why):
    spec, = mc.specs(mc.get("gemv2x256_w2_s1_pre1024"), "bfloat16", False, K, 64,
                     b_fixed=b_fixed)
    assert spec.constexprs["PRELOAD_K"] == 0 and spec.pdl_preload == (), why


def test_config_rules():
    with pytest.raises(ValueError, match="power of two"):
        mc.gemv(2, 256, 2, preload=768)
    with pytest.raises(ValueError, match="multiple of BLOCK_K"):
        mc.gemv(2, 1024, 1, preload=512)
    with pytest.raises(ValueError, match="without split-K"):
        mc.gemv(2, 256, 2, split_k=2, preload=512)


def _graph(weight: bool, K=768, N=24):
    types = [TensorType(DType.bfloat16, ["n", K])]
    if not weight:
        types.append(TensorType(DType.bfloat16, [N, K]))
    with Graph("mm", input_types=types) as g:
        w = Weight("w", DType.bfloat16, [N, K]) if weight else g.inputs[1]
        g.output(ops.matmul(g.inputs[0], w, transpose_b=True))
    return g


def _m1_spec(program):
    (step,) = [s for s in program.plan.steps if s.op == "matmul"]
    first = step.attrs["variants"][0]
    assert first["when"] == "n <= 1"
    return program.kernels[first["ops"][0]["launch"]]


def test_the_lowering_preloads_weights_only_and_the_plan_runs():
    from graphir.runtime.cuda.executor import PlanExecutor

    table = {"version": 1, "families": {"matmul": {"bf16": {"*": {
        "m1": "gemv2x256_w2_s1_pre512", "m16": "decode"}}}}}
    with tuning.using(tuning.Selector([("default table", table)])) as sel:
        weighted = lower(_graph(True))
        fed = lower(_graph(False))
    assert [s.facts["b_fixed"] for s in sel.sites] == [True, False]
    spec = _m1_spec(weighted)
    assert spec.constexprs["PRELOAD_K"] == 512 and spec.pdl_preload == ("b_ptr",)
    spec = _m1_spec(fed)   # B is an input: the same config, no preload
    assert spec.constexprs["PRELOAD_K"] == 0 and spec.pdl_preload == ()
    g = _graph(True)
    rng = np.random.default_rng(4)
    # bf16 values given as float32 (the executor converts them to bits)
    w = torch.from_numpy(rng.standard_normal((24, 768)).astype(np.float32)).bfloat16().float()
    ex = PlanExecutor(weighted.plan.to_json(), g, InterpDevice(weighted), {"w": w.numpy()})
    for M in (1, 3):
        x = torch.from_numpy(rng.standard_normal((M, 768)).astype(np.float32)).bfloat16().float()
        (got,) = ex.execute(x.numpy())
        want = x.double().numpy() @ w.double().numpy().T
        err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
        assert err < 1e-2, (M, err)


SCRIPT = r"""
import json
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

spec, = mc.specs(mc.get("gemv2x1024_w1_s1_pre1024"), "bfloat16", False, 4096, 4096, b_fixed=True)
args = (spec.fn, spec.signature, spec.constexprs, spec.num_warps, spec.num_stages, aot.SM90,
        spec.divisible_by_16, None)
ptx = aot.compile_spec(spec).asm["ptx"]
out = {"named": aot.compile_spec(spec).launch_pdl,
       "unnamed": aot.compile_kernel(*args, ()).launch_pdl,
       "x_named": aot.compile_kernel(*args, ("a_ptr",)).launch_pdl,
       "loads_before": ptx[:ptx.find("griddepcontrol.wait")].count("ld.global")}
try:
    aot.compile_kernel(*args, ("K",))
except ValueError as e:
    out["scalar"] = str(e)

# A compiled plan: its m1 GEMV of a weight is marked, and `graphir inspect` says so.
import os, tempfile
from pathlib import Path
from graphir.lowering.driver import compile_graph
from graphir.lowering.triton_gpu import tuning
from graphir.tools.inspect_cmd import format_summary, summarize
from tests.lowering.triton_gpu.test_gemv_preload import _graph

tmp = Path(tempfile.mkdtemp())
os.environ["GRAPHIR_CACHE_DIR"] = str(tmp / "cache")
(tmp / "t.json").write_text(json.dumps({"version": 1, "families": {"matmul": {"bf16": {"*": {
    "m1": "gemv2x256_w2_s1_pre512", "m16": "decode"}}}}}))
tuning.DEFAULTS_PATH = tmp / "t.json"
info = summarize(compile_graph(_graph(True), "cuda:sm_90"))
out["preload"] = info["pdl_preload"]
out["lines"] = [ln for ln in format_summary(info).splitlines() if "before the wait" in ln]
print("JSON" + json.dumps(out))
"""


def test_the_compiled_preload_is_marked_for_pdl_only_when_named(tmp_path_factory):
    out = run_compiled_mode(SCRIPT, tmp_path_factory, timeout=600)
    # 2 rows x 1024 columns of bf16 on one warp: 8 16-byte loads a lane before the wait.
    assert out["loads_before"] == 8
    assert out["named"] is True
    assert out["unnamed"] is False and out["x_named"] is False
    assert "not a pointer argument" in out["scalar"]
    (name,) = out["preload"]
    assert "gemv2x256_w2_s1_pre512" in name and out["preload"][name] == ["b_ptr"]
    assert len(out["lines"]) == 1 and "(reads b_ptr before the wait)" in out["lines"][0]
