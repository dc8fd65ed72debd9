"""Programmatic dependent launch: a cubin is marked `launch_pdl` only when its PTX waits for
its predecessors (griddepcontrol.wait) before any global memory access (kernels/pdl.py)."""

import pytest

from graphir.lowering.triton_gpu.kernels.pdl import waits_before_memory

from .test_aot_cubin import run_compiled_mode

HEAD = ".visible .entry k(\n.param .u64 k_param_0\n)\n{\n.reg .b32 %r<4>;\n"


@pytest.mark.parametrize("body, ok", [
    ("ld.param.u64 %rd1, [k_param_0];\ngriddepcontrol.wait;\nld.global.b32 %r1, [%rd1];\n",
     True),
    ("ld.shared.b32 %r1, [%r2];\nst.local.b32 [%r2], %r1;\ngriddepcontrol.wait;\n", True),
    ("ld.global.b32 %r1, [%rd1];\ngriddepcontrol.wait;\n", False),
    ("@%p1 ld.global.v4.b32 {%r1, %r2, %r3, %r0}, [%rd1];\ngriddepcontrol.wait;\n", False),
    ("st.global.b32 [%rd1], %r1;\ngriddepcontrol.wait;\n", False),
    ("ld.u32 %r1, [%rd1];\ngriddepcontrol.wait;\n", False),           # generic address
    ("cp.async.bulk.tensor.2d.shared::cluster.global [%r1], [%rd1, {%r2, %r3}], [%r0];\n"
     "griddepcontrol.wait;\n", False),                                 # TMA
    ("atom.global.add.u32 %r1, [%rd1], 1;\ngriddepcontrol.wait;\n", False),
    ("ld.global.b32 %r1, [%rd1];\n", False),                          # no wait at all
    # a warp that branches past the wait runs what follows unordered; a loop before it is fine
    ("@%p1 bra $L__BB0_9;\ngriddepcontrol.wait;\n$L__BB0_9:\nst.global.b32 [%rd1], %r1;\n",
     False),
    ("$L__BB0_1:\nadd.s32 %r1, %r1, 1;\n@%p1 bra $L__BB0_1;\ngriddepcontrol.wait;\n", True),
])
def test_waits_before_memory(body, ok):
    assert waits_before_memory(HEAD + body + "ret;\n}\n") is ok


# Early reads: loads of parameters 0 and 1 (a, b) may precede the wait, parameter 2 (c) and
# parameter 3 (n, 32-bit) as an offset; a loop's pointer walks from its start.
EARLY = (".visible .entry k(\n.param .u64 k_param_0,\n.param .u64 k_param_1,\n"
         ".param .u64 k_param_2,\n.param .u32 k_param_3\n)\n{\n")
LOOP = ("ld.param.u64 %rd1, [k_param_0];\nld.param.u32 %r1, [k_param_3];\n"
        "mul.wide.u32 %rd2, %r1, 4;\nadd.s64 %rd3, %rd1, %rd2;\nmov.u64 %rd4, %rd3;\n"
        "$L__BB0_1:\nld.global.b32 %r2, [%rd4+0];\nadd.s64 %rd4, %rd4, 256;\n"
        "setp.lt.u64 %p1, %rd4, %rd3;\n@%p1 bra $L__BB0_1;\n")


