"""Graph verifier: SSA order, type rules, outputs defined."""
from __future__ import annotations

from .opdef import lookup
from .types import ChainType


class VerificationError(ValueError):
    pass


def verify(graph) -> None:
    """Raise VerificationError naming the first broken node."""
    defined = {id(v) for v in graph.inputs}
    for i, n in enumerate(graph.nodes):
        where = f"node {i} (gir.{n.op}{', at ' + n.loc if n.loc else ''})"
        for k, v in enumerate(n.operands):
            if id(v) not in defined:
                raise VerificationError(f"{where}: operand {k} is used before it is defined")
        try:
            opdef = lookup(n.op)
            expected = opdef.result_types([v.type for v in n.operands], n.attrs)
        except KeyError as e:
            raise VerificationError(f"{where}: missing attribute {e}") from None
        except (ValueError, TypeError) as e:
            raise VerificationError(f"{where}: {e}") from None
        got = [r.type for r in n.results]
        if list(expected) != got:
            raise VerificationError(f"{where}: result types {list(map(str, got))} do not match "
                                    f"the type rule {list(map(str, expected))}")
        for r in n.results:
            if r.node is not n:
                raise VerificationError(f"{where}: result does not point back at its node")
            defined.add(id(r))
    for k, v in enumerate(graph.outputs):
        if id(v) not in defined:
            raise VerificationError(f"graph output {k} is not defined in the graph")
        if isinstance(v.type, ChainType):
            raise VerificationError(f"graph output {k} is a chain token")
