"""Budgets on the size of the MLIR the CPU backend emits for the Llama-3-8B-shaped layer,
counted (lines of the module), never timed: LLVM's code generation grows faster than the IR,
so a Python loop that unrolls what an scf.for could hold shows up here first. The decode
pass of the attention kernel once unrolled its slots and head_dim vectors: 12,700 lines of
attention kernel, and the layer's cold compile took 10-12 s instead of 2.5 s on a 2-core
EPYC (BENCHMARKS.md, CPU: the cold compile). Raise a budget only with a reason."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("mlir.ir")

from graphir.examples.llama_attention import build  # noqa: E402
from graphir.lowering.mlir_cpu.backend import emit_module  # noqa: E402
from graphir.lowering.mlir_cpu.cpu_target import CpuTarget  # noqa: E402

# lines of each kernel of the layer, and of the whole module
BUDGET = {"flash_attention_ragged": 3200, "module": 4200}


def kernel_lines(text: str) -> dict[str, int]:
    """Lines of each func.func of a printed module, by its op name (k<N>_<op>)."""
    out = {}
    for m in re.finditer(r"^  func\.func @k\d+_(\w+)\(.*?^  }$", text, re.S | re.M):
        out[m.group(1)] = out.get(m.group(1), 0) + m.group(0).count("\n") + 1
    return out


@pytest.mark.parametrize("cpu", ["x86-64:avx2", "x86-64:avx512"])
def test_the_layers_kernels_stay_within_their_mlir_budgets(cpu):
    ctx, module, _ = emit_module(build(), CpuTarget.parse(cpu))
    with ctx:
        text = str(module)
    sizes = kernel_lines(text)
    assert sizes["flash_attention_ragged"] <= BUDGET["flash_attention_ragged"], sizes
    assert text.count("\n") <= BUDGET["module"], (text.count("\n"), sizes)