@pytest.mark.parametrize("body, ok", [
    (LOOP + "griddepcontrol.wait;\nst.global.b32 [%rd4], %r2;\n", True),
    ("ld.param.u64 %rd1, [k_param_1];\nld.global.nc.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n"
     "griddepcontrol.wait;\n", True),
    # c is not an early read
    ("ld.param.u64 %rd1, [k_param_2];\nld.global.b32 %r1, [%rd1];\ngriddepcontrol.wait;\n",
     False),
    # an address read from memory
    ("ld.param.u64 %rd1, [k_param_0];\nld.global.u64 %rd2, [%rd1];\n"
     "ld.global.b32 %r1, [%rd2];\ngriddepcontrol.wait;\n", False),
    # a store before the wait, even to an early-read buffer
    ("ld.param.u64 %rd1, [k_param_0];\nst.global.b32 [%rd1], %r1;\ngriddepcontrol.wait;\n",
     False),
    # a branch past the wait
    (LOOP.replace("@%p1 bra $L__BB0_1;", "@%p1 bra $L__BB0_9;") + "griddepcontrol.wait;\n"
     "$L__BB0_9:\nst.global.b32 [%rd4], %r2;\n", False),
    # an indirect branch or a call: where they go is not in the PTX text
    ("ld.param.u64 %rd1, [k_param_0];\nld.global.b32 %r2, [%rd1];\nbrx.idx %r1, $L_tab;\n"
     "griddepcontrol.wait;\n", False),
    ("ld.param.u64 %rd1, [k_param_0];\nld.global.b32 %r2, [%rd1];\ncall.uni f, (%rd1);\n"
     "griddepcontrol.wait;\n", False),
    # a pointer no definition starts (it only feeds itself)
    ("$L__BB0_1:\nadd.s64 %rd4, %rd4, 256;\nld.global.b32 %r2, [%rd4];\n"
     "@%p1 bra $L__BB0_1;\ngriddepcontrol.wait;\n", False),
    # a generic load
    ("ld.param.u64 %rd1, [k_param_0];\nld.u32 %r1, [%rd1];\ngriddepcontrol.wait;\n", False),
])
def test_early_reads_before_the_wait(body, ok):
    ptx = EARLY + body + "ret;\n}\n"
    assert waits_before_memory(ptx, (0, 1)) is ok
    assert waits_before_memory(ptx) is False  # without early reads any access refuses


SCRIPT = r"""
import json
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc

from tests.lowering.triton_gpu.pdl_kernels import loads_first, plain, with_prelude

sig = {"x": "*fp32", "y": "*fp32", "n": "i32", "B": "constexpr"}
out = {f.__name__: aot.compile_kernel(f, sig, {"B": 256}, num_warps=4).launch_pdl
       for f in (with_prelude, plain, loads_first)}
# Gluon kernels have no prelude: launched the ordinary way.
(ws,) = fa.aot_specs(32, 8, 128, 128, mask="CAUSAL", config=fc.get("m128n128w4s2tmawslpt"))
out["gluon"] = aot.compile_spec(ws).launch_pdl
# The late-waiting GEMV: marked when its early reads are named, not when one is missing.
from dataclasses import replace
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc
(late,) = mc.specs(mc.get("gemv2x256_w2_s1"), "bfloat16", True, 4096, 6144, early=True)
c = aot.compile_spec(late)
out["late"] = [c.launch_pdl, c.launch_metadata()["pdl_early_reads"]]
out["late_b_only"] = aot.compile_spec(replace(late, pdl_early_reads=("b_ptr",))).launch_pdl
# The warp-specialized TMA matmul's worker warps skip the wait (and write descriptors into the
# kernel's scratch): launched in order. Its single-partition form waits first.
for name in ("tma128x256x64_g8_w4_s3_p_ws", "tma128x256x64_g8_w8_s3_p"):
    (s,) = mc.specs(mc.get(name), "bfloat16", False, 4096, 4096)
    out[name] = aot.compile_spec(s).launch_pdl
print("JSON" + json.dumps(out))
"""


def test_only_kernels_that_wait_first_are_marked(tmp_path_factory):
    out = run_compiled_mode(SCRIPT, tmp_path_factory, timeout=600)
    assert out["with_prelude"] is True
    assert out["plain"] is False
    # The load of x sits before the wait in the PTX: launching it early would race.
    assert out["loads_first"] is False
    assert out["gluon"] is False
    assert out["late"] == [True, ["a_ptr", "b_ptr", "bias_ptr"]]
    assert out["late_b_only"] is False
    assert out["tma128x256x64_g8_w4_s3_p_ws"] is False
    assert out["tma128x256x64_g8_w8_s3_p"] is True
