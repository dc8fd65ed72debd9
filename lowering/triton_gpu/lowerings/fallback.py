"""Ops without a CUDA kernel: run their float64 reference on the host at call time.

The step downloads its operands, evaluates the op's reference exactly as the interpreter does,
and uploads the results (and a written buffer); plans with such steps are never captured into
CUDA graphs. Every kernel op has kernels now (the quantized matmuls in lowerings/quant.py, MLA
in lowerings/mla.py); `constant` stays listed for completeness: constants are always computed
at load time by the backend's host steps.
"""
from __future__ import annotations

from graphir.lowering.registry import register_lowering

from .base import StepBuilder

HOST_FALLBACK = ("constant",)


def host_fallback(sb: StepBuilder, node) -> None:
    """Mark the step as a run-time host evaluation of the node's reference."""
    sb.host_fallback = True


for _op in HOST_FALLBACK:
    register_lowering(_op, "cuda")(host_fallback)
