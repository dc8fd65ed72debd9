"""graphir.lowering: graph -> artifact (passes, backends, the AOT artifact and its cache)."""
from .driver import Target, compile_graph

__all__ = ["Target", "compile_graph"]
