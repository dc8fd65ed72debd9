"""Ops without a CUDA kernel yet: run their float64 reference on the host at call time.

The step downloads its operands, evaluates the op's reference exactly as the interpreter does,
and uploads the results (and a written buffer). Correct and slow (a device sync and a copy of
every operand, a whole KV buffer for the MLA store): it keeps every op compilable for cuda while
the MLA and quantized-matmul kernels are not written. Plans with such steps are never captured
into CUDA graphs. `constant` is listed for completeness: constants are always computed at load
time by the backend's host steps.
"""
from __future__ import annotations

from graphir.lowering.registry import register_lowering

from .base import StepBuilder

HOST_FALLBACK = ("constant", "dequantize", "qmatmul", "mla_cache_store", "mla_prefill",
                 "mla_decode", "mla_prefill_plan")


def host_fallback(sb: StepBuilder, node) -> None:
    """Mark the step as a run-time host evaluation of the node's reference."""
    sb.host_fallback = True


for _op in HOST_FALLBACK:
    register_lowering(_op, "cuda")(host_fallback)
