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
])
def test_waits_before_memory(body, ok):
    assert waits_before_memory(HEAD + body + "ret;\n}\n") is ok


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
print("JSON" + json.dumps(out))
"""


def test_only_kernels_that_wait_first_are_marked(tmp_path_factory):
    out = run_compiled_mode(SCRIPT, tmp_path_factory, timeout=600)
    assert out["with_prelude"] is True
    assert out["plain"] is False
    # The load of x sits before the wait in the PTX: launching it early would race.
    assert out["loads_first"] is False
    assert out["gluon"] is False
