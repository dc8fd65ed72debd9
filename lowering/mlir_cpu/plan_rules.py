"""How the CPU backend names and parameterizes its plan steps, without MLIR: the loader checks
an artifact's plan against these (lowering/plan_check.py), the backend builds it with them."""
from __future__ import annotations

from graphir.dim import Dim
from graphir.types import ChainType

# Ops the CPU runtime carries out itself (no kernel): collectives and copies between the
# in-process virtual devices.
RUNTIME_OPS = {"allreduce", "allgather", "transfer_to"}


def kernel_name(node, index: int) -> str:
    return f"{'runtime' if node.op in RUNTIME_OPS else 'k'}{index}_{node.op}"


def symbols(node) -> list[str]:
    """The symbolic dims a node's kernel takes at run time, in the order it takes them."""
    syms: set[str] = set()
    for v in list(node.operands) + list(node.results):
        if not isinstance(v.type, ChainType):
            for d in v.type.shape:
                syms |= d.symbols
    for a in node.attrs.values():
        for d in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(d, Dim):
                syms |= d.symbols
    return sorted(syms)
