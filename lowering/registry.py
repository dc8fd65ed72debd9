"""Lowerings registered per (op, backend), and decompositions for ops a backend lacks."""
from __future__ import annotations

from typing import Callable

BACKENDS = ("cpu", "cuda")

LOWERINGS: dict[tuple[str, str], Callable] = {}
# op -> fn(node, rewriter) that replaces the node by other ops (used when a backend has no
# lowering of its own for the op).
DECOMPOSITIONS: dict[str, Callable] = {}
# (op, backend) -> fn(node, rewriter) run before lowering for that backend even though the op
# has a lowering there (e.g. cuda's load-time repacking of 4-bit weights); True if it rewrote.
BACKEND_REWRITES: dict[tuple[str, str], Callable] = {}
# Ops that need no kernel: the runtime binds weights and constants, and creates the chain.
STRUCTURAL = {"chain", "weight", "constant"}


def register_lowering(op: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")

    def deco(fn):
        key = (op, backend)
        if key in LOWERINGS:
            raise ValueError(f"lowering of gir.{op} for {backend} registered twice")
        LOWERINGS[key] = fn
        return fn
    return deco


def register_decomposition(op: str):
    def deco(fn):
        if op in DECOMPOSITIONS:
            raise ValueError(f"decomposition of gir.{op} registered twice")
        DECOMPOSITIONS[op] = fn
        return fn
    return deco


def register_backend_rewrite(op: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")

    def deco(fn):
        if (op, backend) in BACKEND_REWRITES:
            raise ValueError(f"{backend} rewrite of gir.{op} registered twice")
        BACKEND_REWRITES[(op, backend)] = fn
        return fn
    return deco


def lowering_for(op: str, backend: str) -> Callable | None:
    return LOWERINGS.get((op, backend))


class NoLowering(ValueError):
    """A node its backend cannot lower (the user's graph, not a bug: a ValueError)."""


def no_lowering(node, backend: str) -> NoLowering:
    """The error for a node `backend` cannot lower: where it was built and, for an op whose
    rewrite into other ops declined it, what that op is for (its OpDef doc)."""
    from graphir.opdef import REGISTRY

    msg = f"gir.{node.op} has no {backend} lowering{' (at ' + node.loc + ')' if node.loc else ''}"
    opdef = REGISTRY.get(node.op)
    if node.op in DECOMPOSITIONS and opdef is not None and opdef.doc:
        msg += f", and its rewrite into other ops does not apply here ({node.op}: {opdef.doc})"
    return NoLowering(msg)


def missing_lowerings(backend: str) -> list[str]:
    """Registered ops with neither a lowering for backend nor a decomposition."""
    from graphir.opdef import REGISTRY, _load_op_library

    _load_op_library()
    return sorted(op for op in REGISTRY
                  if op not in STRUCTURAL and (op, backend) not in LOWERINGS
                  and op not in DECOMPOSITIONS)


# cuda's 4-bit nib rewrite and its way back (registers on import; needs the functions above).
from . import nib_rewrites  # noqa: E402,F401
