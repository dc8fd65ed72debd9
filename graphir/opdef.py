"""The op registry: one OpDef per op. Op libraries (graphir.ops) fill it; the core only looks ops up.

The registry lives here (not in ops/) so the verifier and parser in graphir can check nodes
without importing the op library, keeping imports pointing one way (graphir <- ops).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .types import ChainType, Type


@dataclass(frozen=True)
class OpDef:
    """One op: name, type rule and float64 numpy reference.

    type_rule(operand_types, attrs) -> result types (without the chain); raises ValueError.
    reference(operand_arrays, attrs) -> result arrays; buffers are passed as arrays and written
    ops return their new contents as results (the interpreter copies them back).
    effects: the op touches a buffer; it takes the chain as its last operand and returns a new
    chain as its last result (added by the graph, not by the type rule).
    writes: indices of buffer operands the op writes; the reference returns their new contents
    after its other results, in the same order.
    """

    name: str
    type_rule: Callable[[Sequence[Type], dict], Sequence[Type]]
    reference: Callable[[Sequence[Any], dict], Sequence[Any]] | None
    effects: bool = False
    writes: tuple[int, ...] = ()
    attr_names: tuple[str, ...] = ()
    doc: str = ""
    traits: frozenset = field(default_factory=frozenset)

    def result_types(self, operand_types: Sequence[Type], attrs: dict) -> list[Type]:
        ins = list(operand_types)
        if self.effects:
            if not ins or not isinstance(ins[-1], ChainType):
                raise ValueError("missing the chain operand")
            ins = ins[:-1]
        out = self.type_rule(ins, attrs)
        out = [out] if not isinstance(out, (list, tuple)) else list(out)
        return out + [ChainType()] if self.effects else out


REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in REGISTRY:
        raise ValueError(f"op {opdef.name!r} registered twice")
    REGISTRY[opdef.name] = opdef
    return opdef


def lookup(name: str) -> OpDef:
    if name not in REGISTRY:
        _load_op_library()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown op 'gir.{name}'") from None


def _load_op_library() -> None:
    # The parser and verifier may meet ops before anyone imported an op library. Libraries
    # declare themselves as entry points (group "graphir.op_libraries"; graphir's own is
    # graphir.ops), so the core loads them as plugins instead of importing them upward.
    from importlib.metadata import entry_points

    for ep in entry_points(group="graphir.op_libraries"):
        ep.load()
